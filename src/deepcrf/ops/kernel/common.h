/* Shared by every stage: headers, limits, token pasting for the templates, parallel_for. */
#ifndef DEEPCRF_KERNEL_COMMON_H
#define DEEPCRF_KERNEL_COMMON_H
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define SOFTMAX_BLOCK 32 /* rows normalised together (a few KB: stays in L1) */


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


/* Templates (the *.inc files) name their functions by the type or row-width suffix. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define SFX(name) CAT(name, SUF) /* lattice_build_ + f32 */
#define CSX(name) CAT(name, CS)  /* mf_thread_ + 16 */

/* ------------------------------------------------------------------ entry-point arguments */
/* Every entry point with more than a few arguments takes them in one of these structs,
 * declared field for field (same order and types) in deepcrf/ops/native.py: an argument cannot
 * land in another's place.  Pointers to float/double arrays are void here: the call's type
 * (the _f32 / _f64 entry point) says which. */

/* The lattices of one call (1 to 16), over the same n points. */
typedef struct {
    int32_t count;
    const int64_t *vertices;             /* per lattice: M, its number of vertices */
    const int *dp1;                      /* per lattice: d + 1 */
    const int32_t *const *slice_vertex;  /* per lattice: (n * (d+1)) vertex of each entry */
    const void *const *slice_weight;     /* per lattice: (n * (d+1)) barycentric weights */
    const int32_t *const *blur;          /* per lattice: (d+1, 3 M) blur neighbours */
    const void *const *pre;              /* per lattice: (n) per-point factor, or NULL */
    const void *const *post;             /* per lattice: (n) per-point factor, or NULL */
    const double *coef;                  /* per lattice: coefficient times its output scale */
} terms_t;

typedef struct {
    const void *features;  /* (n, d), already divided by the bandwidths */
    int64_t n, n_real;     /* points, of which the first n_real are real (the rest padding) */
    const double *scale;   /* (d) elevation scales */
    double feature_scale, inv_dp1;
    void *entry_weight;    /* out: (n_real * (d+1)) barycentric weights */
    int32_t *entry_vertex; /* out: (n_real * (d+1)) item-local vertex ids */
    int64_t *vertices_out; /* out: M */
    int32_t d, nthreads;
} build_args_t;

typedef struct {
    int64_t n, c;
    const void *values, *base; /* (n, c); base may be NULL (zero) */
    void *out;                 /* (n, c); may alias base, not values */
    void *const *buf_a;        /* per lattice: ((M+1) c) vertex buffers kept by the caller */
    void *const *buf_b;
    void *const *scratch;      /* per lattice: ((nparts-1) M c) */
    int32_t nparts, softmax, transpose, nthreads;
} filter_sum_args_t;

typedef struct {
    int64_t n, c;
    const float *values, *base; /* (n, c); base may be NULL */
    float *out;                 /* (n, c); must not alias values */
    const float *gram_left;     /* (n, c) or NULL: gram (c, c) += gram_leftᵀ out */
    double *gram;
    int32_t transpose, nthreads;
} filter_args_t;

typedef struct {
    int64_t n, c, group;      /* group: 0, or label blocks of `group` normalised apart */
    const float *coefv;       /* (count, c) per-label coefficients, or NULL */
    const float *base;        /* (n, c) the constant part of the logits */
    float *q;                 /* out: (n, c) Q_iters, or log Q_iters with log_out */
    float *const *hist;       /* NULL, or iters arrays (n, c) receiving Q_0 ... Q_{iters-1} */
    int32_t log_out, iters, nthreads;
} meanfield_args_t;

typedef struct {
    int64_t n, c;
    const float *values, *feats, *contract; /* (n, c), (n, nd), (n, c) */
    float *plain;                            /* out: (n, c) K v, or NULL */
    float *s;                                /* out: (n, nd + 1) */
    float *work;                             /* the caller's vertex buffers */
    int32_t nd, transpose, exclude_self, nparts, nthreads;
} moments_args_t;

#endif
