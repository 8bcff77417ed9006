"""Benchmark every dense-CRF entry point against pydensecrf's inference, same run.

Rows (each in a fresh subprocess, so that peak memory is per row), at one image size, 21
labels, pydensecrf's README parameters (bilateral sxy=80, srgb=13, compat=10; Gaussian sxy=3,
compat=3) on a blocky photo-like image:

* ``pydensecrf2 inference``   — the peer (C++, one thread), when installed;
* ``compat inference``        — ``deepcrf.compat.pydensecrf`` (the same calls);
* ``dense_crf no grad``       — the functional form (the mean-field engine's inference mode);
* ``DenseCRF eval``           — the layer in eval mode with compat + weights learnable;
* ``DenseCRF fwd+bwd c+w``    — forward + backward, compat and weights learnable;
* ``DenseCRF fwd+bwd c+w+bw`` — also the bandwidths, with and without ``checkpoint=True``;
* ``dense_crf no grad x4``    — a batch of 4 images in one call (ratio: per 4 single calls);
* ``exact fwd+bwd (small)``   — the O(N²) reference at a small size, against the lattice there.

"time / pydensecrf" divides by the peer's time in this run. Peak memory (first run): CPU =
the process's peak RSS (ru_maxrss) minus its RSS after the inputs were made, with glibc's
MALLOC_MMAP_THRESHOLD_ lowered so freed buffers leave the RSS; CUDA =
torch.cuda.max_memory_allocated minus the allocation before the run. Times: from a second
process with glibc's default allocator, the median of the runs after the first (the first pays
one-time set-up and page faults).

    python benchmarks/bench_crf_layer.py                  # 375x500, 10 iterations
    python benchmarks/bench_crf_layer.py --size 768 1024  # the larger target size
    python benchmarks/bench_crf_layer.py --quick          # 96x128 smoke run
    python benchmarks/bench_crf_layer.py --device cuda --batch 1 8   # on a GPU

``--src DIR`` imports deepcrf from DIR/src instead (to time an older checkout in the same run:
the "before" column of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inputs(h, w, labels, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    lab = ((ys * 7 // h) * 3 + (xs * 5 // w)) % labels
    colours = torch.rand(labels, 3, generator=g) * 255
    image = (colours[lab].permute(2, 0, 1) + 10 * torch.randn(3, h, w, generator=g)).clamp(0, 255)
    onehot = torch.nn.functional.one_hot(lab, labels).permute(2, 0, 1).float()
    logits = 2 * onehot + 1.5 * torch.randn(labels, h, w, generator=g)
    return logits[None].to(device), image[None].to(device), lab[None].to(device)


# ------------------------------------------------------------------------------------------
# one measurement (runs in a subprocess)
# ------------------------------------------------------------------------------------------

PYDENSECRF_PARAMS = dict(theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0, w_bilateral=10.0,
                         w_spatial=3.0)  # fmt: skip


def _batch(x, b):
    return x.expand(b, *x.shape[1:]).contiguous()


def _measure(cfg):
    if cfg.get("src"):
        sys.path.insert(0, os.path.join(cfg["src"], "src"))
    from deepcrf.crf.dense import DenseCRF, dense_crf

    torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    h, w, num, iters, b = cfg["h"], cfg["w"], cfg["labels"], cfg["iters"], cfg.get("batch", 1)
    logits, image, labels = _inputs(h, w, num, dev)
    logits, image, labels = _batch(logits, b), _batch(image, b), _batch(labels, b)
    kind = cfg["kind"]
    if kind in ("pydensecrf", "compat"):
        if kind == "pydensecrf":
            import pydensecrf.densecrf as dcrf
        else:
            import deepcrf.compat.pydensecrf.densecrf as dcrf

        img = np.ascontiguousarray(image[0].permute(1, 2, 0).round().byte().cpu().numpy())
        unary = np.ascontiguousarray(-logits[0].log_softmax(0).reshape(num, -1).cpu().numpy())

        def run():
            d = dcrf.DenseCRF2D(w, h, num)
            d.setUnaryEnergy(unary)
            d.addPairwiseGaussian(sxy=3, compat=3)
            d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
            return np.array(d.inference(iters))

    elif kind == "functional":

        def run():
            with torch.no_grad():
                return dense_crf(logits, image, iters=iters, method=cfg["method"],
                                 **PYDENSECRF_PARAMS)  # fmt: skip

    else:
        learn = tuple(cfg.get("learn", ()))
        crf = DenseCRF(
            num, iters=iters, learnable=learn, method=cfg["method"],
            checkpoint=cfg.get("checkpoint", False), **PYDENSECRF_PARAMS,
        ).to(dev)  # fmt: skip
        if not cfg["backward"]:
            crf.eval()

        def run():
            if not cfg["backward"]:
                with torch.no_grad():
                    return crf(logits, image)
            out = crf(logits, image)
            torch.nn.functional.nll_loss(out, labels).backward()

    # Memory from the first run (CPU: peak RSS over the RSS before it; later runs reuse memory
    # the allocator kept, so they would under-count); time from the later runs.
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_mb()
    run()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _peak_rss_mb() - base_rss
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times) if times else None
    return {"seconds": seconds, "all_seconds": times, "peak_mb": peak}


def _child(cfg, env):
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_child(cfg):
    """Peak memory and times from two processes.

    Memory: large buffers straight from mmap, so a freed buffer leaves the RSS at once
    (otherwise glibc keeps freed heap memory and the peak RSS counts dead tensors). Times: glibc's
    default allocator, as a user runs it (the low mmap threshold makes every large tensor fresh
    memory, whose page faults measured up to 2x the backward's time at VOC size).
    """
    mem = _child({**cfg, "repeats": 0}, dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
    if "error" in mem:
        return mem
    timed = _child(cfg, dict(os.environ))
    if "error" in timed:
        return timed
    return {**timed, "peak_mb": mem["peak_mb"]}


def _plan(args, batch):
    rows = []
    if args.device == "cpu" and batch == 1:
        try:
            import pydensecrf.densecrf  # noqa: F401

            rows.append(("pydensecrf2 inference (C++)", dict(kind="pydensecrf")))
        except ImportError:
            print("# pydensecrf2 not installed: no peer row (pip install -e '.[bench]')")
        rows.append(("compat inference", dict(kind="compat")))
    rows += [
        ("dense_crf no grad", dict(kind="functional")),
        ("DenseCRF eval (c+w learnable)", dict(kind="layer", backward=False,
                                                learn=("compat", "weights"))),
        ("DenseCRF fwd+bwd c+w", dict(kind="layer", backward=True,
                                      learn=("compat", "weights"))),
        ("DenseCRF fwd+bwd c+w+bw", dict(kind="layer", backward=True,
                                         learn=("compat", "weights", "bandwidths"))),
        ("DenseCRF fwd+bwd c+w+bw ckpt", dict(kind="layer", backward=True, checkpoint=True,
                                              learn=("compat", "weights", "bandwidths"))),
    ]  # fmt: skip
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    p.add_argument("--labels", type=int, default=21)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=(1, 4),
        help="batch sizes (the rows after the first size are the batched ones)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--exact-size", type=int, nargs=2, default=(32, 40), metavar=("H", "W"))
    p.add_argument("--src", help="import deepcrf from DIR/src (an older checkout)")
    p.add_argument("--quick", action="store_true", help="96x128, 1 repeat: a smoke run")
    p.add_argument("--json", help="write all rows to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(json.loads(args.child))))
        return 0
    if args.quick:
        args.size, args.repeats, args.exact_size = (96, 128), 1, (16, 20)
    h, w = args.size
    base = dict(h=h, w=w, labels=args.labels, threads=args.threads, device=args.device,
                repeats=args.repeats, method="lattice", iters=args.iters, src=args.src)  # fmt: skip
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"device {args.device}, load average {os.getloadavg()[0]:.1f}, "
          f"deepcrf from {args.src or 'this checkout'}")  # fmt: skip
    print(
        f"# image {h}x{w}, {args.labels} labels, {args.iters} iterations, "
        f"times = median of {args.repeats} after a first run"
    )
    print(f"{'row':<34} {'batch':>5} {'seconds':>9} {'peak MB':>9} {'time / pydensecrf':>18}")
    rows = []
    peer = None
    single: dict[str, float] = {}
    for batch in args.batch:
        for name, extra in _plan(args, batch):
            cfg = {**base, "batch": batch, **extra}
            res = _run_child(cfg)
            res.update(name=name, batch=batch, size=[h, w], iters=args.iters)
            rows.append(res)
            if "error" in res:
                print(f"{name:<34} {batch:>5} error: {res['error']}")
                continue
            if extra["kind"] == "pydensecrf":
                peer = res["seconds"]
            if batch == 1:
                single[name] = res["seconds"]
            ratio = res["seconds"] / peer if peer else float("nan")
            note = ""
            if batch > 1 and name in single:
                note = f"  ({res['seconds'] / single[name]:.2f}x one image)"
            res["time_over_pydensecrf"] = ratio
            print(f"{name:<34} {batch:>5} {res['seconds']:>9.3f} {res['peak_mb']:>9.1f} "
                  f"{ratio:>18.2f}{note}")  # fmt: skip
    eh, ew = args.exact_size
    small = {**base, "h": eh, "w": ew, "iters": 5, "backward": True, "kind": "layer",
             "learn": ("compat", "weights", "bandwidths")}  # fmt: skip
    lat = _run_child(small)
    ex = _run_child({**small, "method": "exact"})
    for name, res in (("lattice fwd+bwd (small)", lat), ("exact O(N^2) fwd+bwd (small)", ex)):
        res.update(name=name, iters=5, size=[eh, ew])
        rows.append(res)
        if "error" in res:
            print(f"{name:<34} error: {res['error']}")
            continue
        ratio = res["seconds"] / lat["seconds"] if "seconds" in lat else float("nan")
        print(f"{name + f' {eh}x{ew}':<34} {1:>5} {res['seconds']:>9.3f} "
              f"{res['peak_mb']:>9.1f} {ratio:>11.2f} x lattice")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
