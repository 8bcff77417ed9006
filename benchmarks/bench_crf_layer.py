"""Benchmark the trainable dense CRF layer (DenseCRF) at VOC size: time and peak memory.

Rows (each measured in a fresh subprocess so that peak memory is per row):

* ``deepcrf fwd``       — DenseCRF forward under no_grad (inference).
* ``deepcrf fwd+bwd``   — forward + backward with compat, weights and bandwidths learnable,
                          with and without ``checkpoint=True``; and with compat + weights
                          only (what the naive peer learns).
* ``naive fwd+bwd``     — peer: a CRF-as-RNN-style layer written the plain way: the same
                          lattice (same splat/blur/slice entries) applied with ``index_add_`` /
                          gather in ordinary autograd, so autograd stores every intermediate of
                          every filtering; it learns compat and weights only (autograd cannot
                          differentiate the lattice build, so no bandwidth gradients).
* ``pydensecrf fwd``    — peer: pydensecrf2 (C++, single thread) inference, when installed.
* ``exact fwd+bwd``     — the O(N²) brute-force path at a small size, vs the lattice path there.

Peak memory (first run): CPU = the process's peak RSS (ru_maxrss) minus its RSS after the
inputs were made, with glibc's MALLOC_MMAP_THRESHOLD_ lowered so freed buffers leave the RSS;
CUDA = torch.cuda.max_memory_allocated minus the allocation before the run. Times: min over
the later runs. Ratios are against the deepcrf row with the same iterations, same run.

    python benchmarks/bench_crf_layer.py                 # 375x500, 21 labels, 5 and 10 iters
    python benchmarks/bench_crf_layer.py --quick         # 96x128 smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
# the naive peer: same lattice entries, plain autograd through index_add_
# ------------------------------------------------------------------------------------------


def _coo(csr):
    crow, col, val = csr.crow_indices(), csr.col_indices(), csr.values()
    row = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=col.device), crow.diff())
    return row, col, val


class _NaiveLattice:
    """Splat / blur / slice as index_add_ and gather; autograd keeps every intermediate."""

    def __init__(self, features):
        from deepcrf.ops.permutohedral import PermutohedralLattice

        lat = PermutohedralLattice(features)
        # Reads the lattice's sparse matrices (a private method): the peer must use the very
        # same lattice entries so that only the autograd strategy differs.
        splat, blur, slice_ = lat._matrices(features.dtype)
        self.m = splat.shape[0]  # vertices (plus any padding row the lattice keeps)
        self.splat = _coo(splat)
        self.blur = [_coo(b) for b in blur]
        self.slice = _coo(slice_)
        self.shape = features.shape[:2]

    @staticmethod
    def _spmm(coo, x, rows):
        row, col, val = coo
        out = x.new_zeros(rows, x.shape[1])
        return out.index_add(0, row, x[col] * val[:, None])

    def filter(self, values):
        b, n, c = values.shape
        x = self._spmm(self.splat, values.reshape(b * n, c), self.m)
        for blur in self.blur:
            x = self._spmm(blur, x, self.m)
        return self._spmm(self.slice, x, b * n).reshape(b, n, c)


def _naive_crf(logits, image, iters, compat, w_bil, w_sp, ta=80.0, tb=13.0, tg=3.0):
    from deepcrf.ops.filters import spatial_gaussian_filter

    b, num, h, w = logits.shape
    n = h * w
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(1, n, 2).to(logits)
    rgb = image.reshape(b, 3, n).transpose(1, 2)
    lat = _NaiveLattice(torch.cat([(pos / ta).expand(b, -1, -1), rgb / tb], -1))

    def spatial(q):
        c = q.shape[-1]
        grid = q.transpose(1, 2).reshape(b, c, h, w)
        return spatial_gaussian_filter(grid, tg).reshape(b, c, n).transpose(1, 2)

    ones = torch.ones(b, n, 1, dtype=logits.dtype, device=logits.device)
    s_b, s_s = lat.filter(ones).rsqrt(), spatial(ones).rsqrt()
    u = logits.reshape(b, num, n).transpose(1, 2)
    z = u
    for _ in range(iters):
        q = z.softmax(-1)
        msg = w_bil * (s_b * lat.filter(s_b * q)) + w_sp * (s_s * spatial(s_s * q))
        z = u - msg @ compat.T
    return z.log_softmax(-1).transpose(1, 2).reshape(b, num, h, w).contiguous()


# ------------------------------------------------------------------------------------------
# one measurement (runs in a subprocess)
# ------------------------------------------------------------------------------------------


def _measure(cfg):
    from deepcrf.crf.dense import DenseCRF

    torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    h, w, num, iters = cfg["h"], cfg["w"], cfg["labels"], cfg["iters"]
    logits, image, labels = _inputs(h, w, num, dev)
    kind = cfg["kind"]
    if kind == "pydensecrf":
        import pydensecrf.densecrf as dcrf

        img = np.ascontiguousarray(image[0].permute(1, 2, 0).round().byte().cpu().numpy())
        unary = np.ascontiguousarray(-logits[0].log_softmax(0).reshape(num, -1).cpu().numpy())

        def run():
            d = dcrf.DenseCRF2D(w, h, num)
            d.setUnaryEnergy(unary)
            d.addPairwiseGaussian(sxy=3, compat=3)
            d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
            return np.array(d.inference(iters))

    elif kind == "naive":
        compat = (1 - torch.eye(num, device=dev)).requires_grad_()
        w_bil = torch.tensor(10.0, device=dev, requires_grad=True)
        w_sp = torch.tensor(3.0, device=dev, requires_grad=True)

        def run():
            out = _naive_crf(logits, image, iters, compat, w_bil, w_sp)
            torch.nn.functional.nll_loss(out, labels).backward()

    else:
        learn = tuple(cfg.get("learn", ("compat", "weights", "bandwidths")))
        learn = () if cfg["backward"] is False else learn
        crf = DenseCRF(
            num, iters=iters, learnable=learn, filter=cfg["filter"], checkpoint=cfg["checkpoint"]
        ).to(dev)

        def run():
            if not cfg["backward"]:
                with torch.no_grad():
                    return crf(logits, image)
            out = crf(logits, image)
            torch.nn.functional.nll_loss(out, labels).backward()

    # Memory from the first run (CPU: peak RSS over the RSS before it; later runs reuse memory
    # the allocator kept, so they would under-count); time from the later runs (the first pays
    # lazy imports and one-time initialisation).
    if dev.type == "cuda":
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
    return {"seconds": min(times) if times else None, "all_seconds": times, "peak_mb": peak}


def _run_child(cfg):
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    # Large buffers straight from mmap, so a freed buffer leaves the RSS at once: otherwise
    # glibc keeps freed heap memory and the peak RSS counts dead tensors (at VOC size, 10
    # iterations with checkpointing read 1.3 GB that way instead of 0.56 GB).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    p.add_argument("--labels", type=int, default=21)
    p.add_argument("--iters", type=int, nargs="+", default=(5, 10))
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row (min is reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--exact-size", type=int, nargs=2, default=(48, 64), metavar=("H", "W"))
    p.add_argument(
        "--naive-max-iters", type=int, default=5,
        help="run the naive peer only up to this many iterations (it stores every index_add "
             "intermediate: ~GBs at VOC size on a shared machine)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="96x128, 1 repeat: a smoke run")
    p.add_argument("--json", help="write all rows to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(json.loads(args.child))))
        return 0
    if args.quick:
        args.size, args.repeats, args.exact_size = (96, 128), 1, (24, 32)
    h, w = args.size
    base = dict(h=h, w=w, labels=args.labels, threads=args.threads, device=args.device,
                repeats=args.repeats, filter="lattice", checkpoint=False)  # fmt: skip
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"device {args.device}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"# image {h}x{w}, {args.labels} labels, times = min of {args.repeats}")
    rows = []
    header = f"{'row':<34} {'iters':>5} {'seconds':>9} {'peak MB':>9} {'time / ours':>12}"
    print(header)
    for iters in args.iters:
        ours = {}
        plan = [
            ("deepcrf fwd (no grad)", dict(kind="deepcrf", backward=False)),
            ("deepcrf fwd+bwd", dict(kind="deepcrf", backward=True)),
            ("deepcrf fwd+bwd checkpoint", dict(kind="deepcrf", backward=True, checkpoint=True)),
            (
                "deepcrf fwd+bwd compat+weights",
                dict(kind="deepcrf", backward=True, learn=("compat", "weights")),
            ),
        ]
        if iters <= args.naive_max_iters:
            plan.append(("naive autograd fwd+bwd", dict(kind="naive", backward=True)))
        if args.device == "cpu":
            try:
                import pydensecrf.densecrf  # noqa: F401

                plan.append(("pydensecrf2 fwd (C++)", dict(kind="pydensecrf", backward=False)))
            except ImportError:
                print("# pydensecrf2 not installed: skipping that peer")
        for name, extra in plan:
            cfg = {**base, "iters": iters, **extra}
            res = _run_child(cfg)
            res.update(name=name, iters=iters, size=[h, w])
            rows.append(res)
            if "error" in res:
                print(f"{name:<34} {iters:>5} error: {res['error']}")
                continue
            ref_name = "deepcrf fwd (no grad)" if not extra["backward"] else "deepcrf fwd+bwd"
            ours.setdefault(name, res["seconds"])
            ratio = res["seconds"] / ours[ref_name] if ref_name in ours else float("nan")
            print(f"{name:<34} {iters:>5} {res['seconds']:>9.3f} {res['peak_mb']:>9.1f} "
                  f"{ratio:>12.2f}")  # fmt: skip
    eh, ew = args.exact_size
    small = {**base, "h": eh, "w": ew, "iters": 5, "backward": True, "kind": "deepcrf"}
    lat = _run_child(small)
    ex = _run_child({**small, "filter": "exact"})
    for name, res in (("lattice fwd+bwd (small)", lat), ("exact O(N^2) fwd+bwd (small)", ex)):
        res.update(name=name, iters=5, size=[eh, ew])
        rows.append(res)
        if "error" in res:
            print(f"{name:<34} {5:>5} error: {res['error']}")
            continue
        ratio = res["seconds"] / lat["seconds"] if "seconds" in lat else float("nan")
        print(f"{name + f' {eh}x{ew}':<34} {5:>5} {res['seconds']:>9.3f} "
              f"{res['peak_mb']:>9.1f} {ratio:>12.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
