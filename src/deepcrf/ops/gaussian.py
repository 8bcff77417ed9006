"""High-dimensional Gaussian filtering differentiable w.r.t. values *and* features.

The dense CRF's message passing is the Gaussian filter

    y_i = Σ_j k(f_i, f_j) v_j,    k(f_i, f_j) = exp(−½ |f_i − f_j|²)            (K&K 2011, eq. 3)

with features already divided by their bandwidths (f = p / θ). Learning the bandwidths θ
(Schwing & Urtasun 2015, eq. 9) needs ∂y/∂f. For the Gaussian model

    ∂k_ij/∂f_i = k_ij (f_j − f_i),

so, for an upstream gradient g, the vector-Jacobian product w.r.t. the features is

    ∂L/∂f_id = g_i·[K(f_d v)]_i − f_id g_i·[K v]_i + v_i·[Kᵀ(f_d g)]_i − f_id v_i·[Kᵀ g]_i,

i.e. a handful of extra filterings through the *same* lattice (expanding (f_j − f_i) into its
two terms): no finite differences, nothing N×N. The bandwidth gradient then follows by autograd
through f = p / θ.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_tensor
from .filters import Method, check_values_features


def build_lattice(features: torch.Tensor) -> Any:
    """Build the permutohedral lattice for ``features`` once, to reuse across filterings.

    The lattice is built from the *detached* features: it is a fixed sparse linear map for a
    given image; gradients w.r.t. the features are produced analytically by
    :func:`gaussian_filter` (see the module docstring), never by differentiating the build.

    Args:
        features: positions in feature space, already divided by their bandwidths (unitless).

    Shape:
        features: (B, N, d)
    """
    from .permutohedral import PermutohedralLattice

    check_tensor(features, "features", ndim=3, layout="(B, N, d)", floating=True, finite=True)
    return PermutohedralLattice(features.detach())


class _LatticeGaussianFilter(torch.autograd.Function):
    """y = K v through a prebuilt lattice; analytic Gaussian-model gradient w.r.t. features."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: torch.Tensor, features: torch.Tensor, lattice: Any
    ) -> torch.Tensor:
        out = lattice.filter(values)
        ctx.lattice = lattice
        ctx.save_for_backward(values, features, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, features, out = ctx.saved_tensors
        lattice = ctx.lattice
        need_values, need_features = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.contiguous()
        if not need_features:
            grad_values = lattice.filter(grad, transpose=True) if need_values else None
            return grad_values, None, None

        # The derivative only involves differences f_j − f_i, so shifting the features by a
        # per-image constant changes nothing mathematically but keeps the products f_d·v small
        # (less float32 rounding when the two expanded terms are subtracted).
        f = features - features.mean(dim=1, keepdim=True)
        kt_g = lattice.filter(grad, transpose=True)  # also grad_values
        grad_features = -f * ((grad * out).sum(-1, keepdim=True) + (values * kt_g).sum(-1, True))
        # One feature dimension at a time: the same filterings as one wide (d·C)-channel pass,
        # but the lattice's temporaries stay at C channels (peak memory at VOC size).
        for dim in range(f.shape[-1]):
            f_d = f[..., dim : dim + 1]
            k_fv = lattice.filter(f_d * values)  # K(f_d v)
            kt_fg = lattice.filter(f_d * grad, transpose=True)  # Kᵀ(f_d g)
            grad_features[..., dim] += (grad * k_fv).sum(-1) + (values * kt_fg).sum(-1)
        return (kt_g if need_values else None), grad_features, None


def gaussian_filter(
    values: torch.Tensor,
    features: torch.Tensor,
    *,
    method: Method = "lattice",
    lattice: Any = None,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Gaussian filter y_i = Σ_j exp(−½|f_i − f_j|²) v_j, differentiable w.r.t. both inputs.

    Implements the message-passing step of Krähenbühl & Koltun (2011, eq. 3); the gradient
    w.r.t. ``features`` is the exact derivative of the Gaussian model (module docstring), so
    bandwidths θ in ``features = positions / θ`` can be learned (Schwing & Urtasun 2015).

    ``method="lattice"`` filters through the permutohedral lattice (Adams et al. 2010,
    O(N·(d+1)·C)); the lattice is an approximation of the Gaussian, so its results and gradients
    match ``method="exact"`` (brute force, O(N²)) only approximately — tests compare them by
    relative error and cosine similarity. Pass ``lattice`` (from :func:`build_lattice` on the
    same features) to reuse one lattice across mean-field iterations; it must have been built
    from these very features (this is not checked: the check would cost as much as a build).

    Args:
        values: the signal to filter (any units; C channels, e.g. labels).
        features: positions in feature space already divided by their bandwidths (unitless).
        method: ``"lattice"`` (fast, approximate) or ``"exact"`` (brute force reference).
        lattice: a prebuilt lattice for ``features`` (lattice method only); built if None.
        exclude_self: drop the j = i term, i.e. return y − v (the exact self-weight is 1).

    Returns:
        The filtered values.

    Shape:
        values:   (B, N, C)
        features: (B, N, d)
        return:   (B, N, C)

    Example:
        >>> v, f = torch.rand(1, 100, 3), torch.rand(1, 100, 5)
        >>> gaussian_filter(v, f, method="exact").shape
        torch.Size([1, 100, 3])
    """
    check_values_features(values, features)
    if method == "exact":
        from .filters import exact_gaussian_filter

        return exact_gaussian_filter(values, features, exclude_self=exclude_self)
    if method != "lattice":
        raise ValueError(f"method must be 'lattice' or 'exact'; got {method!r}")
    if lattice is None:
        lattice = build_lattice(features)
    out = _LatticeGaussianFilter.apply(values.contiguous(), features.contiguous(), lattice)
    if exclude_self:
        out = out - values
    return out
