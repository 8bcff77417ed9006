import numpy as np
import pytest
import torch

from deepcrf.ops.filters import exact_gaussian_filter
from deepcrf.ops.permutohedral import (
    PermutohedralLattice,
    lattice_filter,
    pydensecrf_output_scale,
)
from tests.conftest import REFERENCE_CASE

# Mean relative error of the calibrated lattice against the brute-force Gaussian sum, measured
# on uniform clouds of 1500 points spanning 2 and 4 standard deviations (docs/densecrf.md):
# 2.3 %, 5.3 %, 3.0 %, 20 % for d = 2, 3, 4, 5; bilateral features of photo crops: 4-6 % (d = 3)
# and 8-10 % (d = 5, θβ >= 5).  The bounds leave ~1.5x headroom.
ERROR_BOUND = {2: 0.035, 3: 0.08, 4: 0.045, 5: 0.30}
IMAGE_ERROR_BOUND = {3: 0.09, 5: 0.14}


def _cloud(n, d, side, seed, dtype=torch.float64, batch=1, channels=3):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(batch, n, d, generator=g, dtype=dtype) * side
    v = torch.rand(batch, n, channels, generator=g, dtype=dtype)
    return f, v


@pytest.mark.parametrize("d", [2, 3, 4, 5])
@pytest.mark.parametrize("side", [2.0, 4.0])
def test_native_lattice_matches_brute_force(d, side):
    f, v = _cloud(1500, d, side, seed=100 + d)
    exact = exact_gaussian_filter(v, f)
    approx = PermutohedralLattice(f.float()).filter(v.float()).double()
    rel = ((approx - exact).abs() / exact).mean().item()
    assert rel < ERROR_BOUND[d], rel
    # Calibrated scale: no systematic bias in the overall level.
    assert abs(approx.sum().item() / exact.sum().item() - 1) < ERROR_BOUND[d]


@pytest.mark.parametrize("d", [3, 5])
@pytest.mark.parametrize("theta_alpha,theta_beta", [(121.0, 5.0), (30.0, 8.0)])
def test_native_lattice_on_bilateral_image_features(d, theta_alpha, theta_beta):
    if not REFERENCE_CASE.exists():
        pytest.skip("reference photo not available")
    image = torch.from_numpy(np.load(REFERENCE_CASE)["image"][60:110, 80:130]).double()
    ys, xs = torch.meshgrid(
        torch.arange(50, dtype=torch.float64), torch.arange(50, dtype=torch.float64), indexing="ij"
    )
    colour = image if d == 5 else image.mean(-1, keepdim=True)
    f = torch.cat(
        [xs[..., None] / theta_alpha, ys[..., None] / theta_alpha, colour / theta_beta], -1
    )
    f = f.reshape(1, -1, d)
    v = torch.rand(1, f.shape[1], 3, dtype=torch.float64)
    exact = exact_gaussian_filter(v, f)
    approx = PermutohedralLattice(f.float()).filter(v.float()).double()
    rel = ((approx - exact).abs() / exact).mean().item()
    assert rel < IMAGE_ERROR_BOUND[d], rel


def test_float64_lattice_agrees_with_float32():
    f, v = _cloud(500, 3, 3.0, seed=1)
    out64 = PermutohedralLattice(f).filter(v)
    out32 = PermutohedralLattice(f.float()).filter(v.float())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


def test_isolated_points_keep_only_themselves():
    # Points 100 standard deviations apart: the output is a multiple of the point's own value
    # (the lattice self-weight), never mixed with another point.
    f = torch.tensor([[[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]]])
    v = torch.eye(3)[None]
    out = PermutohedralLattice(f).filter(v)[0]
    off_diag = out - torch.diag(torch.diagonal(out))
    assert off_diag.abs().max() < 1e-6
    assert (torch.diagonal(out) > 0.5).all() and (torch.diagonal(out) < 1.6).all()


def test_wide_feature_range_uses_int64_codes():
    # Codes that do not fit in 31 bits take the int64 sort path; the result must be the same
    # kind of filter: compare a wide cloud with the same cloud batched next to a narrow one.
    g = torch.Generator().manual_seed(12)
    wide = torch.rand(1, 300, 5, generator=g, dtype=torch.float64) * 200
    wide[0, 1] = wide[0, 0] + 0.3  # one close pair so that mixing is exercised
    v = torch.rand(1, 300, 2, generator=g, dtype=torch.float64)
    lat = PermutohedralLattice(wide)
    out = lat.filter(v)
    exact = exact_gaussian_filter(v, wide)
    assert ((out - exact).abs() / exact).mean() < 0.35
    assert out[0, 0].sub(exact[0, 0]).abs().max() < 0.5 * exact[0, 0].max()


def test_transpose_is_adjoint():
    f, v = _cloud(400, 4, 3.0, seed=2)
    w = torch.rand_like(v)
    lat = PermutohedralLattice(f)
    lhs = (lat.filter(v) * w).sum()
    rhs = (v * lat.filter(w, transpose=True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    # ... and the forward filter itself is not symmetric, so the transpose matters.
    assert (lat.filter(w) - lat.filter(w, transpose=True)).abs().max() > 1e-8


def test_gradcheck_values():
    f, v = _cloud(12, 3, 1.0, seed=3, channels=1, batch=2)
    lat = PermutohedralLattice(f)
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lattice_filter(x, lat), (v,))
    assert torch.autograd.gradgradcheck(lambda x: lattice_filter(x, lat), (v,))
    assert torch.autograd.gradcheck(lambda x: lat.filter(x, transpose=True), (v,))


def test_batch_equals_items_alone():
    f, v = _cloud(300, 5, 3.0, seed=4, batch=3)
    out = PermutohedralLattice(f).filter(v)
    for b in range(3):
        alone = PermutohedralLattice(f[b : b + 1]).filter(v[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-12, atol=1e-12)


def test_non_contiguous_values_and_features():
    f, v = _cloud(200, 3, 3.0, seed=5, channels=4)
    f_nc = torch.stack([f, f], dim=-1)[..., 0]
    v_nc = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not f_nc.is_contiguous() and not v_nc.is_contiguous()
    ref = PermutohedralLattice(f).filter(v)
    torch.testing.assert_close(PermutohedralLattice(f_nc).filter(v_nc), ref)


def test_does_not_mutate_inputs():
    f, v = _cloud(100, 3, 3.0, seed=6)
    f0, v0 = f.clone(), v.clone()
    PermutohedralLattice(f).filter(v)
    PermutohedralLattice(f.float(), pydensecrf_compatible=True).filter(v.float())
    assert torch.equal(f, f0) and torch.equal(v, v0)


def test_lattice_is_reusable_across_channels_and_dtypes():
    f, v = _cloud(200, 2, 4.0, seed=7, channels=5)
    lat = PermutohedralLattice(f.float())
    full = lat.filter(v.float())
    torch.testing.assert_close(lat.filter(v[..., 2:3].float()), full[..., 2:3])
    torch.testing.assert_close(lat.filter(v).float(), full, rtol=1e-5, atol=1e-5)


def test_compatible_mode_scales():
    assert pydensecrf_output_scale(5) == pytest.approx(1 / (1 + 2**-5), rel=1e-7)
    f, _ = _cloud(200, 3, 3.0, seed=8)
    lat = PermutohedralLattice(f.float(), pydensecrf_compatible=True)
    assert lat.output_scale == pydensecrf_output_scale(3)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"features must have 3 dimensions"):
        PermutohedralLattice(torch.rand(10, 3))
    with pytest.raises(TypeError, match=r"features must have dtype"):
        PermutohedralLattice(torch.zeros(1, 10, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"features must be finite"):
        PermutohedralLattice(torch.tensor([[[0.0, float("nan")]]]))
    with pytest.raises(ValueError, match=r"features must not be empty"):
        PermutohedralLattice(torch.zeros(1, 0, 3))
    # The PyTorch build packs keys into int64 codes; the compiled kernel hashes int32 keys.
    with pytest.raises(ValueError, match=r"too large a range"):
        PermutohedralLattice(torch.tensor([[[0.0] * 5, [1e5] * 5]]), backend="torch")
    lat = PermutohedralLattice(torch.rand(2, 10, 3))
    with pytest.raises(ValueError, match=r"values must be \(B, N, C\) = \(2, 10, C\)"):
        lat.filter(torch.rand(2, 11, 4))
    with pytest.raises(ValueError, match=r"values must have 3 dimensions"):
        lat.filter(torch.rand(20, 4))
    with pytest.raises(TypeError, match=r"values must have dtype"):
        lat.filter(torch.ones(2, 10, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"lattice must be a PermutohedralLattice"):
        lattice_filter(torch.rand(2, 10, 4), "lattice")


@pytest.mark.gpu
def test_cpu_gpu_agree():
    f, v = _cloud(2000, 5, 4.0, seed=9, dtype=torch.float32)
    cpu = PermutohedralLattice(f).filter(v)
    gpu = PermutohedralLattice(f.cuda()).filter(v.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def _pydensecrf_filter(dcrf, eigen, features, values):
    """Raw lattice output of pydensecrf: identity matrix compatibility, no normalisation."""
    n, c = values.shape
    crf = dcrf.DenseCRF(n, c)
    crf.setUnaryEnergy(np.zeros((c, n), np.float32))
    crf.addPairwiseEnergy(
        np.ascontiguousarray(features.T, dtype=np.float32),
        np.eye(c, dtype=np.float32),
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NO_NORMALIZATION,
    )
    q = eigen.matrixXf(np.ascontiguousarray(values.T, dtype=np.float32))
    tmp1 = eigen.matrixXf(np.zeros((c, n), np.float32))
    tmp2 = eigen.matrixXf(np.zeros((c, n), np.float32))
    crf.stepInference(q, tmp1, tmp2)  # leaves the last pairwise message, K·q, in tmp2
    return np.array(tmp2).T


@pytest.mark.parametrize("d,n", [(1, 500), (2, 998), (3, 1000), (5, 1001), (5, 4000)])
def test_compatible_mode_equals_installed_pydensecrf(d, n):
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    eigen = pytest.importorskip("pydensecrf.eigen")
    rng = np.random.default_rng(d * 1000 + n)
    f = (rng.random((n, d)) * 6).astype(np.float32)
    v = rng.random((n, 3)).astype(np.float32)
    ref = _pydensecrf_filter(dcrf, eigen, f, v)
    lat = PermutohedralLattice(torch.from_numpy(f)[None], pydensecrf_compatible=True)
    out = lat.filter(torch.from_numpy(v)[None])[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
