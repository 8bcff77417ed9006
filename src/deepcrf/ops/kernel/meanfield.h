/* Stage 3: the fused mean-field loop (float32, up to 48 labels) and its filter form. */
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

#define CS 8
#include "meanfield.inc"
#undef CS
#define CS 16
#include "meanfield.inc"
#undef CS
#define CS 24
#include "meanfield.inc"
#undef CS
#define CS 32
#include "meanfield.inc"
#undef CS
#define CS 40
#include "meanfield.inc"
#undef CS
#define CS 48
#include "meanfield.inc"
#undef CS
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
int lattice_meanfield_f32(const terms_t *t, const meanfield_args_t *a) {
    return mf_run(a->n, a->c, t->count, t->vertices, t->dp1, t->slice_vertex,
                  (const float *const *)t->slice_weight, t->blur, (const float *const *)t->pre,
                  (const float *const *)t->post, t->coef, a->coefv, a->group, a->base, a->q,
                  a->hist, a->log_out, 0, 0, NULL, NULL, NULL, a->iters, a->nthreads);
}

/* The same passes as a plain filter (float32, c <= 48): out = base + sum_t coef_t * post_t .
 * K_t(pre_t . values), K_t^T with transpose; base may be NULL (zero), out must not alias
 * values.  One splat pass, the blurs, one slice pass: the mean field's vector rows and
 * per-thread splat buffers, for the backward's filterings. */
static int filter_f32(int64_t n, int64_t c, int nterms, const int64_t *m, const int *dp1,
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

int lattice_filter_f32(const terms_t *t, const filter_args_t *a) {
    return filter_f32(a->n, a->c, t->count, t->vertices, t->dp1, t->slice_vertex,
                      (const float *const *)t->slice_weight, t->blur, (const float *const *)t->pre,
                      (const float *const *)t->post, t->coef, a->values, a->base, a->out,
                      a->transpose, a->gram_left, a->gram, a->nthreads);
}
