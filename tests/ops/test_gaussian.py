"""gaussian_filter: exact path gradcheck, lattice backward algebra, lattice vs exact."""

import pytest
import torch

from deepcrf.ops.gaussian import build_lattice, gaussian_filter


def brute_force(values, features, exclude_self=False):
    """O(N²) reference: y_i = Σ_j exp(−½|f_i − f_j|²) v_j, plain autograd."""
    d2 = (features.unsqueeze(2) - features.unsqueeze(1)).pow(2).sum(-1)
    k = torch.exp(-0.5 * d2)
    if exclude_self:
        k = k - torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return k @ values


class DenseStandInLattice:
    """The exact kernel matrix behind the lattice interface.

    With it, the lattice path's analytic backward must reproduce autograd of the brute force
    exactly (up to float64 rounding): this isolates the derivative algebra from the lattice's
    approximation error.
    """

    def __init__(self, features):
        d2 = (features.unsqueeze(2) - features.unsqueeze(1)).pow(2).sum(-1)
        self.k = torch.exp(-0.5 * d2)
        self.calls = 0

    def filter(self, values, transpose=False):
        self.calls += 1
        k = self.k.transpose(1, 2) if transpose else self.k
        return k @ values


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _image_features(h=16, w=16, b=1, theta_xy=4.0, theta_rgb=20.0, dtype=torch.float32):
    """Bilateral features of a piecewise-constant noisy image: (B, N, 5)."""
    g = torch.Generator().manual_seed(1)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(-1, 2).to(dtype)
    blocks = (ys // 6 + 2 * (xs // 5)).reshape(-1)
    palette = torch.rand(b, 16, 3, generator=g, dtype=dtype) * 255
    rgb = palette[:, blocks] + 8 * torch.randn(b, h * w, 3, generator=g, dtype=dtype)
    return torch.cat([(pos / theta_xy).expand(b, -1, -1), rgb / theta_rgb], -1)


@pytest.fixture(autouse=True)
def one_thread():
    # gradcheck runs thousands of tiny ops: one thread avoids hand-off stalls on a loaded CI box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exact_matches_brute_force_and_gradcheck():
    v = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 12, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(gaussian_filter(v, f, method="exact"), brute_force(v, f))
    assert torch.autograd.gradcheck(lambda v, f: gaussian_filter(v, f, method="exact"), (v, f))
    out = gaussian_filter(v, f, method="exact", exclude_self=True)
    torch.testing.assert_close(out, brute_force(v, f, exclude_self=True))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_lattice_backward_algebra_gradcheck(exclude_self):
    # The analytic feature gradient (extra filterings of f_d·v and f_d·g) checked against
    # numerical derivatives, with the exact kernel standing in for the lattice.
    v = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 12, 5, dtype=torch.float64, requires_grad=True)

    def fn(v, f):
        lat = DenseStandInLattice(f.detach())
        return gaussian_filter(v, f, lattice=lat, exclude_self=exclude_self)

    assert torch.autograd.gradcheck(fn, (v, f))


def test_lattice_backward_algebra_matches_autograd_far_from_origin():
    # Features far from 0 (positions / small θ): the centred products keep float64 exact.
    v = torch.randn(1, 40, 2, dtype=torch.float64, requires_grad=True)
    f = (torch.randn(1, 40, 3, dtype=torch.float64) + 150.0).requires_grad_()
    g = torch.randn(1, 40, 2, dtype=torch.float64)
    lat = DenseStandInLattice(f.detach())
    gv, gf = torch.autograd.grad((gaussian_filter(v, f, lattice=lat) * g).sum(), (v, f))
    rv, rf = torch.autograd.grad((brute_force(v, f) * g).sum(), (v, f))
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gf, rf)
    # Forward: one filtering. Backward: Kᵀg, then K(f_d v) and Kᵀ(f_d g) per feature dim.
    assert lat.calls == 1 + 1 + 2 * 3


def test_values_only_backward_uses_one_transpose_filter():
    v = torch.randn(1, 20, 2, dtype=torch.float64, requires_grad=True)
    f = torch.randn(1, 20, 3, dtype=torch.float64)
    lat = DenseStandInLattice(f)
    (gv,) = torch.autograd.grad(gaussian_filter(v, f, lattice=lat).sum(), (v,))
    torch.testing.assert_close(gv, brute_force(torch.ones_like(v), f))
    assert lat.calls == 2


def test_lattice_forward_close_to_exact():
    f = _image_features()
    v = torch.rand(1, f.shape[1], 4)
    out = gaussian_filter(v, f)
    ref = brute_force(v, f)
    rel = float((out - ref).norm() / ref.norm())
    # The permutohedral lattice approximates the Gaussian (Adams et al. 2010).
    assert rel < 0.15, rel
    assert _cos(out, ref) > 0.99


def test_lattice_gradients_match_exact_by_cosine():
    # One filtering with a random signed upstream gradient: the values gradient is a plain
    # transpose filtering, so it is as accurate as the lattice itself (cosine ~0.99 measured
    # here); the feature gradient (first moments through the same lattice) is about as good.
    f0 = _image_features(h=24, w=24, theta_xy=8.0, theta_rgb=30.0)
    v0 = torch.rand(1, f0.shape[1], 3)
    g = torch.randn(1, f0.shape[1], 3)
    grads = {}
    for method in ("lattice", "exact"):
        v, f = v0.clone().requires_grad_(), f0.clone().requires_grad_()
        out = gaussian_filter(v, f, method=method) if method == "lattice" else brute_force(v, f)
        grads[method] = torch.autograd.grad((out * g).sum(), (v, f))
    assert _cos(grads["lattice"][0], grads["exact"][0]) > 0.98
    assert _cos(grads["lattice"][1], grads["exact"][1]) > 0.98


def test_bandwidth_gradient_lattice_vs_exact():
    # d/d log θ through f = p / θ for one spatial and one colour bandwidth, as the dense CRF
    # learns them. Per-group magnitudes differ by up to ~40% for one filtering (lattice error,
    # docs/crf_layer.md); the direction must agree.
    f0 = _image_features(h=20, w=20, theta_xy=1.0, theta_rgb=1.0)
    v = torch.rand(1, f0.shape[1], 3)
    g = torch.randn(1, f0.shape[1], 3)
    grads = {}
    for method in ("lattice", "exact"):
        log_theta = torch.tensor([8.0, 30.0]).log().requires_grad_()
        scale = log_theta.exp().repeat_interleave(torch.tensor([2, 3]))
        f = f0 / scale
        out = gaussian_filter(v, f, method="lattice") if method == "lattice" else brute_force(v, f)
        (grads[method],) = torch.autograd.grad((out * g).sum(), (log_theta,))
    assert _cos(grads["lattice"], grads["exact"]) > 0.99, grads
    assert torch.sign(grads["lattice"]).eq(torch.sign(grads["exact"])).all(), grads


def test_prebuilt_lattice_equals_fresh_build():
    f = _image_features()
    v = torch.rand(1, f.shape[1], 2)
    lat = build_lattice(f)
    torch.testing.assert_close(gaussian_filter(v, f, lattice=lat), gaussian_filter(v, f))


def test_batch_equals_each_alone():
    f = _image_features(b=2)
    v = torch.rand(2, f.shape[1], 3)
    out = gaussian_filter(v, f)
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], gaussian_filter(v[i : i + 1], f[i : i + 1]))


def test_non_contiguous_inputs():
    f = _image_features()
    v = torch.rand(1, 3, f.shape[1]).transpose(1, 2)  # (1, N, 3), non-contiguous
    fnc = torch.stack([f, f], -1)[..., 0]
    assert not v.is_contiguous() and not fnc.is_contiguous()
    torch.testing.assert_close(gaussian_filter(v, fnc), gaussian_filter(v.contiguous(), f))
    torch.testing.assert_close(
        gaussian_filter(v, fnc, method="exact"), brute_force(v.contiguous(), fnc.contiguous())
    )


def test_inputs_not_mutated():
    f = _image_features()
    v = torch.rand(1, f.shape[1], 2)
    f0, v0 = f.clone(), v.clone()
    gaussian_filter(v, f)
    assert torch.equal(f, f0) and torch.equal(v, v0)


def test_bad_inputs_raise():
    v, f = torch.rand(1, 10, 2), torch.rand(1, 10, 3)
    with pytest.raises(ValueError, match=r"values must have 3 dimensions"):
        gaussian_filter(v[0], f)
    with pytest.raises(ValueError, match=r"features \(B, N, d\) must match values"):
        gaussian_filter(v, f[:, :5])
    with pytest.raises(TypeError, match=r"features must have the dtype of values"):
        gaussian_filter(v, f.double())
    with pytest.raises(TypeError, match=r"values must have a floating-point dtype"):
        gaussian_filter(v.long(), f)
    with pytest.raises(ValueError, match=r"method must be 'lattice' or 'exact'"):
        gaussian_filter(v, f, method="fast")
    with pytest.raises(ValueError, match=r"values must not be empty"):
        gaussian_filter(v[:, :0], f[:, :0])
    with pytest.raises(ValueError, match=r"features must be finite"):
        build_lattice(torch.full((1, 4, 2), float("nan")))


@pytest.mark.gpu
def test_cpu_and_cuda_agree():
    f = _image_features()
    v = torch.rand(1, f.shape[1], 3)
    g = torch.randn_like(v)
    res = []
    for dev in ("cpu", "cuda"):
        vv, ff = v.to(dev).requires_grad_(), f.to(dev).requires_grad_()
        out = gaussian_filter(vv, ff)
        res.append([out, *torch.autograd.grad((out * g.to(dev)).sum(), (vv, ff))])
    for a, b in zip(res[0], res[1], strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-4)
