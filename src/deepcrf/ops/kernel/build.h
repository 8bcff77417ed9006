/* Stage 1b: the lattice build (type-independent part), the blur neighbours, the handle. */
/* ------------------------------------------------------------------ build state */
typedef struct {
    table_t table;
    int64_t n_real; /* points whose entries are emitted (the rest are densecrf's padding) */
    int32_t *entry_vertex; /* the caller's n_real * (d+1) slice columns, point-major (borrowed) */
} build_t;

void lattice_free(void *handle) {
    build_t *b = (build_t *)handle;
    if (!b) return;
    table_free(&b->table);
    free(b);
}

/* Blur neighbours along direction j of vertices [begin, end): read-only look-ups, so the
 * vertices are split between threads.  Each vertex is the n1 neighbour of at most one other
 * (the step is a bijection of the lattice), so the n2 writes never collide. */
typedef struct {
    const table_t *t;
    int j;
    int64_t vertex_offset;
    int32_t *out;
} nbr_ctx;

static void nbr_init_range(void *vctx, int64_t begin, int64_t end) {
    nbr_ctx *x = (nbr_ctx *)vctx;
    for (int64_t v = begin; v < end; v++) {
        x->out[3 * v] = (int32_t)(x->vertex_offset + v);
        x->out[3 * v + 1] = x->out[3 * v + 2] = -1; /* replaced by `missing` below */
    }
}

static void nbr_find_range(void *vctx, int64_t begin, int64_t end) {
    nbr_ctx *x = (nbr_ctx *)vctx;
    const table_t *t = x->t;
    const int d = t->d, dp1 = d + 1, j = x->j;
    enum { GROUP = 8 }; /* look-ups whose slots are fetched together */
    int32_t n1[GROUP][64];
    uint64_t h[GROUP];
    for (int64_t v0 = begin; v0 < end; v0 += GROUP) {
        const int g = end - v0 < GROUP ? (int)(end - v0) : GROUP;
        for (int a = 0; a < g; a++) {
            const int32_t *key = t->keys + (v0 + a) * d;
            /* n1 = key - 1 everywhere, + (d+1) at j (j = d: the implied coordinate) */
            for (int i = 0; i < d; i++) n1[a][i] = key[i] - 1 + (i == j ? dp1 : 0);
            h[a] = hash_key(n1[a], d);
            table_prefetch(t, h[a]);
        }
        for (int a = 0; a < g; a++) {
            const int64_t v = v0 + a, u = table_find((table_t *)t, n1[a], h[a], 0);
            if (u >= 0) {
                /* n2 is the inverse step: v is u's n2 neighbour */
                x->out[3 * v + 1] = (int32_t)(x->vertex_offset + u);
                x->out[3 * u + 2] = (int32_t)(x->vertex_offset + v);
            }
        }
    }
}

/* Second phase, once the total vertex count of the batch is known: this item's slice columns
 * made global (the entry_vertex array given to lattice_build gets vertex_offset added) and
 * the blur neighbours along each of the d+1 directions:
 *   blur_col:  (d+1) arrays of 3*m_total, this item's 3*m written from 3*vertex_offset:
 *              [v, n1, n2] per vertex, `missing` where a neighbour is absent
 * Returns 0, or -2 when d > 64. */
int lattice_finish(void *handle, int64_t vertex_offset, int64_t missing, int64_t m_total,
                   int32_t *blur_col, int nthreads) {
    build_t *b = (build_t *)handle;
    table_t *t = &b->table;
    const int d = t->d;
    const int64_t m = t->m, nnz = b->n_real * (d + 1);
    if (d > 64) return -2;
    if (vertex_offset != 0)
        for (int64_t e = 0; e < nnz; e++) b->entry_vertex[e] += (int32_t)vertex_offset;
    for (int j = 0; j <= d; j++) {
        nbr_ctx x = {t, j, vertex_offset, blur_col + (int64_t)j * 3 * m_total + 3 * vertex_offset};
        parallel_for(m, nthreads, 4096, nbr_init_range, &x);
        parallel_for(m, nthreads, 4096, nbr_find_range, &x);
        for (int64_t v = 0; v < m; v++) {
            if (x.out[3 * v + 1] < 0) x.out[3 * v + 1] = (int32_t)missing;
            if (x.out[3 * v + 2] < 0) x.out[3 * v + 2] = (int32_t)missing;
        }
    }
    return 0;
}

/* First phase: elevate, round, rank, barycentric weights, insert the d+1 vertices of every
 * point into the table.  features (n, d); scale[d] the elevation factors (already rounded to
 * the working precision by the caller, as in the PyTorch path); points >= n_real only insert
 * vertices (densecrf's zero padding).  Writes entry_weight and entry_vertex (each n_real *
 * (d+1), point-major: the barycentric weights and the item-local vertex ids, i.e. the slice
 * matrix) and *m_out; returns a handle for lattice_finish / lattice_free (NULL on allocation
 * failure), which keeps using entry_vertex until then.
 *
 * Large inputs are cut into one stripe of consecutive points per thread, each hashed into its
 * own table; the tables are then merged in stripe order, each stripe's new vertices appended
 * in its own order of first appearance, which is exactly the numbering a single pass over
 * the points gives (the result does not depend on the thread count). */
typedef struct {
    table_t table;
    int64_t begin, end;
    int failed;
} stripe_t;

/* The first member of each typed build context, filled in by build_lattice. */
typedef struct {
    int32_t *entry_vertex;
    stripe_t *stripes;
} build_common_t;


typedef struct {
    build_t *b;
    stripe_t *stripes;
    int64_t **maps;
    int dp1;
} remap_ctx;

static void remap_range(void *vctx, int64_t s0, int64_t s1) {
    remap_ctx *x = (remap_ctx *)vctx;
    for (int64_t si = s0 + 1; si < s1 + 1; si++) {
        const stripe_t *st = &x->stripes[si];
        const int64_t *map = x->maps[si];
        int64_t end = st->end < x->b->n_real ? st->end : x->b->n_real;
        for (int64_t e = st->begin * x->dp1; e < end * x->dp1; e++)
            x->b->entry_vertex[e] = (int32_t)map[x->b->entry_vertex[e]];
    }
}

/* The type-independent part of lattice_build_*: stripes, parallel hashing, merge. */
static void *build_lattice(int64_t n, int64_t n_real, int d, int nthreads, range_fn stripe_fn,
                           void *ctx, int32_t *entry_vertex, int64_t *m_out) {
    const int dp1 = d + 1;
    int nstripes = nthreads;
    if (nstripes > MAX_THREADS) nstripes = MAX_THREADS;
    if (nstripes > n / 16384) nstripes = (int)(n / 16384);
    if (nstripes < 1) nstripes = 1;
    build_t *b = (build_t *)calloc(1, sizeof(build_t));
    stripe_t *stripes = (stripe_t *)calloc((size_t)nstripes, sizeof(stripe_t));
    int64_t **maps = (int64_t **)calloc((size_t)nstripes, sizeof(int64_t *));
    int ok = b && stripes && maps;
    if (ok) {
        b->n_real = n_real;
        b->entry_vertex = entry_vertex;
    }
    for (int si = 0; ok && si < nstripes; si++) {
        stripes[si].begin = n * si / nstripes;
        stripes[si].end = n * (si + 1) / nstripes;
        int64_t points = stripes[si].end - stripes[si].begin;
        if (table_init(&stripes[si].table, d, points * dp1 / 32 + 64) != 0) ok = 0;
    }
    if (ok) {
        ((build_common_t *)ctx)->entry_vertex = b->entry_vertex;
        ((build_common_t *)ctx)->stripes = stripes;
        parallel_for(nstripes, nstripes, 1, stripe_fn, ctx);
        for (int si = 0; si < nstripes; si++)
            if (stripes[si].failed) ok = 0;
    }
    if (ok) {
        /* merge: stripe 0's table becomes the lattice's; later stripes' vertices are looked
         * up (and appended when new) in stripe order */
        b->table = stripes[0].table;
        memset(&stripes[0].table, 0, sizeof(table_t));
        for (int si = 1; ok && si < nstripes; si++) {
            table_t *t = &stripes[si].table;
            maps[si] = (int64_t *)malloc(sizeof(int64_t) * (size_t)(t->m + 1));
            if (!maps[si]) {
                ok = 0;
                break;
            }
            for (int64_t v = 0; v < t->m; v++) {
                const int32_t *key = t->keys + v * d;
                maps[si][v] = table_find(&b->table, key, hash_key(key, d), 1);
                if (maps[si][v] < 0) ok = 0;
            }
            table_free(t);
        }
        if (b->table.failed) ok = 0;
    }
    if (ok && nstripes > 1) {
        remap_ctx rc = {b, stripes, maps, dp1};
        parallel_for(nstripes - 1, nthreads, 1, remap_range, &rc);
    }
    for (int si = 0; stripes && si < nstripes; si++) {
        table_free(&stripes[si].table);
        if (maps) free(maps[si]);
    }
    free(stripes);
    free(maps);
    if (!ok) {
        lattice_free(b);
        return NULL;
    }
    *m_out = b->table.m;
    return b;
}
