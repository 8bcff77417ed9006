"""Learning the CRF's weights and bandwidths by gradient descent against a grid search.

Synthetic scenes (rectangles of random colours with colour noise) with noisy unaries, where the
default parameters (θα = 80, θβ = 13, θγ = 3, weights 10 / 3) are clearly not the best: a grid
search on the training images (the ``tune-crf`` procedure, mean-field through the engine)
finds better ones. Then ``DenseCRF(learnable=("weights", "bandwidths"))`` starts from the
defaults and is trained with Adam on the NLL of the same training images. Both are scored by
mIoU on held-out images; the script prints the three mIoUs and the time each took.

    python benchmarks/learn_vs_grid.py          # 24 train + 24 held-out 64×64 scenes
    python benchmarks/learn_vs_grid.py --quick  # smaller
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from deepcrf.crf.dense import DenseCRF, dense_crf
from deepcrf.metrics import ConfusionMatrix

LABELS = 4


def scenes(n, size, seed):
    """(logits (n, L, S, S), image (n, 3, S, S) 0-255, labels (n, S, S)): blocks + noise."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(12):  # overlapping rectangles of random labels
            y0, x0 = (int(v) for v in torch.randint(0, size - 8, (2,), generator=g))
            hh, ww = (int(v) for v in torch.randint(4, size // 3, (2,), generator=g))
            inside = (ys >= y0) & (ys < y0 + hh) & (xs >= x0) & (xs < x0 + ww)
            labels[i][inside] = int(torch.randint(0, LABELS, (1,), generator=g))
    colours = torch.rand(n, LABELS, 3, generator=g) * 200 + 25
    image = torch.stack([colours[i][labels[i]] for i in range(n)]).permute(0, 3, 1, 2)
    image = (image + 30 * torch.randn(image.shape, generator=g)).clamp(0, 255)
    onehot = torch.nn.functional.one_hot(labels, LABELS).permute(0, 3, 1, 2).float()
    logits = 1.0 * onehot + 1.2 * torch.randn(onehot.shape, generator=g)
    return logits, image, labels


def miou(pred, labels):
    cm = ConfusionMatrix(LABELS)
    for p, t in zip(pred, labels, strict=True):
        cm.update(p, t)
    return 100 * float(cm.compute()["miou"])


def run_crf(logits, image, params, iters):
    with torch.no_grad():
        return dense_crf(logits, image, iters=iters, **params).argmax(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.size, args.steps = 8, 48, 30
    experiment(args)
    return 0


def experiment(args):
    """Run the comparison; returns the held-out mIoUs (percent) and the seconds."""
    train = scenes(args.images, args.size, seed=1)
    held = scenes(args.images, args.size, seed=2)
    defaults = dict(theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0, w_bilateral=10.0,
                    w_spatial=3.0)  # fmt: skip
    print(f"# {args.images} train + {args.images} held-out {args.size}x{args.size} scenes, "
          f"{LABELS} labels, {args.iters} mean-field iterations, torch {torch.get_num_threads()} "
          "threads")  # fmt: skip
    print(f"unary alone held-out mIoU   {miou(held[0].argmax(1), held[2]):6.2f}")
    default_miou = miou(run_crf(*held[:2], defaults, args.iters), held[2])
    print(f"defaults    held-out mIoU   {default_miou:6.2f}")

    t0 = time.perf_counter()
    grid = itertools.product([1.0, 3.0, 10.0, 30.0], [5.0, 10.0, 20.0, 40.0, 80.0],
                             [5.0, 13.0, 30.0, 60.0], [0.0, 3.0], [1.0, 3.0])  # fmt: skip
    best, best_score = None, -1.0
    for wb, ta, tb, ws, tg in grid:
        params = dict(theta_alpha=ta, theta_beta=tb, theta_gamma=tg, w_bilateral=wb,
                      w_spatial=ws)  # fmt: skip
        score = miou(run_crf(*train[:2], params, args.iters), train[2])
        if score > best_score:
            best, best_score = params, score
    grid_s = time.perf_counter() - t0
    grid_miou = miou(run_crf(*held[:2], best, args.iters), held[2])
    print(f"grid search held-out mIoU   {grid_miou:6.2f}   ({grid_s:.0f} s; best {best})")

    t0 = time.perf_counter()
    torch.manual_seed(0)
    crf = DenseCRF(LABELS, iters=args.iters, learnable=("weights", "bandwidths"), **defaults)
    crf._accuracy_checked = True  # this data is the regime the warning is about: measured here
    opt = torch.optim.Adam(crf.parameters(), lr=0.1)
    logits, image, labels = train
    for _ in range(args.steps):
        idx = torch.randperm(args.images)[:8]
        opt.zero_grad()
        loss = torch.nn.functional.nll_loss(crf(logits[idx], image[idx]), labels[idx])
        loss.backward()
        opt.step()
    learn_s = time.perf_counter() - t0
    crf.eval()
    learned = dict(theta_alpha=crf.theta_alpha, theta_beta=crf.theta_beta,
                   theta_gamma=crf.theta_gamma, w_bilateral=float(crf.w_bilateral.detach()),
                   w_spatial=float(crf.w_spatial.detach()))  # fmt: skip
    learn_miou = miou(run_crf(*held[:2], learned, args.iters), held[2])
    shown = {k: round(v, 2) for k, v in learned.items()}
    print(f"learned     held-out mIoU   {learn_miou:6.2f}   ({learn_s:.0f} s, {args.steps} Adam "
          f"steps of 8 images; {shown})")  # fmt: skip
    print(f"learned - grid: {learn_miou - grid_miou:+.2f} mIoU points")
    return {"defaults": default_miou, "grid": grid_miou, "learned": learn_miou,
            "grid_seconds": grid_s, "learn_seconds": learn_s}  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
