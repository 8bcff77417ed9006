/* Row operations of the backward: softmax backward, products with a label map. */
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
