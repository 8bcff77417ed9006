/* Compiled CPU kernel for deepcrf's permutohedral lattice (optional; see deepcrf/ops/native.py).
 *
 * The PyTorch code in deepcrf/ops/permutohedral.py is the reference and the fallback: this file
 * computes exactly the same index arrays (slice entries, blur neighbours) and the same
 * filter  out = base + alpha * post . (scale * S^T B_d ... B_0 S (pre . values)),  so that a
 * lattice built here can be filtered by either path and vice versa.
 *
 *  - build: elevation, rounding, rank and barycentric weights of every point in registers, and
 *    the d+1 simplex vertices inserted into an open-addressing hash table (one pass over the
 *    points, no sort; one stripe of points per thread, merged in order).  The float arithmetic
 *    is the PyTorch path's, step by step (compile with -ffp-contract=off), so rounding decisions
 *    are the same.
 *  - filter (filter_sum): splat pixel-major into one vertex buffer per thread (no atomics),
 *    summed, d+1 double-buffered blurs, slice fused with the per-point scales, an optional
 *    "base + alpha *" accumulation and softmax.
 *  - fused mean field (meanfield_f32): the whole Potts mean-field loop in one call, one pass
 *    over the points per iteration; its vertex buffers are kept between calls (workspace).
 *    Optionally several runs side by side that share the kernels (label blocks, each with its
 *    own softmax and per-label term weights: a sweep over kernel weights).
 *  - softmax over the last axis of an (N, C) array.
 *
 * Threads: plain pthreads (torch's OpenMP pool is left alone), forked per call; the fused mean
 * field keeps one team for the whole call, synchronised by a spinning barrier.
 * The build, filter and softmax are generated for float and double (suffix _f32 / _f64).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_THREADS 64
#define SOFTMAX_BLOCK 32 /* rows normalised together (a few KB: stays in L1) */

/* Cumulative seconds, for profiling by hand (read with ctypes; docs/densecrf.md):
 * lattice_filter_sum adds its splat, reduce + blur and slice times to [0], [1], [2];
 * lattice_meanfield adds thread 0's pixel passes to [0] and the rest (waiting + blurs) to [1]. */
double lattice_profile[3];

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------ parallel for */
typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t begin, end;
} task_t;

static void *run_task(void *arg) {
    task_t *t = (task_t *)arg;
    t->fn(t->ctx, t->begin, t->end);
    return NULL;
}

/* Run fn over [0, n) split into nthreads contiguous ranges of at least `grain` items. */
static void parallel_for(int64_t n, int nthreads, int64_t grain, range_fn fn, void *ctx) {
    if (n <= 0) return;
    int64_t most = n / (grain > 0 ? grain : 1);
    if (nthreads > most) nthreads = (int)most;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS];
    task_t tasks[MAX_THREADS];
    for (int i = 0; i < nthreads; i++) {
        tasks[i].fn = fn;
        tasks[i].ctx = ctx;
        tasks[i].begin = n * i / nthreads;
        tasks[i].end = n * (i + 1) / nthreads;
    }
    for (int i = 1; i < nthreads; i++) {
        started[i] = pthread_create(&threads[i], NULL, run_task, &tasks[i]) == 0;
        if (!started[i]) run_task(&tasks[i]); /* no thread: do it here */
    }
    run_task(&tasks[0]);
    for (int i = 1; i < nthreads; i++)
        if (started[i]) pthread_join(threads[i], NULL);
}

/* ------------------------------------------------------------------ hash table of keys */
/* A vertex key is (r, q_0 .. q_{d-1}) stored as the d lattice coordinates (d+1) q_i + r
 * (densecrf's keys; the last coordinate is implied because they sum to zero). */
typedef struct {
    int d;
    int64_t m, cap_keys; /* vertices, capacity of `keys` (in vertices) */
    int32_t *keys;       /* m * d */
    int64_t *slots;      /* hash slots: vertex index or -1 */
    int64_t nslots;      /* a power of two */
    int failed;
} table_t;

static inline int keys_equal(const int32_t *a, const int32_t *b, int d) {
    for (int i = 0; i < d; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

static inline uint64_t hash_key(const int32_t *k, int d) {
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < d; i++) {
        h ^= (uint64_t)(uint32_t)k[i];
        h *= 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
    }
    h ^= h >> 29;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 32;
    return h;
}

static inline int64_t slot_entry(uint64_t hash, int64_t vertex) {
    return (int64_t)(((hash >> 33) << 32) | (uint64_t)vertex);
}

static int table_init(table_t *t, int d, int64_t expected) {
    t->d = d;
    t->m = 0;
    t->failed = 0;
    t->cap_keys = expected > 16 ? expected : 16;
    t->nslots = 32;
    while (t->nslots < 2 * t->cap_keys) t->nslots *= 2;
    t->keys = (int32_t *)malloc(sizeof(int32_t) * (size_t)(t->cap_keys * (d > 0 ? d : 1)));
    t->slots = (int64_t *)malloc(sizeof(int64_t) * (size_t)t->nslots);
    if (!t->keys || !t->slots) return -1;
    memset(t->slots, 0xFF, sizeof(int64_t) * (size_t)t->nslots);
    return 0;
}

static void table_free(table_t *t) {
    free(t->keys);
    free(t->slots);
    t->keys = NULL;
    t->slots = NULL;
}

/* Start loading the slot where the look-up of a key with hash h begins (look-ups of
 * unrelated keys then wait for memory together, not one after another). */
static inline void table_prefetch(const table_t *t, uint64_t h) {
    __builtin_prefetch(&t->slots[h & (uint64_t)(t->nslots - 1)]);
}

static int table_grow(table_t *t) {
    int d = t->d;
    int64_t nslots = t->nslots * 2;
    int64_t *slots = (int64_t *)malloc(sizeof(int64_t) * (size_t)nslots);
    if (!slots) return -1;
    memset(slots, 0xFF, sizeof(int64_t) * (size_t)nslots);
    for (int64_t v = 0; v < t->m; v++) {
        uint64_t h = hash_key(t->keys + v * d, d);
        uint64_t s = h & (uint64_t)(nslots - 1);
        while (slots[s] >= 0) s = (s + 1) & (uint64_t)(nslots - 1);
        slots[s] = slot_entry(h, v);
    }
    free(t->slots);
    t->slots = slots;
    t->nslots = nslots;
    return 0;
}

/* Index of `key` (inserting it when `insert`), or -1 when absent / on allocation failure;
 * h = hash_key(key).  A slot holds the vertex index in its low 32 bits and 31 more bits of
 * the key's hash above them, so most mismatches are rejected without reading the key itself. */
static int64_t table_find(table_t *t, const int32_t *key, uint64_t h, int insert) {
    int d = t->d;
    uint64_t mask = (uint64_t)(t->nslots - 1);
    uint64_t s = h & mask;
    const int64_t tag = slot_entry(h, 0);
    for (;;) {
        int64_t e = t->slots[s];
        if (e < 0) break;
        if ((e & ~(int64_t)0xFFFFFFFF) == tag) {
            int64_t v = e & 0xFFFFFFFF;
            if (keys_equal(t->keys + v * d, key, d)) return v;
        }
        s = (s + 1) & mask;
    }
    if (!insert) return -1;
    if (t->m >= t->cap_keys) {
        int64_t cap = t->cap_keys * 2;
        int32_t *keys = (int32_t *)realloc(t->keys, sizeof(int32_t) * (size_t)(cap * (d > 0 ? d : 1)));
        if (!keys) {
            t->failed = 1;
            return -1;
        }
        t->keys = keys;
        t->cap_keys = cap;
    }
    int64_t v = t->m++;
    memcpy(t->keys + v * d, key, sizeof(int32_t) * (size_t)d);
    t->slots[s] = slot_entry(h, v);
    if (2 * t->m > t->nslots && table_grow(t) != 0) t->failed = 1;
    return v;
}

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

/* The per-stripe hashing of lattice_build_*, once with d a run-time value and once per common
 * d as a compile-time constant (its loops then unroll: ~30% faster for d = 5). */
#define DEFINE_BUILD_STRIPE(T, SUF, ROUND, NAME, DVAL)                                            \
    static void NAME(void *vctx, int64_t s0, int64_t s1) {                                        \
        build_ctx_##SUF *x = (build_ctx_##SUF *)vctx;                                             \
        const int d = DVAL, dp1 = d + 1;                                                          \
        const int64_t n_real = x->n_real;                                                         \
        const T *features = x->features;                                                          \
        const double *scale_in = x->scale_in;                                                     \
        const double feature_scale = x->feature_scale;                                            \
        for (int64_t si = s0; si < s1; si++) {                                                    \
            stripe_t *st = &x->common.stripes[si];                                                \
            T *work = (T *)malloc(sizeof(T) * (size_t)(5 * dp1 + 8));                             \
            int *rank = (int *)malloc(sizeof(int) * (size_t)(2 * dp1 + 2));                       \
            int32_t *key = (int32_t *)malloc(sizeof(int32_t) * (size_t)(d + 1));                  \
            /* the previous point's d+1 keys and vertices: neighbouring pixels share many */      \
            int32_t *prev_key = (int32_t *)malloc(sizeof(int32_t) * (size_t)(dp1 * d + 1));       \
            int64_t *prev_vert = (int64_t *)malloc(sizeof(int64_t) * (size_t)dp1);                \
            if (!work || !rank || !key || !prev_key || !prev_vert) st->failed = 1;                \
            for (int r = 0; prev_vert && r < dp1; r++) prev_vert[r] = -1;                         \
            T *elevated = work, *v = work ? work + dp1 : NULL;                                    \
            T *bary = work ? work + 2 * dp1 : NULL;                                               \
            const T inv_dp1 = (T)x->inv_dp1_in, fscale = (T)feature_scale, tdp1 = (T)dp1;         \
            for (int64_t p = st->begin; p < st->end && !st->failed; p++) {                        \
                const T *f = features + p * d;                                                    \
                T sm = 0;                                                                         \
                for (int j = d; j > 0; j--) {                                                     \
                    T xf = feature_scale != 1.0 ? f[j - 1] * fscale : f[j - 1];                   \
                    T cf = xf * (T)scale_in[j - 1];                                               \
                    T jcf = (T)j * cf;                                                            \
                    elevated[j] = sm - jcf;                                                       \
                    sm += cf;                                                                     \
                }                                                                                 \
                elevated[0] = sm;                                                                 \
                T vsum = 0;                                                                       \
                for (int i = 0; i <= d; i++) {                                                    \
                    T s = elevated[i] * inv_dp1;                                                  \
                    v[i] = ROUND(s);                                                              \
                    vsum += v[i];                                                                 \
                    rank[i] = 0;                                                                  \
                }                                                                                 \
                for (int i = 0; i < d; i++) {                                                     \
                    T di = elevated[i] - v[i] * tdp1;                                             \
                    for (int j = i + 1; j <= d; j++) {                                            \
                        T dj = elevated[j] - v[j] * tdp1;                                         \
                        int lt = di < dj;                                                         \
                        rank[i] += lt;                                                            \
                        rank[j] += 1 - lt;                                                        \
                    }                                                                             \
                }                                                                                 \
                int isum = (int)vsum;                                                             \
                for (int i = 0; i <= d; i++) {                                                    \
                    int r = rank[i] + isum;                                                       \
                    int shift = (r < 0) - (r > d);                                                \
                    rank[i] = r + dp1 * shift;                                                    \
                    v[i] += (T)shift;                                                             \
                }                                                                                 \
                bary[d + 1] = 0;                                                                  \
                for (int k = 0; k <= d; k++) bary[k] = 0;                                         \
                for (int i = 0; i <= d; i++) {                                                    \
                    T bw = (elevated[i] - v[i] * tdp1) * inv_dp1;                                 \
                    bary[d - rank[i]] += bw;                                                      \
                }                                                                                 \
                for (int i = 0; i <= d; i++) {                                                    \
                    T bw = (elevated[i] - v[i] * tdp1) * inv_dp1;                                 \
                    bary[d - rank[i] + 1] -= bw;                                                  \
                }                                                                                 \
                bary[0] += (T)1 + bary[d + 1];                                                    \
                for (int r = 0; r <= d; r++) {                                                    \
                    int32_t *pk = prev_key + r * d;                                               \
                    for (int i = 0; i < d; i++)                                                   \
                        key[i] = (int32_t)v[i] * dp1 + r - (rank[i] > d - r ? dp1 : 0);           \
                    int64_t vert = prev_vert[r];                                                  \
                    if (vert < 0 || !keys_equal(pk, key, d)) {                                    \
                        vert = table_find(&st->table, key, hash_key(key, d), 1);                  \
                        for (int i = 0; i < d; i++) pk[i] = key[i];                               \
                        prev_vert[r] = vert;                                                      \
                    }                                                                             \
                    if (vert < 0) {                                                               \
                        st->failed = 1;                                                           \
                        break;                                                                    \
                    }                                                                             \
                    if (p < n_real) {                                                             \
                        x->common.entry_vertex[p * dp1 + r] = (int32_t)vert;                      \
                        x->entry_weight[p * dp1 + r] = bary[r];                                   \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            if (st->table.failed) st->failed = 1;                                                 \
            free(work); free(rank); free(key); free(prev_key); free(prev_vert);                   \
        }                                                                                         \
    }

#define DEFINE_BUILD(T, SUF, ROUND)                                                               \
    typedef struct {                                                                              \
        build_common_t common;                                                                    \
        const T *features;                                                                        \
        int64_t n_real;                                                                           \
        int d;                                                                                    \
        const double *scale_in;                                                                   \
        double feature_scale, inv_dp1_in;                                                         \
        T *entry_weight;                                                                          \
    } build_ctx_##SUF;                                                                            \
                                                                                                  \
    DEFINE_BUILD_STRIPE(T, SUF, ROUND, build_stripe_##SUF, x->d)                                  \
    DEFINE_BUILD_STRIPE(T, SUF, ROUND, build_stripe2_##SUF, 2)                                    \
    DEFINE_BUILD_STRIPE(T, SUF, ROUND, build_stripe3_##SUF, 3)                                    \
    DEFINE_BUILD_STRIPE(T, SUF, ROUND, build_stripe4_##SUF, 4)                                    \
    DEFINE_BUILD_STRIPE(T, SUF, ROUND, build_stripe5_##SUF, 5)                                    \
                                                                                                  \
    void *lattice_build_##SUF(const T *features, int64_t n, int64_t n_real, int d,                \
                              const double *scale_in, double feature_scale, double inv_dp1_in,    \
                              T *entry_weight, int32_t *entry_vertex, int64_t *m_out,             \
                              int nthreads) {                                                     \
        build_ctx_##SUF x = {{NULL, NULL}, features, n_real, d, scale_in, feature_scale,          \
                             inv_dp1_in, entry_weight};                                           \
        range_fn stripe = d == 2   ? build_stripe2_##SUF                                          \
                          : d == 3 ? build_stripe3_##SUF                                          \
                          : d == 4 ? build_stripe4_##SUF                                          \
                          : d == 5 ? build_stripe5_##SUF                                          \
                                   : build_stripe_##SUF;                                          \
        return build_lattice(n, n_real, d, nthreads, stripe, &x, entry_vertex,                    \
                             m_out);                                                              \
    }

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

/* ------------------------------------------------------------------ filtering */
#define DEFINE_FILTER(T, SUF)                                                                     \
    typedef struct {                                                                              \
        int64_t nparts;                                                                           \
        T **dsts;                                                                                 \
    } reduce_ctx_##SUF;                                                                           \
                                                                                                  \
    static void reduce_range_##SUF(void *vctx, int64_t begin, int64_t end) {                      \
        reduce_ctx_##SUF *x = (reduce_ctx_##SUF *)vctx;                                           \
        T *restrict acc = x->dsts[0];                                                             \
        for (int64_t part = 1; part < x->nparts; part++) {                                        \
            const T *restrict add = x->dsts[part];                                                \
            for (int64_t i = begin; i < end; i++) acc[i] += add[i];                               \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    typedef struct {                                                                              \
        int64_t c;                                                                                \
        const int32_t *nbr;                                                                       \
        const T *src;                                                                             \
        T *dst;                                                                                   \
    } blur_ctx_##SUF;                                                                             \
                                                                                                  \
    static void blur_range_##SUF(void *vctx, int64_t begin, int64_t end) {                        \
        blur_ctx_##SUF *x = (blur_ctx_##SUF *)vctx;                                               \
        const int64_t c = x->c;                                                                   \
        const T half = (T)0.5;                                                                    \
        for (int64_t v = begin; v < end; v++) {                                                   \
            const T *restrict self = x->src + (int64_t)x->nbr[3 * v] * c;                         \
            const T *restrict a = x->src + (int64_t)x->nbr[3 * v + 1] * c;                        \
            const T *restrict b = x->src + (int64_t)x->nbr[3 * v + 2] * c;                        \
            T *restrict out = x->dst + v * c;                                                     \
            for (int64_t k = 0; k < c; k++) out[k] = self[k] + half * (a[k] + b[k]);              \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \

/* ------------------------------------------------------------------ softmax */
/* Rows are short (one entry per label): the maximum and the sum use four running partial
 * results, so they are not one long chain of dependent additions. */
#define DEFINE_SOFTMAX(T, SUF, EXP)                                                               \
    static inline void softmax_shift_##SUF(T *restrict row, int64_t c) {                          \
        T m0 = row[0], m1 = row[0], m2 = row[0], m3 = row[0];                                     \
        int64_t k = 0;                                                                            \
        for (; k + 4 <= c; k += 4) {                                                              \
            m0 = row[k] > m0 ? row[k] : m0;                                                       \
            m1 = row[k + 1] > m1 ? row[k + 1] : m1;                                               \
            m2 = row[k + 2] > m2 ? row[k + 2] : m2;                                               \
            m3 = row[k + 3] > m3 ? row[k + 3] : m3;                                               \
        }                                                                                         \
        for (; k < c; k++) m0 = row[k] > m0 ? row[k] : m0;                                        \
        m0 = m1 > m0 ? m1 : m0;                                                                   \
        m2 = m3 > m2 ? m3 : m2;                                                                   \
        const T mx = m2 > m0 ? m2 : m0;                                                           \
        for (k = 0; k < c; k++) row[k] -= mx;                                                     \
    }                                                                                             \
                                                                                                  \
    static inline void softmax_normalize_##SUF(T *restrict row, int64_t c) {                      \
        int64_t k;                                                                                \
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                         \
        for (k = 0; k + 4 <= c; k += 4) {                                                         \
            s0 += row[k];                                                                         \
            s1 += row[k + 1];                                                                     \
            s2 += row[k + 2];                                                                     \
            s3 += row[k + 3];                                                                     \
        }                                                                                         \
        for (; k < c; k++) s0 += row[k];                                                          \
        const T inv = (T)1 / ((s0 + s1) + (s2 + s3));                                             \
        for (k = 0; k < c; k++) row[k] *= inv;                                                    \
    }                                                                                             \
                                                                                                  \
    /* softmax of `nrows` consecutive rows in place: the exponentials run as one long loop */     \
    static inline void softmax_block_##SUF(T *restrict rows, int64_t nrows, int64_t c) {          \
        for (int64_t r = 0; r < nrows; r++) softmax_shift_##SUF(rows + r * c, c);                 \
        for (int64_t k = 0; k < nrows * c; k++) rows[k] = EXP(rows[k]);                           \
        for (int64_t r = 0; r < nrows; r++) softmax_normalize_##SUF(rows + r * c, c);             \
    }                                                                                             \
                                                                                                  \
    typedef struct {                                                                              \
        int64_t c;                                                                                \
        const T *x;                                                                               \
        T *out;                                                                                   \
    } softmax_ctx_##SUF;                                                                          \
                                                                                                  \
    static void softmax_range_##SUF(void *vctx, int64_t begin, int64_t end) {                     \
        softmax_ctx_##SUF *s = (softmax_ctx_##SUF *)vctx;                                         \
        const int64_t c = s->c;                                                                   \
        for (int64_t p = begin; p < end; p += SOFTMAX_BLOCK) {                                    \
            int64_t rows = end - p < SOFTMAX_BLOCK ? end - p : SOFTMAX_BLOCK;                     \
            if (s->out != s->x)                                                                   \
                memcpy(s->out + p * c, s->x + p * c, sizeof(T) * (size_t)(rows * c));             \
            softmax_block_##SUF(s->out + p * c, rows, c);                                         \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    /* out = softmax(x) along the last axis of (n, c); out may alias x. */                        \
    void softmax_rows_##SUF(int64_t n, int64_t c, const T *x, T *out, int nthreads) {             \
        softmax_ctx_##SUF s = {c, x, out};                                                        \
        parallel_for(n, nthreads, 4096, softmax_range_##SUF, &s);                                 \
    }

/* ------------------------------------------------------------------ fused sum of filters */
/* out = base + sum_t coef_t * post_t . (S_t^T B_t S_t (pre_t . values)) over several lattices
 * built on the same points (a mean-field update's messages), optionally followed by a softmax
 * of each output row: values are read once for every lattice's splat, and each output row is
 * written once, while it is in cache. */
#define DEFINE_FILTER_SUM(T, SUF)                                                                 \
    typedef struct {                                                                              \
        int64_t n, c, nparts;                                                                     \
        int nterms;                                                                               \
        const int64_t *m;                                                                         \
        const int *dp1;                                                                           \
        const int32_t *const *vert;                                                               \
        const T *const *w;                                                                        \
        const T *const *pre;                                                                      \
        const T *values;                                                                          \
        T *const *part0;                                                                          \
        T *const *scratch;                                                                        \
    } sum_scatter_ctx_##SUF;                                                                      \
                                                                                                  \
    static void sum_scatter_part_##SUF(void *vctx, int64_t begin, int64_t end) {                  \
        sum_scatter_ctx_##SUF *x = (sum_scatter_ctx_##SUF *)vctx;                                 \
        const int64_t c = x->c;                                                                   \
        T *dst[16];                                                                               \
        for (int64_t part = begin; part < end; part++) {                                          \
            for (int t = 0; t < x->nterms; t++) {                                                 \
                dst[t] = part == 0 ? x->part0[t] : x->scratch[t] + (part - 1) * x->m[t] * c;      \
                memset(dst[t], 0, sizeof(T) * (size_t)(x->m[t] * c));                             \
            }                                                                                     \
            int64_t p0 = x->n * part / x->nparts, p1 = x->n * (part + 1) / x->nparts;             \
            for (int64_t p = p0; p < p1; p++) {                                                   \
                const T *restrict row = x->values + p * c;                                        \
                for (int t = 0; t < x->nterms; t++) {                                             \
                    const int dp1 = x->dp1[t];                                                    \
                    const int32_t *vs = x->vert[t] + p * dp1;                                     \
                    const T *ws = x->w[t] + p * dp1;                                              \
                    T s = x->pre[t] ? x->pre[t][p] : (T)1;                                        \
                    if (c == 1) { /* one channel (e.g. the normalisation): no row loop */         \
                        for (int j = 0; j < dp1; j++) dst[t][vs[j]] += ws[j] * s * row[0];        \
                        continue;                                                                 \
                    }                                                                             \
                    for (int j = 0; j < dp1; j++) {                                               \
                        T *restrict acc = dst[t] + (int64_t)vs[j] * c;                            \
                        T wj = ws[j] * s;                                                         \
                        for (int64_t k = 0; k < c; k++) acc[k] += wj * row[k];                    \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    typedef struct {                                                                              \
        int64_t c;                                                                                \
        int nterms, softmax;                                                                      \
        const int *dp1;                                                                           \
        const int32_t *const *vert;                                                               \
        const T *const *w;                                                                        \
        const T *const *post;                                                                     \
        const T *const *src;                                                                      \
        const double *coef;                                                                       \
        const T *base;                                                                            \
        T *out;                                                                                   \
    } sum_slice_ctx_##SUF;                                                                        \
                                                                                                  \
    static void sum_slice_range_##SUF(void *vctx, int64_t begin, int64_t end) {                   \
        sum_slice_ctx_##SUF *x = (sum_slice_ctx_##SUF *)vctx;                                     \
        const int64_t c = x->c;                                                                   \
        for (int64_t p = begin; p < end; p++) {                                                   \
            T *restrict out = x->out + p * c;                                                     \
            if (x->base) {                                                                        \
                const T *restrict base = x->base + p * c;                                         \
                for (int64_t k = 0; k < c; k++) out[k] = base[k];                                 \
            } else {                                                                              \
                for (int64_t k = 0; k < c; k++) out[k] = 0;                                       \
            }                                                                                     \
            for (int t = 0; t < x->nterms; t++) {                                                 \
                const int dp1 = x->dp1[t];                                                        \
                const int32_t *vs = x->vert[t] + p * dp1;                                         \
                const T *ws = x->w[t] + p * dp1;                                                  \
                T f = (T)x->coef[t];                                                              \
                if (x->post[t]) f *= x->post[t][p];                                               \
                if (c == 1) {                                                                     \
                    for (int j = 0; j < dp1; j++) out[0] += ws[j] * f * x->src[t][vs[j]];         \
                    continue;                                                                     \
                }                                                                                 \
                for (int j = 0; j < dp1; j++) {                                                   \
                    const T *restrict r = x->src[t] + (int64_t)vs[j] * c;                         \
                    T wj = ws[j] * f;                                                             \
                    for (int64_t k = 0; k < c; k++) out[k] += wj * r[k];                          \
                }                                                                                 \
            }                                                                                     \
            if (x->softmax && ((p + 1 - begin) % SOFTMAX_BLOCK == 0 || p + 1 == end)) {           \
                int64_t rows = (p + 1 - begin) % SOFTMAX_BLOCK;                                   \
                if (rows == 0) rows = SOFTMAX_BLOCK;                                              \
                softmax_block_##SUF(x->out + (p + 1 - rows) * c, rows, c);                        \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    /* nterms <= 16 lattices over the same n points.  Per term t: m[t] vertices, dp1[t], slice    \
     * arrays vert[t]/w[t] (n * dp1[t]), blur_col[t] (dp1[t], 3 m[t]), pre[t]/post[t] (n or       \
     * NULL), coef[t] (times the output scale), buf_a[t], buf_b[t] ((m[t]+1) * c) and             \
     * scratch[t] ((nparts-1) * m[t] * c).  out may alias base, not values.  `transpose`          \
     * applies every term's blurs in reverse order (the transposed filter). */                    \
    int lattice_filter_sum_##SUF(int64_t n, int64_t c, int nterms, const int64_t *m,              \
                                 const int *dp1, const int32_t *const *vert, const T *const *w,   \
                                 const int32_t *const *blur_col, const T *const *pre,             \
                                 const T *const *post, const double *coef, const T *values,       \
                                 const T *base, T *out, T *const *buf_a, T *const *buf_b,         \
                                 T *const *scratch, int nparts, int softmax, int transpose,       \
                                 int nthreads) {                                                  \
        if (nterms < 1 || nterms > 16) return -1;                                                 \
        if (nparts < 1) nparts = 1;                                                               \
        if (nparts > MAX_THREADS) nparts = MAX_THREADS;                                           \
        const T *src[16];                                                                         \
        double t0 = now_seconds();                                                                \
        sum_scatter_ctx_##SUF sc = {n, c, nparts, nterms, m, dp1, vert, w, pre, values,           \
                                    buf_a, scratch};                                              \
        parallel_for(nparts, nparts, 1, sum_scatter_part_##SUF, &sc);                             \
        double t1 = now_seconds();                                                                \
        for (int t = 0; t < nterms; t++) {                                                        \
            T *dsts[MAX_THREADS];                                                                 \
            dsts[0] = buf_a[t];                                                                   \
            for (int i = 1; i < nparts; i++) dsts[i] = scratch[t] + (int64_t)(i - 1) * m[t] * c;  \
            reduce_ctx_##SUF rc = {nparts, dsts};                                                 \
            if (nparts > 1) parallel_for(m[t] * c, nthreads, 65536, reduce_range_##SUF, &rc);     \
            memset(buf_a[t] + m[t] * c, 0, sizeof(T) * (size_t)c);                                \
            memset(buf_b[t] + m[t] * c, 0, sizeof(T) * (size_t)c);                                \
            T *a = buf_a[t], *b = buf_b[t];                                                       \
            for (int i = 0; i < dp1[t]; i++) {                                                    \
                int j = transpose ? dp1[t] - 1 - i : i;                                           \
                blur_ctx_##SUF bl = {c, blur_col[t] + (int64_t)j * 3 * m[t], a, b};               \
                parallel_for(m[t], nthreads, 4096, blur_range_##SUF, &bl);                        \
                T *tmp = a; a = b; b = tmp;                                                       \
            }                                                                                     \
            src[t] = a;                                                                           \
        }                                                                                         \
        double t2 = now_seconds();                                                                \
        sum_slice_ctx_##SUF sl = {c, nterms, softmax, dp1, vert, w, post, src, coef, base, out};  \
        parallel_for(n, nthreads, 4096, sum_slice_range_##SUF, &sl);                              \
        double t3 = now_seconds();                                                                \
        lattice_profile[0] += t1 - t0;                                                            \
        lattice_profile[1] += t2 - t1;                                                            \
        lattice_profile[2] += t3 - t2;                                                            \
        return 0;                                                                                 \
    }

/* exp(x) for the softmax's x <= 0 (after subtracting the row maximum), vectorisable:
 * x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7,
 * about float32's own rounding), 2^n assembled in the exponent bits; x < -87 gives 0. */
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-06f;
    float xc = x < -87.0f ? -87.0f : x;
    float n = nearbyintf(xc * log2e);
    float r = (xc - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = ((int32_t)n + 127) << 23;
    float y = p * scale.f;
    return x < -87.0f ? 0.0f : y;
}

/* ------------------------------------------------------------------ workspace */
/* The fused mean field's vertex buffers (tens of MB) are kept for the next call, up to
 * WS_KEEP bytes: fresh memory costs a page fault per 4 KB page on first touch (~1.6 us each on
 * the development VM, ~10 ms per 500x375 call).  One block, used by one call at a time (a
 * concurrent call maps its own); lattice_release_workspace unmaps it.  It is not asked for
 * transparent huge pages: on the development VM their first touch cost more (direct
 * compaction, ~60 ms more for the first 500x375 call, also slowing the next huge-page user)
 * than the TLB misses they spare. */
#include <sys/mman.h>

#define WS_KEEP ((size_t)256 << 20)

typedef struct {
    void *raw; /* page-aligned (mmap) */
    size_t len;
} ws_block_t;

static pthread_mutex_t ws_lock = PTHREAD_MUTEX_INITIALIZER;
static ws_block_t ws_kept;

static void ws_unmap(ws_block_t *b) {
    if (b->raw) munmap(b->raw, b->len);
    b->raw = NULL;
    b->len = 0;
}

static float *ws_data(const ws_block_t *b) { return (float *)b->raw; }

static int ws_map(ws_block_t *b, size_t bytes) {
    size_t len = bytes > 0 ? bytes : 1;
    void *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return -1;
    b->raw = raw;
    b->len = len;
    return 0;
}

/* A block of at least `bytes` (page aligned) in *b; *kept says whether it is the kept one
 * (hand it back with ws_release) or the caller's own (ws_unmap it).  0, or -1 (no memory). */
static int ws_acquire(ws_block_t *b, size_t bytes, int *kept) {
    *kept = 0;
    if (bytes <= WS_KEEP && pthread_mutex_trylock(&ws_lock) == 0) {
        if (ws_kept.len < bytes) {
            ws_unmap(&ws_kept);
            if (ws_map(&ws_kept, bytes) != 0) {
                pthread_mutex_unlock(&ws_lock);
                return -1;
            }
        }
        *b = ws_kept;
        *kept = 1;
        return 0;
    }
    return ws_map(b, bytes);
}

static void ws_release(ws_block_t *b, int kept) {
    if (kept)
        pthread_mutex_unlock(&ws_lock);
    else
        ws_unmap(b);
}

/* Unmap the kept block (when no call is using it); returns the bytes released. */
int64_t lattice_release_workspace(void) {
    pthread_mutex_lock(&ws_lock);
    int64_t len = (int64_t)ws_kept.len;
    ws_unmap(&ws_kept);
    pthread_mutex_unlock(&ws_lock);
    return len;
}

/* ------------------------------------------------------------------ fused mean field */
/* A team of threads that lives for one call, synchronised by a spinning barrier (the phases
 * of a mean-field iteration are ~1 ms: forking threads per phase would cost more). */
#include <sched.h>
#include <stdatomic.h>

typedef struct {
    atomic_int count;
    atomic_int sense;
    int nthreads;
} barrier_t;

static void barrier_wait(barrier_t *b, int *local_sense) {
    *local_sense = !*local_sense;
    if (atomic_fetch_add(&b->count, 1) == b->nthreads - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->sense, *local_sense);
    } else {
        int spins = 0;
        while (atomic_load(&b->sense) != *local_sense)
            if (++spins > 2000) sched_yield();
    }
}

/* Q_{k+1} = softmax(base + sum_t coef_t post_t . S_t^T B_t S_t (pre_t . Q_k)), Q_0 =
 * softmax(base), for `iters` steps: the mean field of a dense CRF whose compatibilities are
 * Potts (folded into coef/post).  One pass over the points per iteration: each point's row is
 * sliced from every lattice, normalised, written, and splatted straight into the next
 * iteration's vertex buffers while its indices and weights are in cache.  Vertex rows are
 * CS floats (the label count rounded up; a compile-time constant, so every row operation is a
 * few full-width vector instructions on aligned memory).  Each thread splats its points (its
 * chunks, see MF_CHUNK) into its own buffer; the buffers are summed inside the first blur. */
typedef struct {
    int64_t n, c;
    int nterms, iters, nthreads;
    const int64_t *m;
    const int *dp1;
    const int32_t *const *vert;
    const float *const *w;
    const int32_t *const *blur_col;
    const float *const *pre;
    const float *const *post;
    const double *coef;
    /* NULL, or (nterms, CS) floats: term t's coefficient per label lane (times coef[t]) */
    const float *coefv;
    /* the softmax runs over each run of `group` consecutive lanes (0: the whole row) */
    int64_t group;
    const float *base;
    float *q;           /* Q_iters, or log Q_iters when log_out */
    float *const *hist; /* NULL, or iters pointers: Q_0 ... Q_{iters-1} are stored there */
    int log_out;
    /* linear: a plain filter, out = base + sum_t coef_t post_t . K_t(pre_t . values) (no
     * softmax; iters = 1, base may be NULL); transpose: each term's blurs in reverse order */
    int linear, transpose;
    const float *values;
    /* linear mode: when gram_left (n, c) is set, gram (nthreads, c, CS) receives per thread
     * sum_p left_p (outer) out_p, summed per chunk of points in float, over chunks in double */
    const float *gram_left;
    double *gram;
    float *const *bufs; /* per term: nthreads + 1 buffers of (m + 1) * CS floats, row m zero */
    int64_t cs;
    barrier_t barrier;
    atomic_int go; /* 0: wait, 1: run, -1: return (not every thread could be started) */
} mf_ctx;

typedef struct {
    mf_ctx *ctx;
    int id;
} mf_arg;

/* Rows of CS floats as CS/8 vectors of 8 (GCC/Clang vector extensions: explicit SIMD that
 * still compiles, as pairs of SSE registers, without AVX).  Vertex rows are 32-byte aligned. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f v8_splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* mask ? a : b lane by lane (C has no vector ?:; a comparison gives 0 / -1 per lane) */
static inline v8f v8_select(v8i mask, v8f a, v8f b) {
    return (v8f)((mask & (v8i)a) | (~mask & (v8i)b));
}

/* exp_nonpositive on 8 lanes (the same arithmetic: rounding by the 1.5 * 2^23 trick is
 * round-half-even, as nearbyintf in the default rounding mode). */
static inline v8f v8_exp_nonpositive(v8f x) {
    const v8f lo = v8_splat(-87.0f), magic = v8_splat(12582912.0f);
    v8f xc = v8_select(x < lo, lo, x);
    v8f n = (xc * v8_splat(1.44269504f) + magic) - magic;
    v8f r = (xc - n * v8_splat(0.693145752f)) - n * v8_splat(1.42860677e-06f);
    v8f p = v8_splat(1.0f / 720.0f);
    p = p * r + v8_splat(1.0f / 120.0f);
    p = p * r + v8_splat(1.0f / 24.0f);
    p = p * r + v8_splat(1.0f / 6.0f);
    p = p * r + v8_splat(0.5f);
    p = p * r + v8_splat(1.0f);
    p = p * r + v8_splat(1.0f);
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8f y = p * (v8f)bits;
    return v8_select(x < lo, v8_splat(0.0f), y);
}

static inline float v8_hmax(v8f x) {
    float m = x[0];
    for (int k = 1; k < 8; k++) m = x[k] > m ? x[k] : m;
    return m;
}

static inline float v8_hsum(v8f x) {
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

/* Unaligned 8-float vectors (rows of (n, c) arrays start at any float). */
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));

/* Row p of the (n, c) array `src` into nv vectors, lanes >= c zero.  Whole vectors are read
 * straight from memory, reading past the row's end into the next rows when those exist (the
 * extra lanes are then cleared); only the array's last rows go lane by lane. */
static inline void mf_load_row(v8f *row, int nv, const float *src, int64_t p, int64_t n,
                               int64_t c, const v8i *keep) {
    const float *s = src + p * c;
    if ((n - p) * c >= 8 * nv) {
        for (int u = 0; u < nv; u++)
            row[u] = v8_select(keep[u], *(const v8f_u *)(s + 8 * u), v8_splat(0.0f));
    } else {
        for (int u = 0; u < nv; u++)
            for (int k = 0; k < 8; k++) row[u][k] = 8 * u + k < c ? s[8 * u + k] : 0.0f;
    }
}

/* The first c lanes of row (nv vectors) into row p of the (n, c) array `dst`, whose rows
 * [p, end) this thread writes in increasing order.  Whole vectors are written when they stay
 * inside those rows (the zeros spilled into the start of the next rows are overwritten when
 * their turn comes); the last ones go lane by lane, so no thread writes another's rows. */
static inline void mf_store_row(const v8f *row, int nv, float *dst, int64_t p, int64_t end,
                                int64_t c) {
    float *d = dst + p * c;
    if ((end - p) * c >= 8 * nv) {
        for (int u = 0; u < nv; u++) *(v8f_u *)(d + 8 * u) = row[u];
    } else {
        for (int u = 0; u < nv; u++)
            for (int k = 0; k < 8 && 8 * u + k < c; k++) d[8 * u + k] = row[u][k];
    }
}

/* Label blocks of a grouped softmax (several mean fields that share their kernels run side by
 * side as label blocks of one row, each block its own softmax: a sweep over kernel weights):
 * block g covers lanes [g * group, (g + 1) * group), inside vectors u0 ... u1, where `mask`
 * selects its lanes. */
typedef struct {
    int u0, u1;
    v8i mask[6];
} mf_group_t;

static int mf_groups(mf_group_t *grp, int64_t c, int64_t group) {
    int ng = 0;
    for (int64_t lo = 0; lo < c; lo += group, ng++) {
        const int64_t hi = lo + group;
        grp[ng].u0 = (int)(lo >> 3);
        grp[ng].u1 = (int)((hi - 1) >> 3);
        for (int u = 0; u < 6; u++)
            for (int k = 0; k < 8; k++)
                grp[ng].mask[u][k] = 8 * u + k >= lo && 8 * u + k < hi ? -1 : 0;
    }
    return ng;
}

/* Sum and maximum of the 8 lanes by halving (three shuffles; the blocked softmax only). */
#if defined(__clang__)
#define V8_SWAP(x, a, b, c, d, e, f, g, h) __builtin_shufflevector(x, x, a, b, c, d, e, f, g, h)
#else
#define V8_SWAP(x, a, b, c, d, e, f, g, h) __builtin_shuffle(x, (v8i){a, b, c, d, e, f, g, h})
#endif
static inline float v8_sum_tree(v8f x) {
    x += V8_SWAP(x, 4, 5, 6, 7, 0, 1, 2, 3);
    x += V8_SWAP(x, 2, 3, 0, 1, 6, 7, 4, 5);
    x += V8_SWAP(x, 1, 0, 3, 2, 5, 4, 7, 6);
    return x[0];
}

static inline float v8_max_tree(v8f x) {
    v8f y = V8_SWAP(x, 4, 5, 6, 7, 0, 1, 2, 3);
    x = v8_select(y > x, y, x);
    y = V8_SWAP(x, 2, 3, 0, 1, 6, 7, 4, 5);
    x = v8_select(y > x, y, x);
    y = V8_SWAP(x, 1, 0, 3, 2, 5, 4, 7, 6);
    x = v8_select(y > x, y, x);
    return x[0];
}

/* The softmax of each block of a row of nv vectors (lanes >= c come out 0): row <- exp(row -
 * m_g) / sum_g, and, when lse is not NULL, lse <- m_g + log sum_g per lane (what log Q
 * subtracts from the logits).  All in vector registers: masked reductions per block.  The
 * shift m_g is the row's maximum for every block (one reduction), unless a block's sum then
 * falls below 1e-30 (its logits more than ~69 below the row's maximum: exp would lose its
 * precision or underflow); such a row is redone with each block's own maximum. */
__attribute__((always_inline)) static inline void mf_group_softmax(v8f *row, int nv, int ng,
                                                                   const mf_group_t *grp,
                                                                   const v8i *keep, v8f *lse) {
    const v8f zero = v8_splat(0.0f), low = v8_splat(-INFINITY);
    v8f shift[6], scale[6], orig[6];
    float mx[48], sums[48];
    v8f mv = low;
    for (int u = 0; u < nv; u++) {
        orig[u] = row[u];
        const v8f y = v8_select(keep[u], row[u], low);
        mv = v8_select(y > mv, y, mv);
    }
    const float rmax = v8_max_tree(mv);
    float smallest = INFINITY;
    for (int u = 0; u < nv; u++)
        row[u] = v8_select(keep[u], v8_exp_nonpositive(row[u] - v8_splat(rmax)), zero);
    for (int g = 0; g < ng; g++) {
        v8f sv = zero;
        for (int u = grp[g].u0; u <= grp[g].u1; u++) sv += v8_select(grp[g].mask[u], row[u], zero);
        sums[g] = v8_sum_tree(sv);
        mx[g] = rmax;
        smallest = sums[g] < smallest ? sums[g] : smallest;
    }
    if (!(smallest >= 1e-30f)) { /* a block far below the row's maximum (or NaN): per block */
        for (int u = 0; u < nv; u++) shift[u] = zero;
        for (int g = 0; g < ng; g++) {
            v8f bm = low;
            for (int u = grp[g].u0; u <= grp[g].u1; u++) {
                const v8f y = v8_select(grp[g].mask[u], orig[u], low);
                bm = v8_select(y > bm, y, bm);
            }
            mx[g] = v8_max_tree(bm);
            for (int u = grp[g].u0; u <= grp[g].u1; u++)
                shift[u] = v8_select(grp[g].mask[u], v8_splat(mx[g]), shift[u]);
        }
        for (int u = 0; u < nv; u++)
            row[u] = v8_select(keep[u], v8_exp_nonpositive(orig[u] - shift[u]), zero);
        for (int g = 0; g < ng; g++) {
            v8f sv = zero;
            for (int u = grp[g].u0; u <= grp[g].u1; u++)
                sv += v8_select(grp[g].mask[u], row[u], zero);
            sums[g] = v8_sum_tree(sv);
        }
    }
    for (int u = 0; u < nv; u++) scale[u] = zero;
    if (lse)
        for (int u = 0; u < nv; u++) lse[u] = zero;
    for (int g = 0; g < ng; g++) {
        const v8f inv = v8_splat(1.0f / sums[g]);
        for (int u = grp[g].u0; u <= grp[g].u1; u++) {
            scale[u] = v8_select(grp[g].mask[u], inv, scale[u]);
            if (lse) lse[u] = v8_select(grp[g].mask[u], v8_splat(mx[g] + logf(sums[g])), lse[u]);
        }
    }
    for (int u = 0; u < nv; u++) row[u] *= scale[u];
}

#define MF_BLOCK 8
/* Thread i takes the chunks of MF_CHUNK consecutive points i, i + T, i + 2T, ...: a fixed
 * assignment (so the per-thread sums, and the result, do not depend on timing) that still
 * gives every thread a share of each part of the image (halves of a photo can differ in cost
 * by 15%: sky and grass). */
#define MF_CHUNK 4096
/* The mean-field loop may fuse multiply-adds (the file is compiled with -ffp-contract=off so
 * that the build's rounding is the PyTorch path's bit for bit; here results are compared with
 * a tolerance, and the slice/splat accumulations are a third fewer instructions). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

#define DEFINE_MEANFIELD(CS)                                                                      \
    enum { NV_##CS = CS / 8 };                                                                    \
    static void mf_blur_##CS(const int32_t *restrict nbr, float *const *srcs, int nsrc,           \
                             float *restrict dst, int64_t v0, int64_t v1) {                       \
        for (int64_t v = v0; v < v1; v++) {                                                       \
            const int64_t s = (int64_t)nbr[3 * v] * CS, a = (int64_t)nbr[3 * v + 1] * CS,         \
                          b = (int64_t)nbr[3 * v + 2] * CS;                                       \
            const v8f *x = (const v8f *)srcs[0];                                                  \
            v8f vs[NV_##CS], va[NV_##CS], vb[NV_##CS];                                            \
            for (int u = 0; u < NV_##CS; u++) {                                                   \
                vs[u] = x[s / 8 + u];                                                             \
                va[u] = x[a / 8 + u];                                                             \
                vb[u] = x[b / 8 + u];                                                             \
            }                                                                                     \
            for (int i = 1; i < nsrc; i++) {                                                      \
                x = (const v8f *)srcs[i];                                                         \
                for (int u = 0; u < NV_##CS; u++) {                                               \
                    vs[u] += x[s / 8 + u];                                                        \
                    va[u] += x[a / 8 + u];                                                        \
                    vb[u] += x[b / 8 + u];                                                        \
                }                                                                                 \
            }                                                                                     \
            v8f *o = (v8f *)(dst + v * CS);                                                       \
            for (int u = 0; u < NV_##CS; u++) o[u] = vs[u] + 0.5f * (va[u] + vb[u]);              \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    static void mf_points_##CS(mf_ctx *x, int id, float *const *src, float *const *part,          \
                               int slice, int splat, float *dst, int log_out) {                   \
        const int64_t c = x->c;                                                                   \
        if (splat)                                                                                \
            for (int t = 0; t < x->nterms; t++)                                                   \
                memset(part[t], 0, sizeof(float) * (size_t)(x->m[t] * CS));                       \
        /* lanes >= c: -inf before the softmax's maximum, 0 after it */                           \
        v8f pad_low[NV_##CS];                                                                     \
        v8i keep[NV_##CS];                                                                        \
        for (int u = 0; u < NV_##CS; u++)                                                         \
            for (int k = 0; k < 8; k++) {                                                         \
                pad_low[u][k] = 8 * u + k < c ? 0.0f : -INFINITY;                                 \
                keep[u][k] = 8 * u + k < c ? -1 : 0;                                              \
            }                                                                                     \
        const int gram = x->gram_left != NULL && slice;                                           \
        const int grouped = !x->linear && x->group > 0 && x->group < c;                           \
        mf_group_t grp[grouped ? 48 : 1];                                                         \
        const int ngroups = grouped ? mf_groups(grp, c, x->group) : 0;                            \
        v8f gacc[gram ? c : 1][NV_##CS];                                                          \
        /* Points go in blocks of MF_BLOCK: each stage (slice, maximum, exp, normalise, splat)    \
         * runs over the whole block, so the block's rows are independent chains of work that     \
         * the CPU overlaps (one row at a time is one long chain of dependent operations). */     \
        for (int64_t ch = id; ch * MF_CHUNK < x->n; ch += x->nthreads) {                          \
            const int64_t p0 = ch * MF_CHUNK,                                                     \
                          p1 = p0 + MF_CHUNK < x->n ? p0 + MF_CHUNK : x->n;                       \
            if (gram)                                                                             \
                for (int64_t a = 0; a < c; a++)                                                   \
                    for (int u = 0; u < NV_##CS; u++) gacc[a][u] = v8_splat(0.0f);                \
            for (int64_t pb = p0; pb < p1; pb += MF_BLOCK) {                                      \
                const int nb = p1 - pb < MF_BLOCK ? (int)(p1 - pb) : MF_BLOCK;                    \
                v8f row[MF_BLOCK][NV_##CS];                                                       \
                const float *in = x->linear && !slice ? x->values : x->base;                      \
                for (int r = 0; r < nb; r++) {                                                    \
                    if (in)                                                                       \
                        mf_load_row(row[r], NV_##CS, in, pb + r, x->n, c, keep);                  \
                    else                                                                          \
                        for (int u = 0; u < NV_##CS; u++) row[r][u] = v8_splat(0.0f);             \
                }                                                                                 \
                if (slice)                                                                        \
                    for (int r = 0; r < nb; r++) {                                                \
                        const int64_t p = pb + r;                                                 \
                        for (int t = 0; t < x->nterms; t++) {                                     \
                            const int dp1 = x->dp1[t];                                            \
                            const int32_t *vs = x->vert[t] + p * dp1;                             \
                            const float *ws = x->w[t] + p * dp1;                                  \
                            float f = (float)x->coef[t];                                          \
                            if (x->post[t]) f *= x->post[t][p];                                   \
                            if (x->coefv) { /* a coefficient per lane: sum, then scale */         \
                                v8f acc[NV_##CS];                                                 \
                                for (int u = 0; u < NV_##CS; u++) acc[u] = v8_splat(0.0f);        \
                                for (int j = 0; j < dp1; j++) {                                   \
                                    const v8f *v = (const v8f *)(src[t] + (int64_t)vs[j] * CS);   \
                                    const float wj = ws[j] * f;                                   \
                                    for (int u = 0; u < NV_##CS; u++) acc[u] += wj * v[u];        \
                                }                                                                 \
                                const v8f *cv = (const v8f *)(x->coefv + (int64_t)t * CS);        \
                                for (int u = 0; u < NV_##CS; u++) row[r][u] += cv[u] * acc[u];    \
                                continue;                                                         \
                            }                                                                     \
                            for (int j = 0; j < dp1; j++) {                                       \
                                const v8f *v = (const v8f *)(src[t] + (int64_t)vs[j] * CS);       \
                                const float wj = ws[j] * f;                                       \
                                for (int u = 0; u < NV_##CS; u++) row[r][u] += wj * v[u];         \
                            }                                                                     \
                        }                                                                         \
                    }                                                                             \
                float mx[MF_BLOCK], inv[MF_BLOCK];                                                \
                v8f logit[MF_BLOCK][NV_##CS]; /* the rows before the softmax (log_out) */         \
                if (log_out)                                                                      \
                    for (int r = 0; r < nb; r++)                                                  \
                        for (int u = 0; u < NV_##CS; u++) logit[r][u] = row[r][u];                \
                if (grouped) {                                                                    \
                    for (int r = 0; r < nb; r++) {                                                \
                        v8f lse[NV_##CS];                                                         \
                        mf_group_softmax(row[r], NV_##CS, ngroups, grp, keep,                     \
                                         log_out ? lse : NULL);                                   \
                        if (log_out) {                                                            \
                            for (int u = 0; u < NV_##CS; u++) lse[u] = logit[r][u] - lse[u];      \
                            mf_store_row(lse, NV_##CS, dst, pb + r, p1, c);                       \
                        } else if (dst) {                                                         \
                            mf_store_row(row[r], NV_##CS, dst, pb + r, p1, c);                    \
                        }                                                                         \
                    }                                                                             \
                } else {                                                                          \
                if (!x->linear) {                                                                 \
                for (int r = 0; r < nb; r++) {                                                    \
                    v8f mv = row[r][0] + pad_low[0];                                              \
                    for (int u = 1; u < NV_##CS; u++) {                                           \
                        v8f y = row[r][u] + pad_low[u];                                           \
                        mv = v8_select(y > mv, y, mv);                                            \
                    }                                                                             \
                    mx[r] = v8_hmax(mv);                                                          \
                }                                                                                 \
                for (int r = 0; r < nb; r++) {                                                    \
                    v8f sum = v8_splat(0.0f);                                                     \
                    for (int u = 0; u < NV_##CS; u++) {                                           \
                        const v8f e = v8_exp_nonpositive(row[r][u] - mx[r]);                      \
                        row[r][u] = v8_select(keep[u], e, v8_splat(0.0f));                        \
                        sum += row[r][u];                                                         \
                    }                                                                             \
                    inv[r] = 1.0f / v8_hsum(sum);                                                 \
                }                                                                                 \
                } else {                                                                          \
                    for (int r = 0; r < nb; r++) inv[r] = 1.0f;                                   \
                }                                                                                 \
                for (int r = 0; r < nb; r++) {                                                    \
                    for (int u = 0; u < NV_##CS; u++) row[r][u] *= inv[r];                        \
                    if (log_out) {                                                                \
                        /* log softmax = logit - max - log(sum exp(logit - max)) */               \
                        const v8f lse = v8_splat(mx[r] - logf(inv[r]));                           \
                        v8f out[NV_##CS];                                                         \
                        for (int u = 0; u < NV_##CS; u++) out[u] = logit[r][u] - lse;             \
                        mf_store_row(out, NV_##CS, dst, pb + r, p1, c);                           \
                    } else if (dst) {                                                             \
                        mf_store_row(row[r], NV_##CS, dst, pb + r, p1, c);                        \
                    }                                                                             \
                    if (gram) {                                                                   \
                        const float *lr = x->gram_left + (pb + r) * c;                            \
                        for (int64_t a = 0; a < c; a++) {                                         \
                            const float la = lr[a];                                               \
                            for (int u = 0; u < NV_##CS; u++) gacc[a][u] += la * row[r][u];       \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
                }                                                                                 \
                if (splat)                                                                        \
                    for (int r = 0; r < nb; r++) {                                                \
                        const int64_t p = pb + r;                                                 \
                        for (int t = 0; t < x->nterms; t++) {                                     \
                            const int dp1 = x->dp1[t];                                            \
                            const int32_t *vs = x->vert[t] + p * dp1;                             \
                            const float *ws = x->w[t] + p * dp1;                                  \
                            const float s = x->pre[t] ? x->pre[t][p] : 1.0f;                      \
                            for (int j = 0; j < dp1; j++) {                                       \
                                v8f *acc = (v8f *)(part[t] + (int64_t)vs[j] * CS);                \
                                const float wj = ws[j] * s;                                       \
                                for (int u = 0; u < NV_##CS; u++) acc[u] += wj * row[r][u];       \
                            }                                                                     \
                        }                                                                         \
                    }                                                                             \
            }                                                                                     \
            if (gram) {                                                                           \
                double *gd = x->gram + (int64_t)id * c * CS;                                      \
                for (int64_t a = 0; a < c; a++)                                                   \
                    for (int u = 0; u < NV_##CS; u++)                                             \
                        for (int k = 0; k < 8; k++) gd[a * CS + 8 * u + k] += gacc[a][u][k];      \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    static void *mf_thread_##CS(void *varg) {                                                     \
        mf_arg *arg = (mf_arg *)varg;                                                             \
        mf_ctx *x = arg->ctx;                                                                     \
        int go;                                                                                   \
        while ((go = atomic_load(&x->go)) == 0) sched_yield();                                    \
        if (go < 0 && arg->id != 0) return NULL;                                                  \
        const int id = arg->id, nt = x->nthreads;                                                 \
        int sense = 0;                                                                            \
        /* roles[t][i]: which of term t's nt + 1 buffers is thread i's splat target (i < nt)      \
         * and which is spare (i = nt); every thread derives the same roles. */                   \
        int roles[16][MAX_THREADS + 1];                                                           \
        float *part[16], *src[16];                                                                \
        for (int t = 0; t < x->nterms; t++) {                                                     \
            for (int i = 0; i <= nt; i++) roles[t][i] = i;                                        \
            part[t] = x->bufs[t] + (int64_t)roles[t][id] * (x->m[t] + 1) * CS;                    \
            src[t] = NULL;                                                                        \
        }                                                                                         \
        for (int it = 0; it <= x->iters; it++) {                                                  \
            double t0 = now_seconds();                                                            \
            float *dst = it == x->iters ? x->q : x->hist ? x->hist[it] : NULL;                  \
            mf_points_##CS(x, id, src, part, it > 0, it < x->iters, dst,                          \
                           it == x->iters && x->log_out);                                         \
            double t1 = now_seconds();                                                            \
            barrier_wait(&x->barrier, &sense);                                                    \
            if (id == 0) lattice_profile[0] += t1 - t0;                                           \
            if (it == x->iters) break;                                                            \
            for (int t = 0; t < x->nterms; t++) {                                                 \
                const int64_t mt = x->m[t], stride = (mt + 1) * CS;                               \
                const int64_t v0 = mt * id / nt, v1 = mt * (id + 1) / nt;                         \
                float *parts[MAX_THREADS];                                                        \
                for (int i = 0; i < nt; i++) parts[i] = x->bufs[t] + roles[t][i] * stride;        \
                int cur = roles[t][nt], other = roles[t][0];                                      \
                for (int jj = 0; jj < x->dp1[t]; jj++) {                                          \
                    const int j = x->transpose ? x->dp1[t] - 1 - jj : jj;                         \
                    const int32_t *nbr = x->blur_col[t] + (int64_t)j * 3 * mt;                    \
                    if (jj == 0) {                                                                \
                        mf_blur_##CS(nbr, parts, nt, x->bufs[t] + cur * stride, v0, v1);          \
                    } else {                                                                      \
                        float *in = x->bufs[t] + cur * stride;                                    \
                        mf_blur_##CS(nbr, &in, 1, x->bufs[t] + other * stride, v0, v1);           \
                        int tmp = cur; cur = other; other = tmp;                                  \
                    }                                                                             \
                    barrier_wait(&x->barrier, &sense);                                            \
                }                                                                                 \
                /* `cur` holds the blurred values; the other nt buffers are the next parts */     \
                int k = 0;                                                                        \
                for (int i = 0; i <= nt; i++)                                                     \
                    if (i != cur) roles[t][k++] = i;                                              \
                roles[t][nt] = cur;                                                               \
                src[t] = x->bufs[t] + cur * stride;                                               \
                part[t] = x->bufs[t] + roles[t][id] * stride;                                     \
            }                                                                                     \
            if (id == 0) lattice_profile[1] += now_seconds() - t1;                                \
        }                                                                                         \
        return NULL;                                                                              \
    }

DEFINE_MEANFIELD(8)
DEFINE_MEANFIELD(16)
DEFINE_MEANFIELD(24)
DEFINE_MEANFIELD(32)
DEFINE_MEANFIELD(40)
DEFINE_MEANFIELD(48)
#pragma GCC pop_options

/* The driver of the fused mean field above (float32, c <= 48).  base (n, c) = the logits' constant
 * part (-U); q (n, c) receives Q_iters (log Q_iters when log_out); hist, when not NULL, holds
 * iters pointers to (n, c) arrays that receive Q_0 ... Q_{iters-1} (what a backward needs).
 * Returns 0, -1 on allocation failure, -2 when c > 48
 * (the caller then iterates lattice_filter_sum). */
static int mf_run(int64_t n, int64_t c, int nterms, const int64_t *m, const int *dp1,
                  const int32_t *const *vert, const float *const *w,
                  const int32_t *const *blur_col, const float *const *pre,
                  const float *const *post, const double *coef, const float *coefv,
                  int64_t group, const float *base, float *q, float *const *hist, int log_out,
                  int linear, int transpose, const float *values, const float *gram_left,
                  double *gram, int iters, int nthreads) {
    if (nterms < 1 || nterms > 16 || c < 1 || iters < 0) return -3;
    if (group < 0 || (group > 0 && c % group != 0)) return -3;
    int64_t cs = c <= 8    ? 8
                 : c <= 16 ? 16
                 : c <= 24 ? 24
                 : c <= 32 ? 32
                 : c <= 40 ? 40
                 : c <= 48 ? 48
                           : 0;
    if (cs == 0) return -2;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > n / 1024) nthreads = (int)(n / 1024);
    if (nthreads < 1) nthreads = 1;
    float *bufs[16] = {0};
    size_t total = 0;
    for (int t = 0; t < nterms; t++) /* per term nthreads + 1 buffers, 64-byte aligned */
        total += (sizeof(float) * (size_t)((m[t] + 1) * cs) * (size_t)(nthreads + 1) + 63) & ~(size_t)63;
    ws_block_t block = {NULL, 0};
    int kept = 0, err = ws_acquire(&block, total, &kept);
    if (!err) {
        char *at = (char *)ws_data(&block);
        for (int t = 0; t < nterms; t++) {
            const size_t stride = (size_t)((m[t] + 1) * cs);
            bufs[t] = (float *)at;
            at += (sizeof(float) * stride * (size_t)(nthreads + 1) + 63) & ~(size_t)63;
            for (int i = 0; i <= nthreads; i++) /* the zero row that missing neighbours point at */
                memset(bufs[t] + i * stride + m[t] * cs, 0, sizeof(float) * (size_t)cs);
        }
    }
    /* the per-lane coefficients padded to rows of cs (aligned vectors), zero past c */
    float coef_lanes[16 * 48] __attribute__((aligned(32)));
    if (coefv)
        for (int t = 0; t < nterms; t++)
            for (int64_t l = 0; l < cs; l++)
                coef_lanes[t * cs + l] = l < c ? coefv[t * c + l] : 0.0f;
    if (!err) {
        mf_ctx x = {n, c, nterms, iters, nthreads, m, dp1, vert, w, blur_col, pre, post, coef,
                    coefv ? coef_lanes : NULL, group, base, q, hist, log_out, linear,
                    transpose, values, gram_left, gram, bufs, cs};
        atomic_init(&x.barrier.count, 0);
        atomic_init(&x.barrier.sense, 0);
        x.barrier.nthreads = nthreads;
        void *(*fn)(void *) = cs == 8    ? mf_thread_8
                              : cs == 16 ? mf_thread_16
                              : cs == 24 ? mf_thread_24
                              : cs == 32 ? mf_thread_32
                              : cs == 40 ? mf_thread_40
                                         : mf_thread_48;
        mf_arg args[MAX_THREADS];
        pthread_t threads[MAX_THREADS];
        int started = 1;
        for (int i = 0; i < nthreads; i++) args[i] = (mf_arg){&x, i};
        atomic_init(&x.go, 0);
        for (int i = 1; i < nthreads; i++) {
            if (pthread_create(&threads[i], NULL, fn, &args[i]) != 0) break;
            started++;
        }
        if (started == nthreads) {
            atomic_store(&x.go, 1);
            fn(&args[0]);
        } else { /* the barrier needs every member: release the others, run alone */
            atomic_store(&x.go, -1);
            x.nthreads = x.barrier.nthreads = 1;
        }
        for (int i = 1; i < started; i++) pthread_join(threads[i], NULL);
        if (started != nthreads) fn(&args[0]);
    }
    if (!err) ws_release(&block, kept);
    return err;
}

/* coefv: NULL, or (nterms, c) per-label coefficients that multiply coef; group: 0 for one
 * softmax over the row, else c / group independent mean fields side by side (label blocks of
 * `group`, each normalised on its own) that share the kernels: with coefv, each block its own
 * kernel weights (tune-crf's sweep over weights). */
int lattice_meanfield_f32(int64_t n, int64_t c, int nterms, const int64_t *m, const int *dp1,
                          const int32_t *const *vert, const float *const *w,
                          const int32_t *const *blur_col, const float *const *pre,
                          const float *const *post, const double *coef, const float *coefv,
                          int64_t group, const float *base, float *q, float *const *hist,
                          int log_out, int iters, int nthreads) {
    return mf_run(n, c, nterms, m, dp1, vert, w, blur_col, pre, post, coef, coefv, group, base,
                  q, hist, log_out, 0, 0, NULL, NULL, NULL, iters, nthreads);
}

/* The same passes as a plain filter (float32, c <= 48): out = base + sum_t coef_t * post_t .
 * K_t(pre_t . values), K_t^T with transpose; base may be NULL (zero), out must not alias
 * values.  One splat pass, the blurs, one slice pass: the mean field's vector rows and
 * per-thread splat buffers, for the backward's filterings. */
int lattice_filter_f32(int64_t n, int64_t c, int nterms, const int64_t *m, const int *dp1,
                       const int32_t *const *vert, const float *const *w,
                       const int32_t *const *blur_col, const float *const *pre,
                       const float *const *post, const double *coef, const float *values,
                       const float *base, float *out, int transpose, const float *gram_left,
                       double *gram, int nthreads) {
    /* gram (c, c) float64, when gram_left is set: += sum_p gram_left_p (outer) out_p (out = the
     * result of this call), accumulated per thread */
    const int64_t cs = c <= 8 ? 8 : c <= 16 ? 16 : c <= 24 ? 24 : c <= 32 ? 32 : c <= 40 ? 40 : 48;
    double *acc = NULL;
    if (gram_left) {
        acc = calloc((size_t)(MAX_THREADS * c * cs), sizeof(double));
        if (!acc) return -1;
    }
    int err = mf_run(n, c, nterms, m, dp1, vert, w, blur_col, pre, post, coef, NULL, 0, base,
                     out, NULL, 0, 1, transpose, values, gram_left, acc, 1, nthreads);
    if (!err && gram_left)
        for (int t = 0; t < MAX_THREADS; t++)
            for (int64_t a = 0; a < c; a++)
                for (int64_t b = 0; b < c; b++) gram[a * c + b] += acc[(t * c + a) * cs + b];
    free(acc);
    return err;
}

/* The softmax's backward with the sum over iterations: g = q . (dq - sum_l q . dq) row by row,
 * total += g (total may be NULL); (n, c) float32 arrays, g may alias dq. */
typedef struct {
    int64_t c;
    const float *q, *dq;
    float *g, *total;
} smb_ctx;

static void smb_range(void *vctx, int64_t begin, int64_t end) {
    smb_ctx *x = (smb_ctx *)vctx;
    const int64_t c = x->c;
    for (int64_t p = begin; p < end; p++) {
        const float *q = x->q + p * c, *d = x->dq + p * c;
        float s = 0.0f;
        for (int64_t k = 0; k < c; k++) s += q[k] * d[k];
        float *g = x->g + p * c;
        for (int64_t k = 0; k < c; k++) g[k] = q[k] * (d[k] - s);
        if (x->total)
            for (int64_t k = 0; k < c; k++) x->total[p * c + k] += g[k];
    }
}

void softmax_backward_f32(int64_t n, int64_t c, const float *q, const float *dq, float *g,
                          float *total, int nthreads) {
    smb_ctx x = {c, q, dq, g, total};
    parallel_for(n, nthreads, 8192, smb_range, &x);
}

/* out (n, c) = x (n, c) A (c, c), or out += x A with accumulate: the backward's products with a
 * label map (x ∘ A), float32, c <= 48.  A's rows are padded to whole 8-lane vectors; each row of
 * out is c multiply-adds of those vectors (MKL's sgemm on these thin shapes ran at ~15 GFLOP/s
 * on one core of the development VM). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
typedef struct {
    int64_t n, c;
    int nv;
    const float *x;
    const v8f *a; /* c rows of nv vectors */
    float *out;
    int accumulate;
} lm_ctx;

static void lm_range(void *vctx, int64_t begin, int64_t end) {
    const lm_ctx *x = (const lm_ctx *)vctx;
    const int64_t c = x->c;
    const int nv = x->nv;
    v8i keep[6];
    for (int u = 0; u < nv; u++)
        for (int k = 0; k < 8; k++) keep[u][k] = 8 * u + k < c ? -1 : 0;
    for (int64_t p = begin; p < end; p++) {
        v8f acc[6];
        if (x->accumulate)
            mf_load_row(acc, nv, x->out, p, x->n, c, keep);
        else
            for (int u = 0; u < nv; u++) acc[u] = v8_splat(0.0f);
        const float *row = x->x + p * c;
        for (int64_t k = 0; k < c; k++) {
            const v8f xv = v8_splat(row[k]);
            const v8f *ak = x->a + k * nv;
            for (int u = 0; u < nv; u++) acc[u] += xv * ak[u];
        }
        /* the row's c lanes only (whole vectors while they fit): the next row is not read yet */
        float *d = x->out + p * c;
        for (int u = 0; u < nv; u++) {
            if (8 * (u + 1) <= c)
                *(v8f_u *)(d + 8 * u) = acc[u];
            else
                for (int k = 0; 8 * u + k < c; k++) d[8 * u + k] = acc[u][k];
        }
    }
}

int label_matmul_f32(int64_t n, int64_t c, const float *x, const float *a, float *out,
                     int accumulate, int nthreads) {
    if (c < 1 || c > 48) return -2;
    const int nv = (int)((c + 7) / 8);
    v8f rows[48 * 6];
    for (int64_t k = 0; k < c; k++)
        for (int u = 0; u < nv; u++)
            for (int l = 0; l < 8; l++)
                rows[k * nv + u][l] = 8 * u + l < c ? a[k * c + 8 * u + l] : 0.0f;
    lm_ctx ctx = {n, c, nv, x, rows, out, accumulate};
    parallel_for(n, nthreads, 8192, lm_range, &ctx);
    return 0;
}
#pragma GCC pop_options

DEFINE_BUILD(float, f32, nearbyintf)
DEFINE_BUILD(double, f64, nearbyint)
DEFINE_FILTER(float, f32)
DEFINE_FILTER(double, f64)
DEFINE_SOFTMAX(float, f32, exp_nonpositive)
DEFINE_SOFTMAX(double, f64, exp)
DEFINE_FILTER_SUM(float, f32)
DEFINE_FILTER_SUM(double, f64)

/* Version of the calling convention above; the loader refuses a library with another. */
/* ------------------------------------------------------------------ feature moments */
/* The backward of the Gaussian model w.r.t. the features needs, per point i and feature d,
 * s_id = sum_l r_il [K(f_d v)]_il (or with K^T): the filter of d + 1 stacked channel blocks
 * [v, f_1 v, ..., f_D v], each contracted at once with a per-point row r.  Here the stacked
 * blocks are never stored: each point splats f_id * v_i for every d straight from v and f, and
 * the slice pass contracts each block with r_i as it gathers it; block 0 (K v itself) can be
 * written out.  One lattice, float32, any c and D: vertex rows of (D+1) blocks of c floats
 * padded to whole 8-lane vectors (nv vectors per block). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
typedef struct {
    int64_t n, c, m, nparts;
    int dp1, nd, nv;
    const int32_t *vert;
    const float *w;
    const float *values, *feats;
    v8f *const *parts;
} mom_splat_ctx;

/* row p of an (n, c) array as nv vectors, lanes >= c zero */
static inline void mom_load(v8f *dst, int nv, const float *src, int64_t p, int64_t c) {
    const float *s = src + p * c;
    for (int u = 0; u < nv; u++)
        for (int k = 0; k < 8; k++) dst[u][k] = 8 * u + k < c ? s[8 * u + k] : 0.0f;
}

static void mom_splat_part(void *vctx, int64_t begin, int64_t end) {
    mom_splat_ctx *x = (mom_splat_ctx *)vctx;
    const int nv = x->nv, nb = x->nd + 1;
    const int64_t row = (int64_t)nb * nv;
    v8f vv[nv];
    for (int64_t part = begin; part < end; part++) {
        v8f *restrict dst = x->parts[part];
        memset(dst, 0, sizeof(v8f) * (size_t)((x->m + 1) * row));
        const int64_t p0 = x->n * part / x->nparts, p1 = x->n * (part + 1) / x->nparts;
        for (int64_t p = p0; p < p1; p++) {
            mom_load(vv, nv, x->values, p, x->c);
            const float *restrict f = x->feats + p * x->nd;
            const int32_t *vs = x->vert + p * x->dp1;
            const float *ws = x->w + p * x->dp1;
            for (int j = 0; j < x->dp1; j++) {
                v8f *restrict acc = dst + (int64_t)vs[j] * row;
                const float wj = ws[j];
                for (int u = 0; u < nv; u++) acc[u] += wj * vv[u];
                for (int d = 0; d < x->nd; d++) {
                    const float wf = wj * f[d];
                    v8f *restrict blk = acc + (int64_t)(d + 1) * nv;
                    for (int u = 0; u < nv; u++) blk[u] += wf * vv[u];
                }
            }
        }
    }
}

typedef struct {
    int64_t nvec; /* vectors per vertex row */
    int nparts;
    const int32_t *nbr;
    v8f *const *src; /* nparts sources summed on the fly (the first blur), else 1 */
    v8f *dst;
} mom_blur_ctx;

static void mom_blur_range(void *vctx, int64_t begin, int64_t end) {
    mom_blur_ctx *x = (mom_blur_ctx *)vctx;
    const int64_t nvec = x->nvec;
    for (int64_t v = begin; v < end; v++) {
        const int64_t s = (int64_t)x->nbr[3 * v] * nvec, a = (int64_t)x->nbr[3 * v + 1] * nvec,
                      b = (int64_t)x->nbr[3 * v + 2] * nvec;
        v8f *restrict o = x->dst + v * nvec;
        const v8f *in = x->src[0];
        for (int64_t u = 0; u < nvec; u++) o[u] = in[s + u] + 0.5f * (in[a + u] + in[b + u]);
        for (int i = 1; i < x->nparts; i++) {
            in = x->src[i];
            for (int64_t u = 0; u < nvec; u++) o[u] += in[s + u] + 0.5f * (in[a + u] + in[b + u]);
        }
    }
}

typedef struct {
    int64_t c;
    int dp1, nd, nv, exclude_self;
    float scale;
    const int32_t *vert;
    const float *w;
    const v8f *src;
    const float *values, *feats, *contract;
    float *plain, *s;
} mom_slice_ctx;

static void mom_slice_range(void *vctx, int64_t begin, int64_t end) {
    mom_slice_ctx *x = (mom_slice_ctx *)vctx;
    const int nv = x->nv, nb = x->nd + 1;
    const int64_t row = (int64_t)nb * nv, c = x->c;
    v8f acc[row], vv[nv], rr[nv];
    for (int64_t p = begin; p < end; p++) {
        for (int64_t u = 0; u < row; u++) acc[u] = v8_splat(0.0f);
        const int32_t *vs = x->vert + p * x->dp1;
        const float *ws = x->w + p * x->dp1;
        for (int j = 0; j < x->dp1; j++) {
            const v8f *restrict r = x->src + (int64_t)vs[j] * row;
            const float wj = ws[j] * x->scale;
            for (int64_t u = 0; u < row; u++) acc[u] += wj * r[u];
        }
        const float *restrict f = x->feats + p * x->nd;
        if (x->exclude_self) { /* (K - I): the point's own contribution */
            mom_load(vv, nv, x->values, p, c);
            for (int d = 0; d < nb; d++) {
                const float fd = d == 0 ? 1.0f : f[d - 1];
                for (int u = 0; u < nv; u++) acc[d * nv + u] -= fd * vv[u];
            }
        }
        if (x->plain) {
            float *o = x->plain + p * c;
            for (int64_t k = 0; k < c; k++) o[k] = acc[k / 8][k % 8];
        }
        mom_load(rr, nv, x->contract, p, c);
        for (int d = 0; d < nb; d++) {
            v8f t = v8_splat(0.0f);
            for (int u = 0; u < nv; u++) t += rr[u] * acc[d * nv + u];
            x->s[p * nb + d] = v8_hsum(t);
        }
    }
}

/* s (n, D+1): s_i0 = sum_l r_il [K v]_il, s_id = sum_l r_il [K(f_d v)]_il (K^T with transpose,
 * K - I with exclude_self, K including the lattice's output `scale`); plain (n, c) receives
 * K v when not NULL.  values, contract (n, c) and feats (n, D) float32; `work` is the caller's
 * (kept between calls: fresh buffers cost a page fault per 4 KB), nparts <= nthreads splat
 * buffers in it.  Returns 0, -2 on bad arguments. */
int lattice_moments_f32(int64_t n, int64_t c, int nd, int64_t m, int dp1, const int32_t *vert,
                        const float *w, const int32_t *blur_col, double scale,
                        const float *values, const float *feats, const float *contract,
                        int transpose, int exclude_self, float *plain, float *s, float *work,
                        int nparts, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads < 1) nthreads = 1;
    if (nparts < 1 || nparts > nthreads) return -2;
    const int nv = (int)((c + 7) / 8);
    const int64_t nvec = (int64_t)(nd + 1) * nv;
    const size_t stride = (size_t)((m + 1) * nvec);
    /* work: at least (nparts + 1) * stride vectors plus 16 floats (aligned here to 64 bytes) */
    v8f *block = (v8f *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    v8f *parts[MAX_THREADS];
    for (int i = 0; i < nparts; i++) parts[i] = block + (size_t)i * stride;
    /* the first blur sums the parts into a; then parts[0] is free and serves as b */
    v8f *a = block + (size_t)nparts * stride, *b = parts[0];
    mom_splat_ctx sp = {n, c, m, nparts, dp1, nd, nv, vert, w, values, feats, parts};
    parallel_for(nparts, nparts, 1, mom_splat_part, &sp);
    memset(a + m * nvec, 0, sizeof(v8f) * (size_t)nvec); /* zero rows of missing neighbours */
    for (int i = 0; i < dp1; i++) {
        const int j = transpose ? dp1 - 1 - i : i;
        mom_blur_ctx bl = {nvec, i == 0 ? nparts : 1, blur_col + (int64_t)j * 3 * m,
                           i == 0 ? parts : &a, i == 0 ? a : b};
        parallel_for(m, nthreads, 2048, mom_blur_range, &bl);
        if (i > 0) {
            v8f *tmp = a;
            a = b;
            b = tmp;
        }
    }
    mom_slice_ctx sl = {c, dp1, nd, nv, exclude_self, (float)scale, vert, w, a, values, feats,
                        contract, plain, s};
    parallel_for(n, nthreads, 2048, mom_slice_range, &sl);
    return 0;
}
#pragma GCC pop_options

int deepcrf_kernel_abi(void) { return 13; }
