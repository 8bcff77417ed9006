import math

import pytest
import torch

from deepcrf.ops.filters import exact_gaussian_filter


def _dense_reference(values, features, exclude_self=False):
    """The N x N kernel matrix written out, float64."""
    d2 = (features[:, :, None, :] - features[:, None, :, :]).pow(2).sum(-1)
    k = torch.exp(-0.5 * d2)
    if exclude_self:
        k = k - torch.eye(k.shape[-1], dtype=k.dtype)
    return k @ values


def _positions(h, w, sigma, dtype=torch.float64):
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij"
    )
    return torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2) / sigma


@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_filter_matches_dense_matrix(exclude_self):
    f = torch.randn(2, 37, 3, dtype=torch.float64) * 2
    v = torch.rand(2, 37, 4, dtype=torch.float64)
    out = exact_gaussian_filter(v, f, exclude_self=exclude_self, chunk_size=5)
    torch.testing.assert_close(out, _dense_reference(v, f, exclude_self))


def test_exact_filter_docstring_value():
    out = exact_gaussian_filter(torch.ones(1, 2, 1), torch.tensor([[[0.0], [1.0]]]))
    torch.testing.assert_close(out.squeeze(), torch.full((2,), 1 + math.exp(-0.5)))


def test_exact_filter_chunking_and_batch():
    f = torch.randn(3, 50, 2, dtype=torch.float64)
    v = torch.rand(3, 50, 2, dtype=torch.float64)
    full = exact_gaussian_filter(v, f)
    torch.testing.assert_close(exact_gaussian_filter(v, f, chunk_size=7), full)
    for b in range(3):
        torch.testing.assert_close(
            exact_gaussian_filter(v[b : b + 1], f[b : b + 1]), full[b : b + 1]
        )


def test_exact_filter_float32_large_features_accurate():
    # Un-centred features of magnitude ~500 (pixel positions / small bandwidths): differences are
    # taken explicitly, so float32 stays close to float64.
    f = torch.rand(1, 200, 2, dtype=torch.float64) * 5 + 500
    v = torch.rand(1, 200, 3, dtype=torch.float64)
    out32 = exact_gaussian_filter(v.float(), f.float())
    torch.testing.assert_close(out32.double(), exact_gaussian_filter(v, f), rtol=1e-4, atol=1e-4)


def test_exact_filter_gradcheck_values_and_features():
    f = (torch.randn(2, 9, 3, dtype=torch.float64)).requires_grad_(True)
    v = torch.rand(2, 9, 2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: exact_gaussian_filter(a, b, chunk_size=4), (v, f))
    assert torch.autograd.gradcheck(
        lambda a, b: exact_gaussian_filter(a, b, exclude_self=True), (v, f)
    )


def test_exact_filter_gradient_wrt_bandwidth():
    # Features = positions / theta: autograd reaches theta, matching d/dθ of the dense sum.
    p = torch.randn(1, 8, 2, dtype=torch.float64) * 3
    v = torch.rand(1, 8, 1, dtype=torch.float64)
    theta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: exact_gaussian_filter(v, p / t), (theta,))


def test_exact_filter_non_contiguous():
    f = torch.randn(1, 20, 6, dtype=torch.float64)[..., ::2]
    v = torch.rand(1, 3, 20, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(
        exact_gaussian_filter(v, f), _dense_reference(v.contiguous(), f.contiguous())
    )


def test_exact_filter_bad_inputs():
    with pytest.raises(ValueError, match=r"features \(B, N, d\) must match values"):
        exact_gaussian_filter(torch.rand(1, 5, 2), torch.rand(1, 6, 2))
    with pytest.raises(ValueError, match=r"values must have 3 dimensions"):
        exact_gaussian_filter(torch.rand(5, 2), torch.rand(1, 5, 2))
    with pytest.raises(TypeError, match=r"features must have the dtype of values"):
        exact_gaussian_filter(torch.rand(1, 5, 2), torch.rand(1, 5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        exact_gaussian_filter(torch.rand(1, 5, 2), torch.rand(1, 5, 2), chunk_size=0)
    with pytest.raises(TypeError, match=r"values must have a floating-point dtype"):
        exact_gaussian_filter(torch.ones(1, 5, 2, dtype=torch.int64), torch.rand(1, 5, 2))
