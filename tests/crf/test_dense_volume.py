"""dense_crf / DenseCRF / refine on 1-D signals, 2-D multi-channel images and 3-D volumes."""

import numpy as np
import pytest
import torch

from deepcrf.crf.dense import DenseCRF, dense_crf, lattice_error, refine
from deepcrf.ops import native

DT = torch.float64


def blobs(size, channels=1, labels=2, b=1, noise=0.3, seed=0, dtype=torch.float32):
    """Balls in a (B, C, *size) reference with noisy logits around the true labels.

    Returns (logits (B, L, *S), reference (B, C, *S) with intensities ~0-100, labels (B, *S)).
    """
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(s, dtype=DT) for s in size], indexing="ij")
    lab = torch.zeros(b, *size, dtype=torch.long)
    for i in range(b):
        for k in range(1, labels):
            centre = [float(torch.rand(1, generator=g)) * s for s in size]
            radius = 0.3 * min(size) + 0.5
            r2 = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
            lab[i][r2 < radius**2] = k
    means = torch.rand(labels, channels, generator=g, dtype=DT) * 80 + 10
    ref = means[lab].movedim(-1, 1) + 8 * torch.randn(b, channels, *size, generator=g, dtype=DT)
    onehot = torch.nn.functional.one_hot(lab, labels).movedim(-1, 1).to(DT)
    logits = 2.0 * onehot + noise * 4 * torch.randn(onehot.shape, generator=g, dtype=DT)
    return logits.to(dtype), ref.to(dtype), lab


def brute_force(logits, ref, iters, ta, tb, tg, wb, wg, spacing=None):
    """Explicit N×N Gaussian kernels in any dimension, symmetric normalisation, Potts."""
    outs = []
    for lo, im in zip(logits, ref, strict=True):
        num, *size = lo.shape
        n = lo[0].numel()
        spacing_t = torch.tensor(spacing or [1.0] * len(size), dtype=DT)
        axes = torch.meshgrid(*[torch.arange(s, dtype=DT) for s in size], indexing="ij")
        pos = torch.stack(axes, -1).reshape(n, len(size)) * spacing_t
        val = im.reshape(im.shape[0], n).T.to(DT)
        ta, tb, tg = (torch.as_tensor(t, dtype=DT) for t in (ta, tb, tg))
        d_bil = torch.cdist(pos / ta, pos / ta).pow(2) + torch.cdist(val / tb, val / tb).pow(2)
        d_sp = torch.cdist(pos / tg, pos / tg).pow(2)
        kernels = []
        for k in (torch.exp(-d_bil / 2), torch.exp(-d_sp / 2)):
            r = k.sum(1).rsqrt()
            kernels.append(r[:, None] * k * r[None, :])
        u = lo.reshape(num, n).T.to(DT)
        q = u.softmax(1)
        for _ in range(iters):
            q = (u + wb * kernels[0] @ q + wg * kernels[1] @ q).softmax(1)
        outs.append(q.log().T.reshape(lo.shape))
    return torch.stack(outs)


CASES = {
    # name: spatial size, channels, per-axis θα, per-channel θβ, θγ, spacing
    "1d": ((40,), 1, 6.0, 20.0, 2.0, None),
    "2d-grey": ((9, 11), 1, (5.0, 7.0), 15.0, 2.0, (1.5, 1.0)),
    "2d-4ch": ((8, 9), 4, 6.0, (20.0, 30.0, 25.0, 40.0), (1.5, 2.5), None),
    "3d": ((6, 7, 5), 2, (4.0, 5.0, 6.0), (20.0, 30.0), 2.0, (2.0, 1.0, 0.8)),
}


@pytest.mark.parametrize("case", CASES)
def test_exact_filter_equals_brute_force_mean_field(case):
    size, ch, ta, tb, tg, spacing = CASES[case]
    logits, ref, _ = blobs(size, ch, labels=3, dtype=DT)
    out = dense_crf(
        logits, ref, iters=4, theta_alpha=ta, theta_beta=tb, theta_gamma=tg,
        w_bilateral=3.0, w_spatial=2.0, method="exact", spacing=spacing,
    )  # fmt: skip
    expected = brute_force(logits, ref, 4, ta, tb, tg, 3.0, 2.0, spacing)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_in_every_dimension(case):
    # float64, exact filter: logits, compatibility, weights and per-axis/-channel bandwidths.
    size, ch, ta, tb, tg, spacing = CASES[case]
    logits, ref, _ = blobs(size, ch, labels=2, dtype=DT)
    if len(size) > 1:  # keep the O(N²) gradcheck small
        sl = (slice(None),) * 2 + tuple(slice(0, 4) for _ in size)
        logits, ref = logits[sl].contiguous(), ref[sl].contiguous()
    dims = len(size)

    def vec(t, k):
        return torch.tensor(np.broadcast_to(np.asarray(t, np.float64), (k,)).copy())

    log_ta = vec(ta, dims).log().requires_grad_()
    log_tb = vec(tb, ch).log().requires_grad_()
    log_tg = vec(tg, dims).log().requires_grad_()
    compat = (1 - torch.eye(2, dtype=DT) + 0.1 * torch.rand(2, 2, dtype=DT)).requires_grad_()
    wb = torch.tensor(2.0, dtype=DT, requires_grad=True)
    x = logits.clone().requires_grad_()

    def fn(x, compat, wb, log_ta, log_tb, log_tg):
        return dense_crf(
            x, ref, iters=2, theta_alpha=log_ta.exp(), theta_beta=log_tb.exp(),
            theta_gamma=log_tg.exp(), w_bilateral=wb, w_spatial=1.5, compat=compat,
            method="exact", spacing=spacing,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x, compat, wb, log_ta, log_tb, log_tg), atol=1e-7)


def test_lattice_against_exact_on_a_12_cube():
    logits, ref, _ = blobs((12, 12, 12), 1, labels=2, seed=3)
    kw = dict(iters=5, theta_alpha=5.0, theta_beta=25.0, theta_gamma=2.0, spacing=(1.5, 1, 1))
    fast = dense_crf(logits, ref, **kw)
    exact = dense_crf(logits.double(), ref.double(), method="exact", **kw)
    q_fast, q_exact = fast.exp(), exact.exp().float()
    assert float((q_fast - q_exact).abs().mean()) < 0.02
    agree = (fast.argmax(1) == exact.argmax(1)).float().mean()
    assert float(agree) > 0.98
    # The kernels themselves: the lattice's row sums within a few % of the exact ones.
    err = lattice_error(ref, theta_alpha=5.0, theta_beta=25.0, theta_gamma=2.0, spacing=(1.5, 1, 1))
    assert err["spatial"] < 0.05 and err["bilateral"] < 0.15


@pytest.mark.parametrize("method", ["lattice", "exact"])
def test_spacing_is_physical_units(method):
    # Spacing (2, 1, 1) = spacing 1 with the first axis's spatial bandwidths halved.
    logits, ref, _ = blobs((6, 8, 7), 2, labels=3, seed=1)
    kw = dict(iters=3, theta_beta=(20.0, 30.0), w_bilateral=4.0, method=method)
    a = dense_crf(logits, ref, theta_alpha=6.0, theta_gamma=3.0, spacing=(2.0, 1.0, 1.0), **kw)
    b = dense_crf(logits, ref, theta_alpha=(3.0, 6.0, 6.0), theta_gamma=(1.5, 3.0, 3.0), **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    iso = dense_crf(logits, ref, theta_alpha=6.0, theta_gamma=3.0, **kw)
    assert float((a - iso).abs().max()) > 1e-3  # and spacing does change the result


def test_two_dimensional_rgb_behaviour_unchanged():
    # A (B, 3, H, W) image through the general path = per-axis bandwidths given as scalars.
    logits, ref, _ = blobs((10, 12), 3, labels=3, seed=2)
    ref = ref.clamp(0, 255)
    a = dense_crf(logits, ref, theta_alpha=8.0, theta_beta=20.0, method="exact")
    b = dense_crf(
        logits, ref, theta_alpha=(8.0, 8.0), theta_beta=(20.0,) * 3, theta_gamma=(3.0, 3.0),
        spacing=(1, 1), method="exact",
    )  # fmt: skip
    torch.testing.assert_close(a, b)


def test_batch_of_volumes_equals_each_alone_and_native_equals_torch(monkeypatch):
    logits, ref, _ = blobs((10, 9, 8), 2, labels=3, b=2, seed=4)
    kw = dict(iters=4, theta_alpha=4.0, theta_beta=(15.0, 25.0), spacing=(2.0, 1.0, 1.0))
    together = dense_crf(logits, ref, **kw)
    for i in range(2):
        alone = dense_crf(logits[i : i + 1], ref[i : i + 1], **kw)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    if not native.available():
        pytest.skip(native.status())
    monkeypatch.setenv("DEEPCRF_NATIVE", "0")
    torch_path = dense_crf(logits, ref, **kw)
    torch.testing.assert_close(together, torch_path, rtol=1e-3, atol=1e-3)


def test_learnable_layer_trains_on_volumes():
    logits, ref, labels = blobs((10, 10, 8), 1, labels=2, b=2, noise=0.5, seed=5)
    crf = DenseCRF(
        2, theta_alpha=(4.0, 4.0, 4.0), theta_beta=20.0, theta_gamma=2.0, iters=3,
        learnable=("compat", "weights", "bandwidths"),
    )  # fmt: skip
    assert crf.log_theta_alpha.shape == (3,) and isinstance(crf.theta_alpha, tuple)
    opt = torch.optim.Adam(crf.parameters(), lr=0.05)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        out = crf(logits, ref, spacing=(1.5, 1.0, 1.0))
        loss = torch.nn.functional.nll_loss(out, labels)
        loss.backward()
        for name, p in crf.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert crf.log_theta_alpha.grad.abs().min() > 0  # every axis's bandwidth learns
    assert "theta=((" in repr(crf)


def test_refine_numpy_volumes_and_channels():
    logits, ref, _ = blobs((6, 7, 8), 2, labels=2, seed=6)
    probs = logits[0].softmax(0).numpy()
    vol = ref[0].movedim(0, -1).numpy()  # (D, H, W, C), channels last like a file
    out = refine(probs, vol, iters=3, theta_beta=(20.0, 30.0), spacing=(2, 1, 1))
    expected = dense_crf(
        logits[0].softmax(0).log()[None], ref, iters=3, theta_beta=(20.0, 30.0), spacing=(2, 1, 1)
    ).softmax(1)[0]
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-5)
    one = refine(probs, vol[..., 0], theta_beta=20.0)  # (*S): one channel without its axis
    assert one.shape == probs.shape
    signal = refine(np.full((2, 30), 0.5), np.linspace(0, 50, 30), theta_beta=5.0)
    assert signal.shape == (2, 30)
    with pytest.raises(ValueError, match=r"must match the image \(\*S, C\) or \(\*S\)"):
        refine(probs, vol[:5])


def test_bad_volume_inputs_name_the_problem():
    logits, ref, _ = blobs((6, 7, 8), 1, labels=2)
    with pytest.raises(ValueError, match=r"image must be \(B, C, D, H, W\) matching logits"):
        dense_crf(logits, ref[..., :7])
    with pytest.raises(ValueError, match=r"one channel\? give it its channel axis"):
        dense_crf(logits, ref[:, 0])
    with pytest.raises(ValueError, match=r"channels-last\?"):
        dense_crf(logits, ref.movedim(1, -1).expand(-1, -1, -1, -1, 2))
    with pytest.raises(ValueError, match=r"1 to 3 spatial dimensions.*4 spatial dimensions"):
        dense_crf(logits[..., None], ref[..., None])
    with pytest.raises(ValueError, match=r"spacing must be finite and positive"):
        dense_crf(logits, ref, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"spacing must be finite and positive"):
        dense_crf(logits, ref, spacing=-1.0)
    with pytest.raises(ValueError, match=r"spacing must have one length per spatial axis \(3"):
        dense_crf(logits, ref, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"theta_alpha must be a scalar or have one value per "):
        dense_crf(logits, ref, theta_alpha=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"theta_beta must be a scalar or have one value per "):
        dense_crf(logits, ref, theta_beta=(10.0, 20.0))
    with pytest.raises(ValueError, match=r"theta_gamma must be finite and positive"):
        dense_crf(logits, ref, theta_gamma=(1.0, -1.0, 1.0))
    with pytest.raises(TypeError, match=r"spacing must be a number or 3 numbers"):
        dense_crf(logits, ref, spacing="1,1,1")
    with pytest.raises(ValueError, match=r"image must be finite"):
        dense_crf(logits, ref.clone().fill_(float("nan")))
