"""Exact Gaussian filters: the brute-force reference and the separable spatial filter.

``exact_gaussian_filter`` evaluates Σ_j exp(−½‖f_i − f_j‖²) v_j literally, in chunks of rows so
memory stays O(chunk·N) instead of O(N²).  It is written with plain differentiable torch ops, so
autograd reaches both the values and the features (hence the bandwidths the features were
divided by); every fast path (the permutohedral lattice, the separable filter) is tested
against it.

``spatial_gaussian_filter`` is the smoothness kernel of the dense CRF, exp(−‖p_i − p_j‖²/2σ²)
over pixel positions, which factorises into a horizontal and a vertical 1-D Gaussian: two
small convolutions instead of a lattice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deepcrf._checks import check_tensor

__all__ = ["exact_gaussian_filter", "spatial_gaussian_filter"]

# Entries of one (B, chunk, N, d) difference block kept in memory at a time.
_CHUNK_BUDGET = 1 << 22


def exact_gaussian_filter(
    values: torch.Tensor,
    features: torch.Tensor,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Brute-force Gaussian filter ``out_i = Σ_j exp(−½‖f_i − f_j‖²) v_j`` over each batch item.

    This is the message passing step of the fully connected CRF (Krähenbühl & Koltun 2011,
    eq. 3 with one Gaussian kernel) evaluated exactly in O(N²·(d + C)) time and O(chunk·N·d)
    memory.  Differentiable w.r.t. ``values`` and ``features`` (plain torch ops).

    Args:
        values: values to filter (e.g. label marginals Q), float.
        features: point features already divided by their bandwidths (dimensionless), same
            dtype and device as ``values``.
        exclude_self: drop the j = i term (k(f_i, f_i) = 1), as in the mean-field update of
            Krähenbühl & Koltun; the default keeps it, as the permutohedral lattice does.
        chunk_size: rows of the N × N kernel evaluated at once; by default chosen so one
            block holds about 4M feature differences.

    Shape:
        values:   (B, N, C)
        features: (B, N, d)
        return:   (B, N, C)

    Example:
        >>> f = torch.tensor([[[0.0], [1.0]]])
        >>> exact_gaussian_filter(torch.ones(1, 2, 1), f).squeeze()
        tensor([1.6065, 1.6065])
    """
    check_tensor(values, "values", ndim=3, layout="(B, N, C)", floating=True)
    check_tensor(features, "features", ndim=3, layout="(B, N, d)", floating=True)
    if features.shape[:2] != values.shape[:2]:
        raise ValueError(
            f"features must be (B, N, d) matching values {tuple(values.shape)}; "
            f"got {tuple(features.shape)}"
        )
    if features.dtype != values.dtype or features.device != values.device:
        raise TypeError(
            f"features must have the dtype/device of values ({values.dtype}, {values.device}); "
            f"got ({features.dtype}, {features.device})"
        )
    batch, n, d = features.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BUDGET // max(1, batch * n * d))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    rows = []
    for start in range(0, n, chunk_size):
        fi = features[:, start : start + chunk_size]
        # Explicit differences rather than ‖a‖² + ‖b‖² − 2a·b: no cancellation for large,
        # un-centred features, so the reference stays accurate in float32.
        diff = fi[:, :, None, :] - features[:, None, :, :]
        weights = torch.exp(-0.5 * diff.square().sum(-1))
        rows.append(torch.bmm(weights, values))
    out = torch.cat(rows, dim=1)
    if exclude_self:
        out = out - values
    return out


def spatial_gaussian_filter(
    values: torch.Tensor, sigma: float | torch.Tensor, *, truncate: float = 4.0
) -> torch.Tensor:
    """Exact smoothness-kernel filter ``out_p = Σ_q exp(−‖p − q‖²/2σ²) v_q`` over pixels.

    The spatial (appearance-free) kernel of the fully connected CRF (Krähenbühl & Koltun
    2011, eq. 3, second kernel with θγ = σ) factorises over the two axes, so it is computed as
    two 1-D convolutions with the unnormalised taps exp(−t²/2σ²), |t| ≤ ⌈truncate·σ⌉.  The
    sum runs over pixels inside the image only (zero padding) and includes q = p.  Truncation
    drops kernel weight below exp(−truncate²/2) (3.4e-4 for the default 4σ) per axis.

    Args:
        values: per-pixel values, float.
        sigma: standard deviation in pixels (θγ), a positive float or a 0-d tensor (then the
            result is differentiable w.r.t. it).
        truncate: radius of the taps in standard deviations.

    Shape:
        values: (B, C, H, W)
        return: (B, C, H, W)

    Example:
        >>> spatial_gaussian_filter(torch.ones(1, 1, 5, 5), 1.0).shape
        torch.Size([1, 1, 5, 5])
    """
    check_tensor(values, "values", ndim=4, layout="(B, C, H, W)", floating=True)
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be a scalar; got shape {tuple(sigma.shape)}")
        sigma_value = float(sigma.detach())
        sigma_t = sigma.reshape(()).to(values.dtype)
    else:
        sigma_value = float(sigma)
        sigma_t = None
    if not (sigma_value > 0.0) or math.isinf(sigma_value):
        raise ValueError(f"sigma must be a finite positive number; got {sigma_value!r}")
    if not (truncate > 0.0):
        raise ValueError(f"truncate must be positive; got {truncate!r}")
    _, channels, height, width = values.shape
    radius = math.ceil(truncate * sigma_value)
    offsets = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
    scale = sigma_t if sigma_t is not None else sigma_value
    taps = torch.exp(-0.5 * (offsets / scale).square())
    # Depthwise (one filter per channel) convolutions on a channels-last tensor: the layout
    # oneDNN vectorises over channels (measured 25x faster than 1-channel convolutions of the
    # (B·C, 1, H, W) view for 21 channels at 500×375).  Taps longer than the image only add
    # zeros: crop them to keep the convolutions small.
    rx = min(radius, width - 1)
    ry = min(radius, height - 1)
    kx = taps[radius - rx : radius + rx + 1].reshape(1, 1, 1, -1).expand(channels, 1, 1, -1)
    ky = taps[radius - ry : radius + ry + 1].reshape(1, 1, -1, 1).expand(channels, 1, -1, 1)
    x = values.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kx.contiguous(), padding=(0, rx), groups=channels)
    x = F.conv2d(x, ky.contiguous(), padding=(ry, 0), groups=channels)
    return x.contiguous()
