/* Stage 4: the feature moments of the bandwidth gradient (one lattice, float32). */
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
static int moments_f32(int64_t n, int64_t c, int nd, int64_t m, int dp1, const int32_t *vert,
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

/* One lattice (t->count == 1; its coef is the output scale). */
int lattice_moments_f32(const terms_t *t, const moments_args_t *a) {
    if (t->count != 1) return -2;
    return moments_f32(a->n, a->c, a->nd, t->vertices[0], t->dp1[0], t->slice_vertex[0],
                       (const float *)t->slice_weight[0], t->blur[0], t->coef[0], a->values,
                       a->feats, a->contract, a->transpose, a->exclude_self, a->plain, a->s,
                       a->work, a->nparts, a->nthreads);
}
