"""Deep Gaussian CRF benchmark: CG time and iterations at a VOC image's stride-8 size, and
forward+backward memory of the implicit (adjoint) backward vs back-propagating through unrolled CG.

Problem: a 500×375 VOC image at output stride 8 -> a 47×63 grid (N = 2961 pixels), L = 21 labels,
D = 16-dimensional embeddings.  Embeddings are a smooth random field plus noise and unaries are
random, so the affinities span (0, β]; iteration counts depend on β (the system's conditioning),
so two values are shown.

Peers measured in the same run (no other G-CRF implementation is installable: the authors' code is
a Caffe fork):
- ``torch.linalg.solve`` on the materialised N×N system (exact, dense);
- ``scipy.sparse.linalg.spsolve`` on the sparse system (exact, sparse direct), local graphs only.

Memory: bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``), on every device,
and peak CUDA memory of forward+backward when run on a GPU.

Usage::

    python benchmarks/bench_gcrf.py [--device cpu|cuda] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from deepcrf._atomic import atomic_path
from deepcrf.crf.gaussian import _single_system, gaussian_crf
from deepcrf.ops.cg import _cg_loop

HEIGHT, WIDTH, LABELS, DIM = 47, 63, 21, 16  # ceil(375/8), ceil(500/8)
GRAPHS = [(4, 1), (8, 1), (8, 2), (8, 3), ("dense", 1)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _inputs(device: torch.device, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    unary = torch.randn(batch, LABELS, HEIGHT, WIDTH, generator=g)
    coarse = torch.randn(batch, DIM, 6, 8, generator=g)
    smooth = torch.nn.functional.interpolate(
        coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False
    )
    emb = 1.5 * smooth + 0.3 * torch.randn(batch, DIM, HEIGHT, WIDTH, generator=g)
    return unary.to(device), emb.to(device)


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _dense_matrix(
    emb: torch.Tensor, connectivity: object, radius: int, beta: float
) -> torch.Tensor:
    """The N×N system λI + L_W materialised by applying the operator to the identity."""
    n = HEIGHT * WIDTH
    lam = torch.tensor(1.0, dtype=emb.dtype, device=emb.device)
    matvec, params, _ = _single_system(emb, lam, beta, connectivity, radius)
    eye = torch.eye(n, dtype=emb.dtype, device=emb.device).view(1, n, HEIGHT, WIDTH)
    cols = [matvec(eye[:, i : i + 512], *params) for i in range(0, n, 512)]
    return torch.cat(cols, 1).flatten(2)[0]


def bench_solve(device: torch.device, repeats: int, beta: float, tol: float) -> list[dict]:
    unary, emb = _inputs(device)
    rows = []
    for connectivity, radius in GRAPHS:
        kw = {"connectivity": connectivity, "radius": radius, "pairwise_weight": beta, "tol": tol}
        with torch.no_grad():
            x, info = gaussian_crf(unary, emb, return_info=True, **kw)
            _, info_plain = gaussian_crf(unary, emb, return_info=True, precondition=False, **kw)
            t_cg = _time(lambda kw=kw: gaussian_crf(unary, emb, **kw), device, repeats)
            a = _dense_matrix(emb, connectivity, radius, beta)
            rhs = unary.flatten(2)[0].T
            t_dense = _time(lambda a=a, rhs=rhs: torch.linalg.solve(a, rhs), device, repeats)
            ref = torch.linalg.solve(a.double(), rhs.double()).T.reshape(x.shape).float()
        err = float((x - ref).abs().max())
        t_sparse = None
        if connectivity != "dense":
            sp = scipy.sparse.csc_matrix(a.cpu().numpy().astype(np.float64))
            rhs_np = rhs.cpu().numpy().astype(np.float64)
            t_sparse = _time(lambda sp=sp, r=rhs_np: scipy.sparse.linalg.spsolve(sp, r),
                             torch.device("cpu"), repeats)  # fmt: skip
        u = unary.clone().requires_grad_(True)
        e = emb.clone().requires_grad_(True)

        def fwd_bwd(kw=kw, u=u, e=e):
            out = gaussian_crf(u, e, **kw)
            torch.autograd.grad(out.square().sum(), (u, e))

        t_fb = _time(fwd_bwd, device, repeats)
        rows.append({
            "graph": f"{connectivity}" + ("" if connectivity == "dense" else f" r={radius}"),
            "beta": beta, "iters_jacobi": info.iterations, "iters_plain": info_plain.iterations,
            "residual": float(info.residual.max()), "max_abs_err_vs_dense": err,
            "cg_forward_s": t_cg, "cg_forward_backward_s": t_fb, "dense_solve_s": t_dense,
            "sparse_spsolve_s": t_sparse,
        })  # fmt: skip
    return rows


def bench_memory(device: torch.device, beta: float) -> list[dict]:
    """Implicit backward vs unrolled CG: saved bytes and peak CUDA memory, at growing tolerances."""
    unary, emb = _inputs(device)
    rows = []
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
        for mode in ("implicit", "unrolled"):
            u = unary.clone().requires_grad_(True)
            e = emb.clone().requires_grad_(True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            if mode == "implicit":
                (x, info), saved = _saved_bytes(
                    lambda u=u, e=e, tol=tol: gaussian_crf(
                        u, e, connectivity=8, pairwise_weight=beta, tol=tol, return_info=True
                    )
                )
            else:
                lam = torch.tensor(1.0, device=device)

                def unrolled(u=u, e=e, tol=tol, lam=lam):
                    matvec, params, diag = _single_system(e, lam, beta, 8, 1)
                    return _cg_loop(lambda v: matvec(v, *params), u, diag, tol, 0.0, 10_000)

                (x, info), saved = _saved_bytes(unrolled)
            torch.autograd.grad(x.square().sum(), (u, e))
            _sync(device)
            seconds = time.perf_counter() - t0
            peak = None
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - base
            rows.append({
                "tol": tol, "mode": mode, "iters": info.iterations, "saved_MiB": saved / 2**20,
                "peak_cuda_MiB": None if peak is None else peak / 2**20,
                "forward_backward_s": seconds,
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--tol", type=float, default=1e-5, help="CG relative residual tolerance")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0 = torch default)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# Deep Gaussian CRF, {HEIGHT}x{WIDTH} grid (VOC 500x375 at stride 8), L={LABELS}, "
          f"D={DIM}, float32, device={device}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, tol={args.tol}")  # fmt: skip
    solve_rows = []
    for beta in (1.0, 10.0):
        solve_rows += bench_solve(device, args.repeats, beta, args.tol)
    print(
        "\n| graph | β | CG iters (Jacobi / plain) | CG fwd ms | CG fwd+bwd ms | "
        "dense solve ms | scipy spsolve ms | dense / CG | spsolve / CG | max err vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in solve_rows:
        t_sp = r["sparse_spsolve_s"]
        sp = "–" if t_sp is None else f"{1e3 * t_sp:.1f}"
        sp_ratio = "–" if t_sp is None else f"{t_sp / r['cg_forward_s']:.1f}"
        print(
            f"| {r['graph']} | {r['beta']:g} | {r['iters_jacobi']} / {r['iters_plain']} | "
            f"{1e3 * r['cg_forward_s']:.1f} | {1e3 * r['cg_forward_backward_s']:.1f} | "
            f"{1e3 * r['dense_solve_s']:.1f} | {sp} | "
            f"{r['dense_solve_s'] / r['cg_forward_s']:.1f} | {sp_ratio} | "
            f"{r['max_abs_err_vs_dense']:.1e} |"
        )
    memory_rows = bench_memory(device, beta=10.0)
    print("\n| tol | backward | CG iters | saved for backward MiB | peak CUDA MiB | fwd+bwd s |")
    print("|---|---|---|---|---|---|")
    for r in memory_rows:
        peak = "–" if r["peak_cuda_MiB"] is None else f"{r['peak_cuda_MiB']:.1f}"
        print(f"| {r['tol']:g} | {r['mode']} | {r['iters']} | {r['saved_MiB']:.1f} | {peak} | "
              f"{r['forward_backward_s']:.3f} |")  # fmt: skip
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"solve": solve_rows, "memory": memory_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
