"""The exact Gaussian filter: the brute-force reference of every fast path.

``exact_gaussian_filter`` evaluates Σ_j exp(−½‖f_i − f_j‖²) v_j literally, in chunks of rows so
memory stays O(chunk·N) instead of O(N²).  It is written with plain differentiable torch ops, so
autograd reaches both the values and the features (hence the bandwidths the features were
divided by); every fast path (the permutohedral lattice, the mean-field engine) is tested
against it.
"""

from __future__ import annotations

from typing import Literal

import torch

from deepcrf._checks import check_tensor

#: How a Gaussian filter is computed, the ``method=`` of every filtering entry point:
#: the permutohedral lattice (O(N), approximate) or the exact brute-force sum (O(N²)).
Method = Literal["lattice", "exact"]
METHODS: tuple[str, ...] = ("lattice", "exact")

__all__ = ["exact_gaussian_filter"]

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
    check_values_features(values, features)
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


def check_values_features(values: torch.Tensor, features: torch.Tensor) -> None:
    """Values (B, N, C) to filter and the features (B, N, d) of the same points, alike."""
    check_tensor(values, "values", ndim=3, layout="(B, N, C)", floating=True)
    check_tensor(features, "features", ndim=3, layout="(B, N, d)", floating=True)
    if features.shape[:2] != values.shape[:2]:
        raise ValueError(
            f"features (B, N, d) must match values (B, N, C) {tuple(values.shape)} in B and N; "
            f"got {tuple(features.shape)}"
        )
    if features.dtype != values.dtype:
        raise TypeError(
            f"features must have the dtype of values ({values.dtype}); got {features.dtype}"
        )
    if features.device != values.device:
        raise ValueError(
            f"features must be on the device of values ({values.device}); got {features.device}"
        )
