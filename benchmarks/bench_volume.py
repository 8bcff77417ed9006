"""Dense CRF on a 3-D volume: deepcrf vs pydensecrf's generic N-d DenseCRF, same run.

The case (issue 14's target): a 64×128×128 (D, H, W) synthetic volume
(``deepcrf.data.synthetic_volume``, one modality, spacing (2, 1, 1) mm, 1 048 576 voxels),
2 labels (background vs organ + lesion), 5 mean-field iterations. The unary is a per-voxel
Gaussian intensity model (class means 35 and 110, σ 30) on a volume with noise σ 35:
speckled, as a voxel classifier's.

Kernels: bilateral θα = 8 mm, θβ = 20 intensity units, w = 5; smoothness θγ = 3 mm, w = 3.
pydensecrf has no voxel spacing, so it gets the same kernels in voxel units through its
generic features: ``create_pairwise_bilateral(sdims=θα/spacing, schan=θβ, img, chdim=3)`` (the
4-D features, d = 4) and ``create_pairwise_gaussian(sdims=θγ/spacing, shape)`` (d = 3), both
Potts, symmetric normalisation.

Implementations (each in a fresh interpreter, so that its peak RSS is its own):
    pydensecrf        pydensecrf2's DenseCRF(N, L) with the features above (single-threaded)
    deepcrf-compat    the same calls through deepcrf.compat.pydensecrf (its lattice)
    deepcrf-dense     deepcrf.dense_crf(logits (1, 2, D, H, W), volume (1, 1, D, H, W),
                      spacing=(2, 1, 1)) without autograd
    deepcrf-train     DenseCRF with learnable compat, weights and per-axis bandwidths:
                      forward + backward of an NLL loss (5 iterations)

Times: median of ``--repeats`` runs after a cold one, each the whole user cost (features,
lattices, inference). Memory: peak RSS minus the worker's peak after warming up on an 8³
volume. "agree" is the fraction of voxels whose label equals pydensecrf's.

Usage:
    python benchmarks/bench_volume.py              # the 64x128x128 case
    python benchmarks/bench_volume.py --quick      # 16x32x32, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPACING = (2.0, 1.0, 1.0)
THETA_ALPHA, THETA_BETA, THETA_GAMMA = 8.0, 20.0, 3.0
W_BILATERAL, W_GAUSSIAN = 5.0, 3.0
IMPLS = ("pydensecrf", "deepcrf-compat", "deepcrf-dense", "deepcrf-train")


def make_case(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volume (D, H, W) float32, unary (2, N) float32 energies, labels (D, H, W))."""
    from deepcrf.data.synthetic_volume import SyntheticVolumes

    item = SyntheticVolumes("val", 1, shape=shape, spacing=SPACING, modalities=1, noise=35.0)[0]
    volume = item.image[0]
    means, sigma = np.array([35.0, 110.0]), 30.0
    energy = 0.5 * ((volume[None] - means[:, None, None, None]) / sigma) ** 2
    unary = energy.reshape(2, -1).astype(np.float32)
    return volume.astype(np.float32), unary, (item.labels > 0).astype(np.int64)


def _pydensecrf_like(module, utils, volume, unary, iters):
    n = volume.size
    crf = module.DenseCRF(n, 2)
    crf.setUnaryEnergy(unary)
    sd_g = tuple(THETA_GAMMA / s for s in SPACING)
    sd_b = tuple(THETA_ALPHA / s for s in SPACING)
    crf.addPairwiseEnergy(utils.create_pairwise_gaussian(sd_g, volume.shape), compat=W_GAUSSIAN)
    feats = utils.create_pairwise_bilateral(sd_b, (THETA_BETA,), volume[..., None], chdim=3)
    crf.addPairwiseEnergy(feats, compat=W_BILATERAL)
    q = np.array(crf.inference(iters))
    return q.argmax(0).reshape(volume.shape)


def _runner(impl: str, iters: int):
    import torch

    if impl == "pydensecrf":
        try:
            import pydensecrf.densecrf as pyd
            import pydensecrf.utils as pyu
        except ImportError:
            return "pydensecrf not installed"
        return lambda v, u: _pydensecrf_like(pyd, pyu, v, u, iters)
    if impl == "deepcrf-compat":
        import deepcrf.compat.pydensecrf.densecrf as ours
        import deepcrf.compat.pydensecrf.utils as our_utils

        return lambda v, u: _pydensecrf_like(ours, our_utils, v, u, iters)
    from deepcrf.crf.dense import DenseCRF, dense_crf

    def tensors(volume, unary):
        logits = torch.from_numpy(-unary).reshape(1, 2, *volume.shape)
        return logits, torch.from_numpy(volume)[None, None]

    if impl == "deepcrf-dense":

        def run(volume, unary):
            logits, ref = tensors(volume, unary)
            with torch.no_grad():
                out = dense_crf(
                    logits, ref, iters=iters, theta_alpha=THETA_ALPHA, theta_beta=THETA_BETA,
                    theta_gamma=THETA_GAMMA, w_bilateral=W_BILATERAL, w_spatial=W_GAUSSIAN,
                    spacing=SPACING,
                )  # fmt: skip
            return out[0].argmax(0).numpy()

        return run
    if impl == "deepcrf-train":

        def train_step(volume, unary):
            logits, ref = tensors(volume, unary)
            crf = DenseCRF(
                2, theta_alpha=(THETA_ALPHA,) * 3, theta_beta=THETA_BETA,
                theta_gamma=(THETA_GAMMA,) * 3, w_bilateral=W_BILATERAL, w_spatial=W_GAUSSIAN,
                iters=iters, learnable=("compat", "weights", "bandwidths"),
            )  # fmt: skip
            crf._accuracy_checked = True  # time the layer, not its one-off accuracy check
            out = crf(logits.requires_grad_(), ref, spacing=SPACING)
            target = out.detach().argmax(1)
            torch.nn.functional.nll_loss(out, target).backward()
            return out[0].detach().argmax(0).numpy()

        return train_step
    raise ValueError(f"unknown implementation {impl!r}")


def _worker(impl: str, case: str, iters: int, repeats: int, labels_out: str) -> dict:
    import resource

    import torch  # noqa: F401  (same imports in every worker)

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    run = _runner(impl, iters)
    if isinstance(run, str):
        return {"skipped": run}
    small = make_case((8, 8, 8))
    run(small[0], small[1])
    base = peak_mb()
    with np.load(case) as data:
        volume, unary = data["volume"], data["unary"]
    start = time.perf_counter()
    labels = run(volume, unary)
    cold = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(volume, unary)
        times.append(time.perf_counter() - start)
    np.save(labels_out, labels.astype(np.uint8))
    return {
        "seconds": statistics.median(times) if times else cold,
        "seconds_all": times,
        "cold_seconds": cold,
        "baseline_peak_mb": base,
        "peak_rss_mb": peak_mb(),
        "extra_peak_mb": peak_mb() - base,
    }


def _spawn(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ))
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64x128x128", help="DxHxW voxels")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--quick", action="store_true", help="16x32x32, one repeat")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--make-case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, case, iters, repeats, labels_out = args.worker
        print(json.dumps(_worker(impl, case, int(iters), int(repeats), labels_out)))
        return 0
    if args.make_case:
        shape, path = args.make_case
        volume, unary, labels = make_case(tuple(int(v) for v in shape.split("x")))
        np.savez(path, volume=volume, unary=unary, labels=labels)
        print(json.dumps({"case": path}))
        return 0
    if args.quick:
        args.shape, args.repeats = "16x32x32", 1
    with tempfile.TemporaryDirectory() as tmp:
        return _drive(args, Path(tmp))


def _drive(args: argparse.Namespace, tmp: Path) -> int:
    shape = args.shape
    case = tmp / "case.npz"
    made = _spawn(["--make-case", shape, str(case)])
    if "error" in made:
        raise SystemExit(f"making the case failed: {made['error']}")
    truth = np.load(case)["labels"]
    print(f"# volume {shape} (D x H x W), spacing {SPACING} mm, 2 labels, {args.iters} iterations")
    print(f"# cpu cores {os.cpu_count()}; 'extra MB': peak RSS - the peak after an 8^3 warm-up")
    header = (
        f"{'impl':>16} {'seconds':>9} {'x pydensecrf':>13} {'extra MB':>9} {'x mem':>7} "
        f"{'cold s':>8} {'agree':>7} {'acc':>7}"
    )
    print(header)
    results, ref, ref_labels = [], None, None
    for impl in [i for i in args.impls.split(",") if i]:
        out = tmp / f"{impl}.npy"
        res = _spawn(["--worker", impl, str(case), str(args.iters), str(args.repeats), str(out)])
        res["impl"] = impl
        results.append(res)
        if "seconds" not in res:
            print(f"{impl:>16}   skipped: {res.get('skipped') or res.get('error')}")
            continue
        labels = np.load(out)
        res["accuracy"] = float((labels == truth).mean())
        if impl == "pydensecrf":
            ref, ref_labels = res, labels
        if ref_labels is not None:
            res["agreement"] = float((labels == ref_labels).mean())
        speed = f"{ref['seconds'] / res['seconds']:.2f}x" if ref else "-"
        mem = f"{res['extra_peak_mb'] / max(ref['extra_peak_mb'], 1e-9):.2f}" if ref else "-"
        agree = f"{res['agreement']:.4f}" if "agreement" in res else "-"
        print(
            f"{impl:>16} {res['seconds']:>9.3f} {speed:>13} {res['extra_peak_mb']:>9.0f} "
            f"{mem:>7} {res['cold_seconds']:>8.3f} {agree:>7} {res['accuracy']:>7.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
