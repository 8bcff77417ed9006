"""tune-crf's grid search against the one-call-per-setting way, measured in the same run.

The grid search (DeepLab's: w_bilateral × θα × θβ, 144 settings, plus a refining round) runs
mean field 10 iterations per setting on every held-out image.  Two implementations score the
same grid on the same unaries and images:

* ``deepcrf.engine.tune`` — the library's: the weights of one bandwidth setting as label blocks
  of one fused call (:func:`deepcrf.ops.meanfield.sweep`), small images one per call on one
  Python thread per core, torch's ops serial;
* ``one call per setting`` — the peer: one :func:`~deepcrf.ops.meanfield.mean_field` call per
  setting and batch of 8 images (what tune-crf did before), on the same lattices.

Both must give the same mIoU for every setting (checked: at most 0.1 points apart, rounding in
float32 may move a pixel's argmax).  Images: the built-in synthetic ``val`` split (96×96, 6
classes); unaries: the ground truth one-hot plus Gaussian noise, or a trained checkpoint's with
``--checkpoint`` (the README example: ``runs/small``).  A second table times one ``sweep`` of
6 weights against 6 ``mean_field`` calls on one image at 96×96 and 375×500, 6 / 12 / 21
labels.

    python benchmarks/bench_tune.py                       # 100 images, the full grid
    python benchmarks/bench_tune.py --images 20 --rounds 1
    python benchmarks/bench_tune.py --checkpoint runs/small
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from dataclasses import replace

import torch

from deepcrf.crf.dense import bilateral_term, spatial_term
from deepcrf.data.synthetic import SyntheticSegmentation
from deepcrf.engine.config import DEEPLAB_GRID, TUNABLE
from deepcrf.engine.evaluation import predict_logits
from deepcrf.engine.tune import tune_dense_crf
from deepcrf.metrics import ConfusionMatrix
from deepcrf.ops.meanfield import mean_field, sweep


class _NoisyTruth(torch.nn.Module):
    """Unaries of the true labels plus noise (the image's item index seeds the noise)."""

    def __init__(self, labels: dict[int, torch.Tensor], num_classes: int, noise: float) -> None:
        super().__init__()
        self.labels, self.num_classes, self.noise = labels, num_classes, noise

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        key = int(image.sum().item())  # the image identifies its labels
        lab = self.labels[key]
        g = torch.Generator().manual_seed(key % 2**31)
        onehot = torch.nn.functional.one_hot(lab, self.num_classes).permute(2, 0, 1).float()
        return (onehot + self.noise * torch.randn(onehot.shape, generator=g))[None]


def _peer(cache, points, num_classes, iters):
    """Confusion matrices per setting: one mean_field call per setting and 8 images."""
    ia, ib, ig = (TUNABLE.index(k) for k in ("theta_alpha", "theta_beta", "theta_gamma"))
    iwb, iws = TUNABLE.index("w_bilateral"), TUNABLE.index("w_spatial")
    scores = {p: ConfusionMatrix(num_classes) for p in points}
    by_bw: dict[tuple, list] = {}
    for p in points:
        by_bw.setdefault((p[ia], p[ib], p[ig]), []).append(p)
    for k in range(0, len(cache), 8):
        chunk = cache[k : k + 8]
        images = torch.stack([c[0] for c in chunk]).float()
        unary = torch.stack([c[1] for c in chunk]).float()
        labels = torch.stack([c[2] for c in chunk])
        b, num, h, w = unary.shape
        base = unary.reshape(b, num, h * w).transpose(1, 2).reshape(b * h * w, num)
        for (ta, tb, tg), members in by_bw.items():
            bil, sp = bilateral_term(images, ta, tb), spatial_term(images, tg)
            for p in members:
                terms = [replace(bil, coef=torch.tensor(p[iwb])),
                         replace(sp, coef=torch.tensor(p[iws]))]  # fmt: skip
                pred = mean_field(base, terms, iters).argmax(-1).reshape(b, h, w)
                scores[p].update(pred, labels)
    return scores


def _grid_table(args) -> list[str]:
    ds = SyntheticSegmentation("val", n=args.images, num_classes=6)
    items = [ds[i] for i in range(len(ds))]
    if args.checkpoint:
        from deepcrf.engine.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)[0]
    else:
        model = _NoisyTruth(
            {int(torch.as_tensor(im).float().sum().item()): torch.as_tensor(lab)
             for im, lab in items}, 6, args.noise)  # fmt: skip
    data = [(torch.as_tensor(im), torch.as_tensor(lab)) for im, lab in items]
    t0 = time.perf_counter()
    ours = tune_dense_crf(model, data, num_classes=6, iters=args.iters, rounds=args.rounds,
                          max_images=None, progress=False)  # fmt: skip
    t_ours = time.perf_counter() - t0
    # the peer scores exactly the settings the library tried, on the same unaries (kept in
    # float16 as tune-crf keeps them)
    with torch.no_grad():
        unaries = [predict_logits(model, im[None].float(), use_crf=False) for im, _ in data]
        cache = [
            (im.to(torch.uint8).float(), u.log_softmax(1)[0].half().float(), lab)
            for (im, lab), u in zip(data, unaries, strict=True)
        ]
    points = [tuple(t["params"][k] for k in TUNABLE) for t in ours["trials"]]
    t0 = time.perf_counter()
    peer = _peer(cache, points, 6, args.iters)
    t_peer = time.perf_counter() - t0
    diff = max(abs(100 * float(peer[p].compute()["miou"]) - 100 * t["miou"])
               for p, t in zip(points, ours["trials"], strict=True))  # fmt: skip
    best = ours["best"]["params"]
    return [
        f"# tune grid: {len(points)} settings x {len(data)} images 96x96, {args.iters} iterations"
        f", unaries {'from ' + args.checkpoint if args.checkpoint else 'noisy truth'}",
        "implementation                 seconds   time / peer",
        f"one call per setting (peer)   {t_peer:8.1f}          1.00",
        f"deepcrf.engine.tune           {t_ours:8.1f}   {t_ours / t_peer:11.2f}",
        f"# largest mIoU difference between the two over all settings: {diff:.3f} points; "
        f"best {best} at {100 * ours['best']['miou']:.2f} mIoU",
    ]


def _sweep_table(args) -> list[str]:
    lines = ["# one sweep of 6 weights vs 6 mean_field calls, one image (sweep groups L <= 12)",
             "image      labels   6 calls s   sweep s   sweep / calls"]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([[w, 3.0] for w in DEEPLAB_GRID["w_bilateral"]])
    for (h, w), num in itertools.product(((96, 96), (375, 500)), (6, 12, 21)):
        image = (torch.rand(1, 3, h, w, generator=g) * 60 + 100).round()
        base = torch.randn(h * w, num, generator=g)
        terms = [bilateral_term(image, 70.0, 4.0), spatial_term(image, 3.0)]

        def calls(base=base, terms=terms):
            for a, b in weights.tolist():
                mean_field(base, [replace(terms[0], coef=torch.tensor(a)),
                                  replace(terms[1], coef=torch.tensor(b))], args.iters)  # fmt: skip

        def one(base=base, terms=terms):
            sweep(base, terms, weights, args.iters)

        times = {}
        for name, fn in (("calls", calls), ("sweep", one)):
            fn()
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            times[name] = statistics.median(runs)
        lines.append(f"{h}x{w:<6} {num:6d} {times['calls']:11.3f} {times['sweep']:9.3f} "
                     f"{times['sweep'] / times['calls']:15.2f}")  # fmt: skip
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100, help="held-out images (default 100)")
    p.add_argument("--rounds", type=int, default=2, help="grid rounds (default 2)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--noise", type=float, default=2.0, help="unary noise (no checkpoint)")
    p.add_argument("--checkpoint", default=None, help="score a trained model's unaries")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the sweep table")
    p.add_argument("--no-grid", action="store_true", help="only the sweep table")
    args = p.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load:.1f}")  # fmt: skip
    lines = [] if args.no_grid else _grid_table(args)
    lines += _sweep_table(args)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
