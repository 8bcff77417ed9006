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
 *
 * This file is the one translation unit (a unity build): it includes the stages in order.
 * Per-type and per-row-width code is written once, in the *.inc templates, and instantiated
 * here by defining T / SUF (or CS) and including it.  DEEPCRF_KERNEL_ABI comes from the
 * compiler's command line (deepcrf/ops/native.py), which also declares every entry point.
 */
#ifndef DEEPCRF_KERNEL_ABI
#error "compile with -DDEEPCRF_KERNEL_ABI=<the ABI number of deepcrf/ops/native.py>"
#endif
#include "common.h"
#include "hash_table.h"
#include "build.h"
#include "simd.h"
#include "workspace.h"
#include "meanfield.h"
#include "rows.h"

#define T float
#define SUF f32
#define ROUND nearbyintf
#define EXP exp_nonpositive
#include "build.inc"
#include "filter.inc"
#include "softmax.inc"
#include "filter_sum.inc"
#undef T
#undef SUF
#undef ROUND
#undef EXP

#define T double
#define SUF f64
#define ROUND nearbyint
#define EXP exp
#include "build.inc"
#include "filter.inc"
#include "softmax.inc"
#include "filter_sum.inc"
#undef T
#undef SUF
#undef ROUND
#undef EXP

#include "moments.h"

/* The calling convention's version; the loader refuses a library built for another. */
int deepcrf_kernel_abi(void) { return DEEPCRF_KERNEL_ABI; }

/* The sizes of the argument structs, which the loader compares with its ctypes mirrors. */
void deepcrf_kernel_struct_sizes(int64_t *out) {
    out[0] = (int64_t)sizeof(terms_t);
    out[1] = (int64_t)sizeof(build_args_t);
    out[2] = (int64_t)sizeof(filter_sum_args_t);
    out[3] = (int64_t)sizeof(filter_args_t);
    out[4] = (int64_t)sizeof(meanfield_args_t);
    out[5] = (int64_t)sizeof(moments_args_t);
}
