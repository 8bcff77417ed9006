"""How close the lattice's gradients are to the exact Gaussian model's, on structured images.

The issue's case: a batch of 4 structured 64×64 images (colour blocks plus noise σ = 3,
one-hot-ish logits plus noise), DenseCRF with compat, weights and bandwidths learnable, the
NLL of the labels after 5 mean-field iterations; the gradients through the lattice
(``method="lattice"``) against the brute-force O(N²) ones (``method="exact"``, float64 for the
reference). Prints, per (θα, θβ): the cosine of the compat gradient and, for every scalar
(weights, log-bandwidths), the ratio lattice / exact (sign and factor).

    python benchmarks/grad_accuracy.py            # the three settings of the issue, 64×64×4
    python benchmarks/grad_accuracy.py --size 32  # quicker
"""

from __future__ import annotations

import argparse
import time

import torch

from deepcrf.crf.dense import DenseCRF, lattice_error


def scene(b, size, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    lab = torch.zeros(b, size, size, dtype=torch.long)
    for i in range(b):
        cy, cx = (int(v) for v in torch.randint(size // 4, 3 * size // 4, (2,), generator=g))
        lab[i] = ((ys >= cy).long() + 2 * (xs >= cx).long()) % labels
    colours = torch.rand(b, labels, 3, generator=g) * 200 + 20
    image = torch.stack([colours[i][lab[i]] for i in range(b)]).permute(0, 3, 1, 2)
    image = (image + 3 * torch.randn(image.shape, generator=g)).clamp(0, 255)
    onehot = torch.nn.functional.one_hot(lab, labels).permute(0, 3, 1, 2).double()
    logits = 2.0 * onehot + 1.5 * torch.randn(onehot.shape, generator=g, dtype=torch.float64)
    return logits, image.double(), lab


def gradients(method, logits, image, labels, ta, tb, dtype):
    crf = DenseCRF(
        logits.shape[1], theta_alpha=ta, theta_beta=tb, theta_gamma=3.0, w_bilateral=5.0,
        w_spatial=3.0, method=method, learnable=("compat", "weights", "bandwidths"),
    ).to(dtype)  # fmt: skip
    crf._accuracy_checked = True  # measured here explicitly
    out = crf(logits.to(dtype), image.to(dtype))
    torch.nn.functional.nll_loss(out, labels).backward()
    return {n: p.grad.detach().double().clone() for n, p in crf.named_parameters()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--labels", type=int, default=3)
    args = p.parse_args(argv)
    logits, image, labels = scene(args.batch, args.size, args.labels)
    print(f"# {args.batch} images {args.size}x{args.size}, {args.labels} labels, 5 iterations, "
          "lattice in float32 vs exact in float64")  # fmt: skip
    print(f"{'θα, θβ':<10} {'row-sum err':>11} {'compat cos':>10}  scalar ratios lattice/exact")
    for ta, tb in ((20.0, 13.0), (40.0, 30.0), (80.0, 13.0)):
        t0 = time.perf_counter()
        lat = gradients("lattice", logits, image, labels, ta, tb, torch.float32)
        ex = gradients("exact", logits, image, labels, ta, tb, torch.float64)
        cos = torch.nn.functional.cosine_similarity(
            lat["compat"].flatten(), ex["compat"].flatten(), dim=0
        )
        ratios = {n: float(lat[n] / ex[n]) for n in lat if n != "compat" and ex[n].numel() == 1}
        err = lattice_error(image[:1].float(), theta_alpha=ta, theta_beta=tb)["bilateral"]
        said = ", ".join(f"{n.replace('log_theta_', 'log θ')} {r:.2f}" for n, r in ratios.items())
        print(
            f"{ta:>4.0f}, {tb:<4.0f} {100 * err:>10.1f}% {float(cos):>10.4f}  {said}"
            f"   ({time.perf_counter() - t0:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
