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

#endif
