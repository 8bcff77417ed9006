"""Dense CRF inference: deepcrf vs pydensecrf, measured in the same run.

Every (implementation, image size, iterations) case runs in a fresh Python subprocess so that
its peak resident memory can be read from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; the
figure reported is that peak minus the same process's peak after warming the implementation
up on an 8x8 image (imports, the compiled kernel, one-off allocations) — i.e. the extra memory
the CRF itself needed.  The driver stays small (cases and machine facts are made in child
processes too): on Linux a child's ``ru_maxrss`` starts at the parent's peak RSS at the fork,
so a driver that had made a large case would put a floor under every figure (it did until
session 4: the 800x600 and 1024x768 figures of earlier tables are that floor).  Times are the
median over ``--repeats`` runs inside the subprocess, after one run timed apart ("cold": the
first run on the case, faulting in fresh memory), of the full work a user pays for: building
the CRF (unary, Gaussian and bilateral terms, lattices) plus ``iters`` mean-field iterations.
(Until session 4 the cold run was one of the repeats.)

Parameters: DeepLab v1 (bilateral w=4, θα=121, θβ=5; Gaussian w=3, θγ=3), 21 labels, the
unary from a smooth random 21-class softmax, the image the reference photo
(shared/reference/densecrf_voc_case.npz) resized to each size when available, else a
synthetic one.

Implementations:
    pydensecrf        pydensecrf2 from PyPI (optional; single-threaded C++)
    deepcrf-compat    deepcrf.compat.pydensecrf (same lattice as pydensecrf); on CPU with the
                      compiled lattice kernel when it builds (deepcrf.ops.native)
    deepcrf-compat-torch  the same with DEEPCRF_NATIVE=0: the pure-PyTorch lattice
    deepcrf-dense     deepcrf.dense_crf (the trainable layer, no_grad), CPU
    deepcrf-dense-torch   the same with DEEPCRF_NATIVE=0
    deepcrf-dense-cuda  the same on CUDA when a GPU is present (synchronised timings)

Usage:
    python benchmarks/bench_densecrf.py                 # full table
    python benchmarks/bench_densecrf.py --quick         # smoke run on small images
    python benchmarks/bench_densecrf.py --threads 1     # torch.set_num_threads(1)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "densecrf_voc_case.npz"
LABELS = 21
PARAMS = {
    "w_bilateral": 4.0,
    "theta_alpha": 121.0,
    "theta_beta": 5.0,
    "w_spatial": 3.0,
    "theta_gamma": 3.0,
}
IMPLS = (
    "pydensecrf",
    "deepcrf-compat",
    "deepcrf-compat-torch",
    "deepcrf-dense",
    "deepcrf-dense-torch",
    "deepcrf-dense-cuda",
)


def _make_case(width: int, height: int, labels: int = LABELS):
    rng = np.random.default_rng(0)
    if REFERENCE.exists():
        from PIL import Image

        photo = np.load(REFERENCE)["image"]
        image = np.array(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
    else:
        yy, xx = np.mgrid[0:height, 0:width]
        image = np.stack(
            [
                (xx * 255 // max(width - 1, 1)),
                (yy * 255 // max(height - 1, 1)),
                ((xx // 32 + yy // 32) % 2) * 200,
            ],
            axis=-1,
        ).astype(np.uint8)
    coarse = rng.normal(size=(labels, max(height // 16, 2), max(width // 16, 2))) * 3
    # Nearest-neighbour upsampling of a coarse logit grid, then softmax: blocky class regions.
    rows = np.minimum(np.arange(height) * coarse.shape[1] // height, coarse.shape[1] - 1)
    cols = np.minimum(np.arange(width) * coarse.shape[2] // width, coarse.shape[2] - 1)
    logits = coarse[:, rows][:, :, cols] + rng.normal(size=(labels, height, width))
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    unary = np.ascontiguousarray((-np.log(np.clip(probs, 1e-5, 1))).reshape(labels, -1))
    return np.ascontiguousarray(image), unary.astype(np.float32)


def _as_is(image, unary):
    return image, unary


def _run_pydensecrf_like(module, image, unary, iters):
    height, width = image.shape[:2]
    crf = module.DenseCRF2D(width, height, unary.shape[0])
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=PARAMS["theta_gamma"], compat=PARAMS["w_spatial"])
    crf.addPairwiseBilateral(
        sxy=PARAMS["theta_alpha"],
        srgb=PARAMS["theta_beta"],
        rgbim=image,
        compat=PARAMS["w_bilateral"],
    )
    return np.array(crf.inference(iters))


def _runner(impl: str, iters: int):
    """(prepare, run) for ``impl``, or a str saying why it cannot run here.

    ``prepare(image, unary)`` converts the inputs outside the timing (dense_crf takes tensors),
    ``run(*prepared)`` is the timed work.
    """
    import torch

    if impl == "pydensecrf":
        try:
            import pydensecrf.densecrf as pyd
        except ImportError:
            return "pydensecrf not installed"
        return _as_is, lambda image, unary: _run_pydensecrf_like(pyd, image, unary, iters)
    if impl in ("deepcrf-compat", "deepcrf-compat-torch"):
        import deepcrf.compat.pydensecrf.densecrf as ours

        return _as_is, lambda image, unary: _run_pydensecrf_like(ours, image, unary, iters)
    if impl.startswith("deepcrf-dense"):
        device = "cuda" if impl.endswith("cuda") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        try:
            from deepcrf.crf.dense import dense_crf
        except ImportError as exc:
            return f"deepcrf.crf.dense unavailable ({exc})"

        def prepare(image, unary):
            height, width = image.shape[:2]
            image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)
            logits_t = (-torch.from_numpy(unary)).reshape(1, LABELS, height, width).to(device)
            return logits_t, image_t

        def run(logits_t, image_t):
            with torch.no_grad():
                out = dense_crf(logits_t, image_t, iters=iters, **PARAMS)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return prepare, run
    raise ValueError(f"unknown implementation {impl!r}")


def _worker(impl: str, case: str, iters: int, repeats: int, threads: int) -> dict:
    import resource

    import torch

    import deepcrf  # noqa: F401  (same imports in every worker)

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if threads > 0:
        torch.set_num_threads(threads)
    runner = _runner(impl, iters)
    if isinstance(runner, str):
        return {"skipped": runner}
    prepare, run = runner
    # The baseline: this interpreter after warming the implementation up on an 8x8 image
    # (lazily loaded library code, the compiled kernel, one-off allocations), so that "extra"
    # is the memory the case itself needs.
    run(*prepare(*_make_case(8, 8)))
    base = peak_mb()
    # The case is made by the parent and loaded here, so the inputs (the only memory both
    # implementations must hold) do not inflate the peak with the generator's temporaries.
    with np.load(case) as data:
        inputs = prepare(data["image"], data["unary"])
    # The first run on the case is timed apart ("cold": fresh memory to fault in, first use of
    # code paths); "seconds" is the median of the `repeats` runs after it.
    start = time.perf_counter()
    run(*inputs)
    cold = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*inputs)
        times.append(time.perf_counter() - start)
    out = {
        "seconds": statistics.median(times),
        "seconds_all": times,
        "cold_seconds": cold,
        "baseline_peak_mb": base,
        "peak_rss_mb": peak_mb(),
        "extra_peak_mb": peak_mb() - base,
    }
    if impl.endswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _spawn(args: list[str]) -> dict:
    """Run one worker case in a fresh interpreter; its JSON result (or {"error": ...})."""
    env = dict(os.environ)
    if args[0].endswith("-torch"):
        env["DEEPCRF_NATIVE"] = "0"
    return _spawn_plain(["--worker", *args], env)


def _spawn_plain(args: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import torch

    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        from importlib.metadata import version

        info["pydensecrf2"] = version("pydensecrf2")
    except Exception:
        info["pydensecrf2"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from deepcrf.ops import native

    info["cpu_lattice"] = native.status()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated WxH image sizes (default 320x240,500x375,800x600,1024x768; "
        "--quick: 64x48,96x72)",
    )
    parser.add_argument("--iters", default="5,10", help="comma-separated iteration counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads in the workers (0: leave torch's default)",
    )
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--make-case", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--machine-info", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        impl, case, iters, repeats, threads = args.worker
        print(json.dumps(_worker(impl, case, int(iters), int(repeats), int(threads))))
        return 0
    if args.make_case:
        width, height, path = args.make_case
        image, unary = _make_case(int(width), int(height))
        np.savez(path, image=image, unary=unary)
        print(json.dumps({"case": path}))
        return 0
    if args.machine_info:
        print(json.dumps(_machine()))
        return 0

    if args.quick:
        args.sizes, args.iters, args.repeats = args.sizes or "64x48,96x72", "5", 1
    args.sizes = args.sizes or "320x240,500x375,800x600,1024x768"
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    iters_list = [int(v) for v in args.iters.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    # Everything heavy runs in child processes: Linux reports a child's ru_maxrss as at least
    # the parent's peak RSS at the fork (it survives exec), so a parent that had made a large
    # case or imported torch would set a floor under every measured peak.
    machine = _spawn_plain(["--machine-info"])
    print(f"# machine: {json.dumps(machine)}")
    print(
        "# 'extra peak MB' = peak RSS of the worker running the case - its peak after warming "
        "the same implementation up on an 8x8 image (each case in a fresh interpreter)"
    )
    header = (
        f"{'size':>10} {'iters':>5} {'impl':>20} {'seconds':>9} {'x pydensecrf':>13} "
        f"{'extra peak MB':>14} {'cold s':>8} {'x (cold)':>9}"
    )
    print(header)
    results = []
    tmp = tempfile.TemporaryDirectory()
    for width, height in sizes:
        case = Path(tmp.name) / f"case_{width}x{height}.npz"
        made = _spawn_plain(["--make-case", str(width), str(height), str(case)])
        if "error" in made:
            raise SystemExit(f"making the {width}x{height} case failed: {made['error']}")
        for iters in iters_list:
            ref_seconds = ref_cold = None
            for impl in impls:
                res = _spawn([impl, str(case), str(iters), str(args.repeats), str(args.threads)])
                res.update(impl=impl, width=width, height=height, iters=iters)
                results.append(res)
                if "seconds" not in res:
                    reason = res.get("skipped") or res.get("error")
                    print(f"{width}x{height:<5} {iters:>5} {impl:>20}   skipped: {reason}")
                    continue
                if impl == "pydensecrf":
                    ref_seconds, ref_cold = res["seconds"], res["cold_seconds"]
                speedup = f"{ref_seconds / res['seconds']:.2f}x" if ref_seconds else "-"
                cold_speedup = f"{ref_cold / res['cold_seconds']:.2f}x" if ref_seconds else "-"
                extra = res["extra_peak_mb"]
                line = (
                    f"{width}x{height:<5} {iters:>5} {impl:>20} {res['seconds']:>9.3f} "
                    f"{speedup:>13} {extra:>14.0f} {res['cold_seconds']:>8.3f} {cold_speedup:>9}"
                )
                if "cuda_peak_mb" in res:
                    line += f"  (CUDA peak {res['cuda_peak_mb']:.0f} MB)"
                print(line, flush=True)
    tmp.cleanup()
    if args.json is not None:
        payload = {"machine": machine, "results": results}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
