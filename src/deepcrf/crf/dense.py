"""Fully connected CRF with Gaussian edge potentials: mean-field as a differentiable layer.

Krähenbühl & Koltun (2011) mean-field update, with label compatibility μ (a penalty) and two
Gaussian kernels (appearance/bilateral and smoothness/spatial):

    Q_i(l) ∝ exp(−U_i(l) − Σ_l′ μ(l, l′) Σ_m w_m Σ_j k_m(f_i, f_j) Q_j(l′)),     U = −logits

    k_bilateral(i, j) = exp(−|p_i − p_j|² / 2θα² − |I_i − I_j|² / 2θβ²)
    k_spatial(i, j)   = exp(−|p_i − p_j|² / 2θγ²)

run for a fixed number of iterations and unrolled like an RNN (CRF-as-RNN, Zheng et al. 2015) so
that the unaries, μ, the kernel weights w_m and the bandwidths θ (Schwing & Urtasun 2015) can be
learned by back-propagation. Gradients w.r.t. θ are exact for the Gaussian model
(the backward of :mod:`deepcrf.ops.meanfield`): no finite differences and nothing N×N.

Conventions (see ``docs/crf_layer.md`` for the full mapping):

* pydensecrf: its Potts compatibility with weight w applies ``−w·KQ`` to the negative energy;
  that equals ours with μ = Potts = [l ≠ l′] and w_m = w (the two differ by Σ_l′ (KQ)(l′), which
  is the same for every label and cancels in the softmax). Its matrix compatibility M applies
  ``+M_sym·KQ`` with M_sym = (M + Mᵀ)/2, i.e. μ = M_sym with w_m = 1.
* CRF-RNN: μ initialised as Potts (its −I is our [l ≠ l′] up to a label-constant), kernel weights
  as L×L matrices 3·I (spatial) and 5·I (bilateral) (``weight_shape="matrix"``), θα = 160,
  θβ = θγ = 3, 5 iterations to train and 10 to test, ``normalization="after"``.
* The j = i term that the lattice brings is kept by default, as in pydensecrf and CRF-RNN;
  ``exclude_self=True`` drops it (the K&K sum is over j ≠ i).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._checks import (
    check_choice,
    check_int,
    check_memory,
    check_positive,
    check_tensor,
    to_tensor,
)
from ..ops import workspace
from ..ops.filters import METHODS, Method
from ..ops.meanfield import NORMALIZATIONS as _NORMALIZATIONS
from ..ops.meanfield import (
    KernelOp,
    Normalization,
    PairwiseTerm,
    build_term,
    estimate_peak_bytes,
    row_sum_error,
)
from ..ops.meanfield import mean_field as engine_mean_field

WeightShape = Literal["scalar", "vector", "matrix"]

_WEIGHT_SHAPES = ("scalar", "vector", "matrix")
_LEARNABLE = ("compat", "weights", "bandwidths")
_THETAS = ("theta_alpha", "theta_beta", "theta_gamma")
_PER = ("spatial axis", "reference channel", "spatial axis")
Scalar = float | torch.Tensor
# A bandwidth: one number for every axis/channel, or one per spatial axis (θα, θγ) or per
# reference channel (θβ), as a sequence or a 0-d/1-d tensor (which may require grad).
Bandwidth = float | Sequence[float] | torch.Tensor
Spacing = float | Sequence[float] | None
_LAYOUTS = {1: "(B, L, X)", 2: "(B, L, H, W)", 3: "(B, L, D, H, W)"}


# ------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------


def _check_bandwidth(value: Bandwidth, name: str, length: int | None, per: str) -> Scalar:
    """A positive bandwidth: a float, or a (length,) tensor (one per spatial axis or channel).

    Sequences and arrays become float64 tensors; tensors keep their dtype and autograd graph.
    ``length=None`` accepts any non-empty length (a layer that learns them before it has
    seen its input).
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number or a sequence of numbers; got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return check_positive(value, name)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be a number or a sequence of numbers (one per {per}); got {value!r}"
            ) from err
    bad_length = value.dim() == 1 and (
        value.shape[0] == 0 if length is None else value.shape[0] != length
    )
    if value.dim() > 1 or bad_length:
        wanted = "" if length is None else f" ({length},)"
        raise ValueError(
            f"{name} must be a scalar or have one value per {per}{wanted}; got shape "
            f"{tuple(value.shape)}"
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued; got {value.dtype}")
    v = value.detach()
    if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
        shown = v.tolist()
        raise ValueError(f"{name} must be finite and positive; got {shown!r}")
    return value


def _check_spacing(spacing: Spacing, dims: int) -> tuple[float, ...] | None:
    """Voxel spacing, one positive length per spatial axis (physical units); None = 1."""
    if spacing is None:
        return None
    if isinstance(spacing, bool):
        raise TypeError(f"spacing must be a number or {dims} numbers; got {spacing!r}")
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().tolist()
    values = (
        [spacing] * dims if isinstance(spacing, (int, float, np.integer, np.floating)) else spacing
    )
    try:
        out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise TypeError(f"spacing must be a number or {dims} numbers; got {spacing!r}") from err
    if len(out) != dims:
        raise ValueError(
            f"spacing must have one length per spatial axis ({dims} for {dims}-D data); got "
            f"{len(out)}: {spacing!r}"
        )
    if not all(np.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"spacing must be finite and positive (voxel sizes); got {spacing!r}")
    return out


def _check_weight(
    value: Scalar, name: str, num_classes: int, allow_negative: bool = False
) -> Scalar:
    if isinstance(value, torch.Tensor):
        shapes = ((), (num_classes,), (num_classes, num_classes))
        if tuple(value.shape) not in shapes:
            raise ValueError(
                f"{name} must be a scalar, a ({num_classes},) vector or a ({num_classes}, "
                f"{num_classes}) matrix for {num_classes} labels; got shape {tuple(value.shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite")
        lowest = float(value.detach().min())
    else:
        if isinstance(value, bool):
            raise TypeError(f"{name} must be a number or a tensor; got {value!r}")
        try:
            lowest = value = float(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a number or a tensor; got {value!r}") from err
        if not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    if lowest < 0 and not allow_negative:
        raise ValueError(
            f"{name} must be >= 0 (a kernel weight; negative rewards different labels on "
            f"similar points); got {lowest:g}. Pass allow_negative_weights=True if meant"
        )
    return value


def _is_colour(image: torch.Tensor) -> bool:
    """A 2-D 3-channel reference is an RGB image, in 0–255 (the defaults' units)."""
    return image.dim() == 4 and image.shape[1] == 3


def _check_shapes(logits: torch.Tensor, image: torch.Tensor) -> None:
    """Logits (B, L, *S) with 1-3 spatial dims and a reference (B, C, *S) beside them."""
    check_tensor(logits, "logits", layout="(B, L, *S)", floating=True, finite=True)
    if not 3 <= logits.dim() <= 5:
        raise ValueError(
            "logits must be (B, L, *S) with 1 to 3 spatial dimensions: (B, L, X), "
            f"(B, L, H, W) or (B, L, D, H, W); got shape {tuple(logits.shape)} "
            f"({logits.dim() - 2} spatial dimensions)"
        )
    check_tensor(image, "image", layout="(B, C, *S)")
    b, _, *size = logits.shape
    space = tuple(size)
    if image.dim() != logits.dim() or image.shape[0] != b or tuple(image.shape[2:]) != space:
        hint = ""
        if image.dim() == logits.dim() and tuple(image.shape[1:-1]) == space:
            hint = " (channels-last? permute the reference to (B, C, *S))"
        elif image.dim() == logits.dim() and tuple(image.shape[2:])[::-1] == space:
            hint = " (height and width swapped? arrays are (H, W))"
        elif image.dim() == logits.dim() - 1 and tuple(image.shape[1:]) == space:
            hint = " (one channel? give it its channel axis: image[:, None])"
        layout = _LAYOUTS[len(space)].replace("L", "C")
        raise ValueError(
            f"image must be {layout} matching logits {tuple(logits.shape)}, i.e. "
            f"({b}, C, {', '.join(map(str, space))}) with C >= 1 reference channels; got "
            f"{tuple(image.shape)}{hint}"
        )
    if image.device != logits.device:
        raise ValueError(
            f"image must be on the device of logits ({logits.device}); got {image.device}"
        )


def _check_reference(image: torch.Tensor) -> None:
    """The reference's values: non-empty, real dtype, finite, RGB in 0-255 (not [0, 1])."""
    if image.numel() == 0:
        raise ValueError(
            f"image must have at least one reference channel and point; got shape "
            f"{tuple(image.shape)}"
        )
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(
            f"image must be a real-valued (uint8 or floating) tensor; got {image.dtype}"
        )
    if image.is_floating_point():
        if not bool(torch.isfinite(image).all()):
            raise ValueError("image must be finite; found NaN/inf values")
        if _is_colour(image):
            lo, hi = float(image.min()), float(image.max())
            if lo < 0.0 or hi > 255.0:
                raise ValueError(
                    f"image must hold colour values in [0, 255] (un-normalised RGB); got range "
                    f"[{lo:.3g}, {hi:.3g}]"
                )
            if 0.0 < hi <= 1.0:
                # θβ is in 0-255 colour units: a [0, 1] image would make every colour
                # difference 255 times too small and the bilateral kernel colour-blind.
                raise ValueError(
                    f"image looks like RGB scaled to [0, 1] (range [{lo:.3g}, {hi:.3g}]); the "
                    "colour bandwidth θβ is in 0-255 units: pass image * 255 (or uint8)"
                )


# ------------------------------------------------------------------------------------------
# terms of the engine
# ------------------------------------------------------------------------------------------


def _grid_positions(
    size: Sequence[int], theta: Scalar, spacing: Sequence[float] | None, like: torch.Tensor
) -> torch.Tensor:
    """(N, k) row-major grid coordinates in physical units over the bandwidth, index·spacing/θ.

    θ is a scalar or one value per axis (k,); ``spacing`` (k,) the voxel size per axis.
    """
    axes = [torch.arange(s, device=like.device, dtype=like.dtype) for s in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(size))
    scale = 1.0 / to_tensor(theta, like)
    if spacing is not None:
        scale = scale * torch.tensor(spacing, device=like.device, dtype=like.dtype)
    return grid * scale


def _bilateral_features(
    image: torch.Tensor,
    theta_alpha: Scalar,
    theta_beta: Scalar,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """(B, N, k + C) features (p·s/θα, I/θβ) of the appearance kernel, contiguous.

    ``image`` is the reference (B, C, *S), k = len(S); θα scalar or (k,), θβ scalar or (C,).
    """
    b, c, *size = image.shape
    positions = _grid_positions(size, theta_alpha, spacing, image)
    ref = image.reshape(b, c, -1).transpose(1, 2) / to_tensor(theta_beta, image)
    return torch.cat([positions.expand(b, -1, -1), ref], dim=-1).contiguous()


def _spatial_features(
    image: torch.Tensor, theta_gamma: Scalar, spacing: Sequence[float] | None = None
) -> torch.Tensor:
    """(B, N, k) features p·s/θγ of the smoothness kernel, contiguous."""
    b, _, *size = image.shape
    positions = _grid_positions(size, theta_gamma, spacing, image)
    return positions.expand(b, -1, -1).contiguous()


def _one(like: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=like.dtype, device=like.device)


def _label_map(weight: torch.Tensor, mu: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The engine's A in ``z += K̄Q ∘ A`` for kernel weight w_m and compatibility μ.

    Potts (μ None): the message −Σ_l′ [l ≠ l′] w (K̄Q)(l′) equals +w (K̄Q)(l) up to a label
    constant, so A = w (scalar or (L,)), or Wᵀ for CRF-RNN's (L, L) weight matrix. With μ:
    z −= (K̄Q Wᵀ) μᵀ, A = −Wᵀ μᵀ.
    """
    if mu is None:
        return weight.transpose(0, 1) if weight.dim() == 2 else weight
    if weight.dim() == 2:
        w_t = weight.transpose(0, 1)
    elif weight.dim() == 1:
        w_t = torch.diag(weight)
    else:
        return -weight * mu.transpose(0, 1)
    return -(w_t @ mu.transpose(0, 1))


# ------------------------------------------------------------------------------------------
# functional form
# ------------------------------------------------------------------------------------------


def dense_crf(
    logits: torch.Tensor,
    image: torch.Tensor,
    *,
    iters: int = 5,
    theta_alpha: Bandwidth = 80.0,
    theta_beta: Bandwidth = 13.0,
    theta_gamma: Bandwidth = 3.0,
    w_bilateral: Scalar = 10.0,
    w_spatial: Scalar = 3.0,
    compat: torch.Tensor | None = None,
    normalization: Normalization = "symmetric",
    exclude_self: bool = False,
    method: Method = "lattice",
    checkpoint: bool = False,
    spacing: Spacing = None,
    allow_negative_weights: bool = False,
) -> torch.Tensor:
    """Refine logits with ``iters`` mean-field steps of a fully connected CRF; returns log Q.

    Implements the mean-field update of Krähenbühl & Koltun (2011, eq. 4 with the Gaussian
    kernels of eq. 3), unrolled as in CRF-as-RNN (Zheng et al. 2015):

        Q_i(l) ∝ exp(logits_i(l) − Σ_l′ μ(l, l′) Σ_m w_m [k̄_m Q](i, l′))

    where k̄_m is kernel m after ``normalization`` and, for matrix weights, w_m acts on the label
    axis. Differentiable w.r.t. ``logits``, and w.r.t. ``compat``, the weights and the bandwidths
    when they are tensors that require grad.

    Both kernels go through the permutohedral lattice (built once per call, reused by every
    iteration) and the whole loop through the mean-field engine (:mod:`deepcrf.ops.meanfield`:
    the fused compiled loop without autograd, one ``autograd.Function`` with an adjoint backward
    with it); a batch is one engine call. ``method="exact"`` uses the O(N²) brute-force filter
    for both kernels (tests and small images only).

    Any grid works: a 1-D signal, an image, a volume (k = len(S) spatial axes) with C reference
    channels; the bilateral kernel's lattice then has d = k + C dimensions, the spatial one k.

    Args:
        logits: unary scores, higher = more likely (U = −logits; log-probabilities work).
        image: the reference of the bilateral kernel, (B, C, *S) with any C >= 1: an RGB
            image in 0–255 (uint8 or float; the defaults' units), a grey image, RGB-D, or the
            modalities of a volume in their own units (set ``theta_beta`` to match).
        iters: number of mean-field iterations (0 returns log_softmax(logits)).
        theta_alpha: bilateral spatial bandwidth θα (std. dev.) in pixels, or in the units of
            ``spacing``; float, one per spatial axis (k,), or a 0-d/(k,) tensor.
        theta_beta: bilateral reference bandwidth θβ, in reference units (0–255 colour for
            RGB); float or one per channel (C,).
        theta_gamma: spatial (smoothness) bandwidth θγ, units of θα; float or (k,).
        w_bilateral: bilateral kernel weight: scalar, per-label (L,) vector or (L, L) matrix.
        w_spatial: spatial kernel weight: scalar, (L,) or (L, L).
        compat: (L, L) compatibility μ, a penalty (energy) matrix, may be asymmetric; None =
            Potts μ = [l ≠ l′].
        normalization: kernel normalisation as pydensecrf: ``"symmetric"`` (default),
            ``"before"``, ``"after"`` or ``"none"`` (the plain kernel sum).
        exclude_self: drop the j = i term (default False keeps it, as pydensecrf and CRF-RNN).
        method: ``"lattice"`` (fast, approximate) or ``"exact"`` (brute force, O(N²)).
        checkpoint: keep only every ⌈√iters⌉-th iteration's Q for the backward and recompute
            the others there: ≈ 2√iters instead of iters (B·N, L) arrays, about one more
            forward.
        spacing: the grid step per spatial axis in physical units (a volume's voxel size,
            e.g. millimetres), one number for all axes or k of them; None = 1. Position
            features are index·spacing/θ, so θα and θγ are physical lengths.
        allow_negative_weights: accept kernel weights below 0 (rejected by default: a
            negative weight pulls neighbours apart, almost always a sign slip).

    Returns:
        Refined logits, log Q (log-probabilities; ``.softmax(1)`` gives Q).

    Shape:
        logits: (B, L, *S)  unary scores, higher = more likely; S = (X,), (H, W) or (D, H, W)
        image:  (B, C, *S)  reference (RGB in 0-255 for images)
        compat: (L, L)
        return: (B, L, *S)

    Example:
        >>> logits = torch.randn(1, 3, 16, 16)
        >>> image = torch.rand(1, 3, 16, 16) * 255
        >>> dense_crf(logits, image, iters=2, method="exact").shape
        torch.Size([1, 3, 16, 16])
    """
    _check_shapes(logits, image)
    _check_reference(image)
    settings = _settings(logits, image, {
        "iters": iters, "theta_alpha": theta_alpha, "theta_beta": theta_beta,
        "theta_gamma": theta_gamma, "w_bilateral": w_bilateral, "w_spatial": w_spatial,
        "compat": compat, "normalization": normalization, "exclude_self": exclude_self,
        "method": method, "checkpoint": checkpoint, "spacing": spacing,
        "allow_negative_weights": allow_negative_weights,
    })  # fmt: skip
    return _run(logits, image, settings)


def _settings(logits: torch.Tensor, image: torch.Tensor, params: Mapping[str, Any]) -> _Run:
    """:func:`dense_crf`'s keyword arguments checked for inputs of checked shapes.

    ``params`` holds any of them; the others take dense_crf's defaults.
    """
    unknown = sorted(set(params) - set(_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unknown dense-CRF parameter(s) {', '.join(unknown)}; the parameters are "
            f"{', '.join(_DEFAULTS)}"
        )
    p = {**_DEFAULTS, **params}
    iters, compat, method = p["iters"], p["compat"], p["method"]
    normalization, allow_negative_weights = p["normalization"], p["allow_negative_weights"]
    theta_alpha, theta_beta, theta_gamma = p["theta_alpha"], p["theta_beta"], p["theta_gamma"]
    w_bilateral, w_spatial = p["w_bilateral"], p["w_spatial"]
    exclude_self, checkpoint, spacing = p["exclude_self"], p["checkpoint"], p["spacing"]
    num_classes = logits.shape[1]
    dims, channels = logits.dim() - 2, image.shape[1]
    for name, value in (("normalization", normalization), ("method", method)):
        check_choice(value, name, _NORMALIZATIONS if name == "normalization" else METHODS)
    weights = [
        _check_weight(w_bilateral, "w_bilateral", num_classes, allow_negative_weights),
        _check_weight(w_spatial, "w_spatial", num_classes, allow_negative_weights),
    ]
    if compat is not None:
        check_tensor(compat, "compat", ndim=2, layout="(L, L)", floating=True, finite=True)
        if tuple(compat.shape) != (num_classes, num_classes):
            raise ValueError(
                f"compat must be (L, L) = ({num_classes}, {num_classes}) for logits "
                f"{tuple(logits.shape)}; got {tuple(compat.shape)}"
            )
    settings = _Run(
        iters=check_int(iters, "iters", minimum=0),
        thetas=(
            _check_bandwidth(theta_alpha, "theta_alpha", dims, "spatial axis"),
            _check_bandwidth(theta_beta, "theta_beta", channels, "reference channel"),
            _check_bandwidth(theta_gamma, "theta_gamma", dims, "spatial axis"),
        ),
        weights=(weights[0], weights[1]),
        compat=compat,
        normalization=normalization,
        exclude_self=bool(exclude_self),
        method=method,
        checkpoint=bool(checkpoint),
        spacing=_check_spacing(spacing, dims),
    )
    return settings


# dense_crf's keyword arguments and their defaults (what refine passes on, checked by name).
_DEFAULTS: dict[str, Any] = {
    name: param.default
    for name, param in inspect.signature(dense_crf).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY
}


@dataclass(frozen=True)
class _Run:
    """The checked settings of one :func:`dense_crf` call (or of a :class:`DenseCRF` forward)."""

    iters: int
    thetas: tuple[Scalar, Scalar, Scalar]  # θα, θβ, θγ
    weights: tuple[Scalar, Scalar]  # bilateral, spatial
    compat: torch.Tensor | None
    normalization: str
    exclude_self: bool
    method: str
    checkpoint: bool
    spacing: tuple[float, ...] | None


def _run(logits: torch.Tensor, image: torch.Tensor, s: _Run) -> torch.Tensor:
    """Mean-field for checked inputs and settings: cost check, precision, then the engine."""
    tensors = [logits, image, s.compat, *s.thetas, *s.weights]
    training = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )
    _check_cost(logits, image, s.iters, s.method, training)
    out_dtype = logits.dtype
    # Half precision is not accurate enough for kernel row sums over ~10⁵ pixels: compute in
    # float32 (also under autocast) and cast the result back.
    compute = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        out = _mean_field(
            compute,
            image,
            s.iters,
            list(s.thetas),
            list(s.weights),
            s.compat,
            s.normalization,
            s.exclude_self,
            s.method,
            s.checkpoint,
            s.spacing,
        )
    return out.to(out_dtype)


# Points above which method="exact" (O(N²) per kernel and iteration) warns of its cost.
EXACT_WARN_POINTS = 4096
# Measured cost of the exact filter: ~0.7 ns per (point pair, label) on one core.
_EXACT_NS_PER_PAIR_LABEL = 0.7
# Below this estimate the memory check is skipped (it reads /proc/meminfo).
_MEMORY_CHECK_BYTES = 32 * 2**20


class ExactFilterWarning(UserWarning):
    """``method="exact"`` on so many points that it will take very long (O(N²))."""


def _check_cost(
    logits: torch.Tensor, image: torch.Tensor, iters: int, method: str, training: bool
) -> None:
    """Fail before a call that cannot fit in memory; warn before a very slow exact filter."""
    b, num_classes = logits.shape[:2]
    n = logits[0, 0].numel()
    dims = logits.dim() - 2
    if method == "exact" and n > EXACT_WARN_POINTS and iters > 0:
        pairs = float(n) * n
        seconds = pairs * 2 * (iters + 1) * num_classes * b * _EXACT_NS_PER_PAIR_LABEL * 1e-9
        warnings.warn(
            f"method='exact' is O(N²): {n} points make {pairs:.2g} pairs per kernel and "
            f"iteration, roughly {seconds:.0f} s on one CPU core; method='lattice' is O(N)",
            ExactFilterWarning,
            stacklevel=3,
        )
    itemsize = 8 if logits.dtype == torch.float64 else 4
    needed = estimate_peak_bytes(
        b * n, num_classes, (dims + image.shape[1], dims), iters, training=training,
        itemsize=itemsize,
    )  # fmt: skip
    if needed > _MEMORY_CHECK_BYTES and method == "lattice":
        check_memory(
            needed,
            f"dense_crf on {b} x {n} points x {num_classes} labels",
            "tile the input (e.g. halves or quarters with some overlap), use fewer labels or "
            "a smaller batch, or checkpoint=True when training",
            logits.device,
        )


def crf_terms(
    image: torch.Tensor,
    theta_alpha: Scalar,
    theta_beta: Scalar,
    theta_gamma: Scalar,
    *,
    normalization: Normalization = "symmetric",
    exclude_self: bool = False,
    method: Method = "lattice",
    spacing: Sequence[float] | None = None,
) -> tuple[PairwiseTerm, PairwiseTerm]:
    """The bilateral and spatial kernels of eq. 3 as mean-field engine terms, weights 1.

    Builds each kernel (lattice) and its normalisation once, so that several weight settings
    can reuse them (``dataclasses.replace(term, coef=w)``, see :mod:`deepcrf.ops.meanfield`):
    the grid search of :func:`deepcrf.engine.tune.tune_dense_crf` does.  Features are
    (p·s/θα, I/θβ) and p·s/θγ with p the grid index and s the spacing per axis; bandwidths
    may be tensors that require grad, θα and θγ scalar or one per axis (k,), θβ scalar or one
    per channel (C,).

    Shape:
        image: (B, C, *S) reference (RGB in 0-255 for images), floating (the computation
            dtype); k = len(S) in 1..3
    """
    kw: dict[str, Any] = dict(normalization=normalization, exclude_self=exclude_self, method=method)
    return (
        bilateral_term(image, theta_alpha, theta_beta, spacing=spacing, **kw),
        spatial_term(image, theta_gamma, spacing=spacing, **kw),
    )


def bilateral_term(
    image: torch.Tensor,
    theta_alpha: Scalar,
    theta_beta: Scalar,
    *,
    normalization: Normalization = "symmetric",
    exclude_self: bool = False,
    method: Method = "lattice",
    spacing: Sequence[float] | None = None,
) -> PairwiseTerm:
    """The appearance kernel exp(−|p_i − p_j|²/2θα² − |I_i − I_j|²/2θβ²) as a term, weight 1.

    Per axis/channel bandwidths divide each coordinate by its own θ.

    Shape:
        image: (B, C, *S) the reference, floating
    """
    return _named_build(
        "the bilateral kernel (theta_alpha, theta_beta, spacing)",
        _bilateral_features(image, theta_alpha, theta_beta, spacing),
        _one(image),
        normalization=normalization,
        exclude_self=exclude_self,
        method=method,
    )


def spatial_term(
    image: torch.Tensor,
    theta_gamma: Scalar,
    *,
    normalization: Normalization = "symmetric",
    exclude_self: bool = False,
    method: Method = "lattice",
    spacing: Sequence[float] | None = None,
) -> PairwiseTerm:
    """The smoothness kernel exp(−|p_i − p_j|²/2θγ²) as a term, weight 1.

    Only the reference's batch size, spatial size, dtype and device are used.

    Shape:
        image: (B, C, *S)
    """
    return _named_build(
        "the spatial kernel (theta_gamma, spacing)",
        _spatial_features(image, theta_gamma, spacing),
        _one(image),
        normalization=normalization,
        exclude_self=exclude_self,
        method=method,
    )


def _named_build(what: str, features: torch.Tensor, coef: torch.Tensor, **kw: Any) -> PairwiseTerm:
    """:func:`build_term`, its feature errors (bandwidths too small) naming the arguments."""
    try:
        return build_term(features, coef, **kw)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err


def lattice_error(
    image: torch.Tensor,
    *,
    theta_alpha: Bandwidth = 80.0,
    theta_beta: Bandwidth = 13.0,
    theta_gamma: Bandwidth = 3.0,
    spacing: Spacing = None,
    samples: int = 256,
) -> dict[str, float]:
    """How far the permutohedral lattice's kernels are from the exact Gaussians on ``image``.

    The lattice under-weights narrow Gaussians: when the features are sparse on its unit cell
    (small θα/θβ on a noisy image) its row sums K·1, and with them Q and the bandwidth
    gradients, come out too small.  This samples ``samples`` points per image, computes their
    exact row sums (O(samples·N)) and returns the mean relative error of the lattice's, per
    kernel: ``{"bilateral": e, "spatial": e}`` (0.1 = 10 %).  docs/meanfield.md lists regimes.

    Shape:
        image: (B, C, *S) the reference (RGB in 0-255 for images), 1 to 3 spatial dims
    """
    check_tensor(image, "image", layout="(B, C, *S)")
    if not 3 <= image.dim() <= 5:
        raise ValueError(
            f"image must be (B, C, *S) with 1 to 3 spatial dims; got {tuple(image.shape)}"
        )
    dims, channels = image.dim() - 2, image.shape[1]
    img = image.detach().float()
    ta, tb, tg = (
        to_tensor(_check_bandwidth(t, name, n, per), img).detach()
        for t, name, n, per in (
            (theta_alpha, "theta_alpha", dims, "spatial axis"),
            (theta_beta, "theta_beta", channels, "reference channel"),
            (theta_gamma, "theta_gamma", dims, "spatial axis"),
        )
    )
    voxel = _check_spacing(spacing, dims)
    features = {
        "bilateral": _bilateral_features(img, ta, tb, voxel),
        "spatial": _spatial_features(img, tg, voxel),
    }
    return {name: row_sum_error(KernelOp(f), samples=samples) for name, f in features.items()}


# Relative row-sum error of the lattice above which DenseCRF warns (once per module).
LATTICE_ERROR_WARN = 0.10


class LatticeAccuracyWarning(UserWarning):
    """The permutohedral lattice's kernels are far (> 10 %) from the exact Gaussians."""


def _mean_field(
    logits: torch.Tensor,
    image: torch.Tensor,
    iters: int,
    thetas: list[Scalar],
    weights: list[Scalar],
    compat: torch.Tensor | None,
    normalization: str,
    exclude_self: bool,
    method: str,
    use_checkpoint: bool,
    spacing: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """The two kernels of eq. 3 as engine terms, run by :func:`deepcrf.ops.meanfield.mean_field`."""
    b, num_classes, *size = logits.shape
    n = logits[0, 0].numel()
    if iters == 0:
        return logits.log_softmax(dim=1)
    theta_alpha, theta_beta, theta_gamma = (to_tensor(t, logits) for t in thetas)
    w_bil, w_sp = (to_tensor(x, logits) for x in weights)
    mu = None if compat is None else compat.to(device=logits.device, dtype=logits.dtype)

    bilateral, spatial = crf_terms(
        image.to(logits.dtype),
        theta_alpha,
        theta_beta,
        theta_gamma,
        normalization=normalization,
        exclude_self=exclude_self,
        method=method,
        spacing=spacing,
    )
    terms = [
        replace(bilateral, coef=_label_map(w_bil, mu, num_classes)),
        replace(spatial, coef=_label_map(w_sp, mu, num_classes)),
    ]
    base = _Relayout.apply(logits.reshape(b, num_classes, n)).reshape(b * n, num_classes)
    log_q = engine_mean_field(base, terms, iters, checkpoint=use_checkpoint)
    # contiguous: a (B, L, *S) view of the (B, N, L) buffer would have odd strides, which
    # some consumers reject (CPU nll_loss2d's backward).
    out = _Relayout.apply(log_q.reshape(b, n, num_classes))
    return out.reshape(b, num_classes, *size)


class _Relayout(torch.autograd.Function):
    """(B, L, N) ↔ (B, N, L) as a contiguous copy in workspace memory, both ways.

    The engine's points-major rows and the network's channels-major maps: at a batch of VOC
    images each copy is tens of MB, and fresh memory costs a page fault per 4 KB (see
    :mod:`deepcrf.ops.workspace`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _swap_last(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _swap_last(grad)


def _swap_last(x: torch.Tensor) -> torch.Tensor:
    """X (B, A, C) transposed to a contiguous (B, C, A), in workspace memory."""
    b, a, c = x.shape
    out = workspace.empty((b, c, a), x.dtype, x.device)
    return out.copy_(x.transpose(1, 2))


# ------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------


class DenseCRF(nn.Module):
    """Fully connected CRF layer (CRF-as-RNN) with learnable μ, kernel weights and bandwidths.

    Holds the parameters and calls :func:`dense_crf` (the mean-field update of Krähenbühl &
    Koltun 2011, eq. 4). ``learnable`` picks which groups are ``nn.Parameter`` s (the others are
    buffers, so ``state_dict`` always has every value):

    * ``"compat"`` → ``compat`` (L, L), initialised Potts [l ≠ l′] (asymmetric updates allowed);
    * ``"weights"`` → ``w_bilateral``, ``w_spatial``: scalar, (L,) or (L, L) = w·I per
      ``weight_shape`` (CRF-RNN uses ``"matrix"`` with 5·I bilateral, 3·I spatial);
    * ``"bandwidths"`` → ``log_theta_alpha``, ``log_theta_beta``, ``log_theta_gamma`` (logs,
      so θ = exp(·) stays positive); gradients are exact for the Gaussian model (Schwing &
      Urtasun 2015).

    Args:
        num_classes: number of labels L.
        theta_alpha: bilateral spatial bandwidth θα, pixels (or ``spacing`` units); one per
            spatial axis as a sequence to learn them apart.
        theta_beta: bilateral colour bandwidth θβ, reference units (0–255 colour for RGB); one
            per reference channel as a sequence.
        theta_gamma: spatial kernel bandwidth θγ, pixels; one per axis as a sequence.
        w_bilateral: initial bilateral weight.
        w_spatial: initial spatial weight.
        iters: mean-field iterations in training mode (CRF-RNN: 5).
        eval_iters: iterations in eval mode (CRF-RNN: 10); None = ``iters``.
        learnable: subset of ``{"compat", "weights", "bandwidths"}``.
        method: ``"lattice"`` or ``"exact"`` (brute force, small images only).
        weight_shape: ``"scalar"``, ``"vector"`` (per label) or ``"matrix"`` (L×L).
        compat_init: ``"potts"`` or an (L, L) penalty matrix (tensor or array).
        normalization: ``"symmetric"``, ``"before"``, ``"after"`` or ``"none"``.
        exclude_self: drop the j = i term of the kernels.
        checkpoint: recompute iterations in the backward to bound memory.
        allow_negative_weights: accept negative initial kernel weights (rejected by default).

    Shape:
        logits: (B, L, *S)  unary scores, higher = more likely; 1 to 3 spatial dims
        image:  (B, C, *S)  the reference (RGB in 0-255 for images)
        return: (B, L, *S)  refined logits (log Q)

    Example:
        >>> crf = DenseCRF(3, learnable=("compat", "weights", "bandwidths"), method="exact")
        >>> crf(torch.randn(1, 3, 8, 8), torch.rand(1, 3, 8, 8) * 255).shape
        torch.Size([1, 3, 8, 8])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        theta_alpha: float = 80.0,
        theta_beta: float = 13.0,
        theta_gamma: float = 3.0,
        w_bilateral: float = 10.0,
        w_spatial: float = 3.0,
        iters: int = 5,
        eval_iters: int | None = None,
        learnable: Iterable[str] = (),
        method: Method = "lattice",
        weight_shape: WeightShape = "scalar",
        compat_init: str | torch.Tensor | np.ndarray = "potts",
        normalization: Normalization = "symmetric",
        exclude_self: bool = False,
        checkpoint: bool = False,
        allow_negative_weights: bool = False,
    ) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", minimum=2)
        iters = check_int(iters, "iters", minimum=0)
        if eval_iters is not None:
            eval_iters = check_int(eval_iters, "eval_iters", minimum=0)
        if isinstance(learnable, str):
            learnable = (learnable,)
        learn = set(learnable)
        unknown = learn - set(_LEARNABLE)
        if unknown:
            raise ValueError(f"learnable must be a subset of {_LEARNABLE}; got {sorted(unknown)}")
        check_choice(method, "method", METHODS)
        check_choice(weight_shape, "weight_shape", _WEIGHT_SHAPES)
        check_choice(normalization, "normalization", _NORMALIZATIONS)

        self.num_classes = num_classes
        self.iters = iters
        self.eval_iters = eval_iters
        self.learnable = tuple(g for g in _LEARNABLE if g in learn)
        self.method = method
        self.weight_shape = weight_shape
        self.normalization = normalization
        self.exclude_self = bool(exclude_self)
        self.checkpoint = bool(checkpoint)
        self.allow_negative_weights = bool(allow_negative_weights)
        self._accuracy_checked = False

        self._register("compat", self._initial_compat(compat_init), "compat" in learn)
        for name, value in (("w_bilateral", w_bilateral), ("w_spatial", w_spatial)):
            v = float(_check_weight(value, name, num_classes, allow_negative_weights))
            self._register(name, self._initial_weight(v), "weights" in learn)
        for name, value in (
            ("theta_alpha", theta_alpha),
            ("theta_beta", theta_beta),
            ("theta_gamma", theta_gamma),
        ):
            self._register(f"log_{name}", _initial_log_theta(value, name), "bandwidths" in learn)

    def _register(self, name: str, value: torch.Tensor, learn: bool) -> None:
        if learn:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _initial_compat(self, init: str | torch.Tensor | np.ndarray) -> torch.Tensor:
        L = self.num_classes
        if isinstance(init, str):
            if init != "potts":
                raise ValueError(f"compat_init must be 'potts' or an (L, L) matrix; got {init!r}")
            return 1.0 - torch.eye(L)
        mat = torch.as_tensor(np.asarray(init) if isinstance(init, np.ndarray) else init)
        mat = mat.detach().to(torch.float32).clone()
        if tuple(mat.shape) != (L, L) or not bool(torch.isfinite(mat).all()):
            raise ValueError(
                f"compat_init must be a finite ({L}, {L}) matrix; got shape {tuple(mat.shape)}"
            )
        return mat

    def _initial_weight(self, value: float) -> torch.Tensor:
        if self.weight_shape == "scalar":
            return torch.tensor(value)
        if self.weight_shape == "vector":
            return torch.full((self.num_classes,), value)
        return value * torch.eye(self.num_classes)

    @property
    def theta_alpha(self) -> float | tuple[float, ...]:
        """Current bilateral spatial bandwidth θα (pixels or spacing units; one per axis)."""
        return _values(self.log_theta_alpha)

    @property
    def theta_beta(self) -> float | tuple[float, ...]:
        """Current bilateral colour bandwidth θβ (reference units; one per channel)."""
        return _values(self.log_theta_beta)

    @property
    def theta_gamma(self) -> float | tuple[float, ...]:
        """Current spatial bandwidth θγ (pixels or spacing units; one per axis)."""
        return _values(self.log_theta_gamma)

    @property
    def active_iters(self) -> int:
        """Iterations the next forward runs: ``iters`` in training, ``eval_iters`` in eval."""
        if not self.training and self.eval_iters is not None:
            return self.eval_iters
        return self.iters

    def forward(
        self, logits: torch.Tensor, image: torch.Tensor, spacing: Spacing = None
    ) -> torch.Tensor:
        """Refine ``logits`` (B, L, *S) with the reference (B, C, *S); returns log Q.

        ``spacing`` is the voxel size per spatial axis (physical units, default 1), the units
        of θα and θγ.
        """
        _check_shapes(logits, image)
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have {self.num_classes} labels (B, {self.num_classes}, *S); got "
                f"{tuple(logits.shape)}"
            )
        _check_reference(image)
        voxel = _check_spacing(spacing, logits.dim() - 2)
        if self.method == "lattice" and self.training and not self._accuracy_checked:
            self._check_lattice_accuracy(image, spacing)
        # The layer's own parameters are valid by construction (θ = exp(log θ) > 0; shapes
        # fixed at __init__): they are not re-checked, which would read them back from the
        # device at every forward. One bandwidth per axis/channel must match this input.
        thetas = (self.log_theta_alpha.exp(), self.log_theta_beta.exp(), self.log_theta_gamma.exp())
        dims, channels = logits.dim() - 2, image.shape[1]
        for theta, name, n, per in zip(thetas, _THETAS, (dims, channels, dims), _PER, strict=True):
            if theta.dim() == 1 and theta.shape[0] != n:
                raise ValueError(
                    f"{name} has {theta.shape[0]} values but this input has {n} {per}s"
                )
        settings = _Run(
            iters=self.active_iters,
            thetas=thetas,
            weights=(self.w_bilateral, self.w_spatial),
            compat=self.compat,
            normalization=self.normalization,
            exclude_self=self.exclude_self,
            method=self.method,
            checkpoint=self.checkpoint,
            spacing=voxel,
        )
        return _run(logits, image, settings)

    def _check_lattice_accuracy(self, image: torch.Tensor, spacing: Spacing) -> None:
        """Warn once when the lattice's kernels are > 10 % off the exact ones on this image."""
        self._accuracy_checked = True
        try:
            errors = lattice_error(
                image[:1],
                theta_alpha=self.theta_alpha,
                theta_beta=self.theta_beta,
                theta_gamma=self.theta_gamma,
                spacing=spacing,
                samples=64,
            )
        except (TypeError, ValueError):
            return  # dense_crf raises the error that names the problem
        bad = {k: v for k, v in errors.items() if v > LATTICE_ERROR_WARN}
        if bad:
            said = ", ".join(f"{k} {100 * v:.0f} %" for k, v in bad.items())
            warnings.warn(
                f"DenseCRF: the permutohedral lattice's kernels are off the exact Gaussians "
                f"on this input (row sums by {said} on average; narrow kernels come out too "
                "small): Q and the bandwidth gradients are off with them. Wider bandwidths "
                f"(θα={_fmt(self.theta_alpha)}, "
                f"θβ={_fmt(self.theta_beta)}, θγ={_fmt(self.theta_gamma)} now) or method='exact' "
                "on small images avoid it; see deepcrf.lattice_error and docs/meanfield.md.",
                LatticeAccuracyWarning,
                stacklevel=5,  # the caller of the module (through nn.Module.__call__)
            )

    def extra_repr(self) -> str:
        """Size, schedule and current bandwidths, shown by ``print(module)``."""
        return (
            f"num_classes={self.num_classes}, iters={self.iters}, eval_iters={self.eval_iters}, "
            f"learnable={self.learnable}, method={self.method!r}, "
            f"weight_shape={self.weight_shape!r}, normalization={self.normalization!r}, "
            f"theta=({_fmt(self.theta_alpha)}, {_fmt(self.theta_beta)}, "
            f"{_fmt(self.theta_gamma)})"
        )


def _initial_log_theta(value: Bandwidth, name: str) -> torch.Tensor:
    """Log θ as a float32 0-d tensor, or (k,) for one bandwidth per axis or channel."""
    theta = _check_bandwidth(value, name, None, "axis or channel")
    if isinstance(theta, torch.Tensor):
        return theta.detach().cpu().to(torch.float64).log().float()
    return torch.tensor(theta).log()


def _values(log_theta: torch.Tensor) -> float | tuple[float, ...]:
    theta = log_theta.detach().exp()
    return float(theta) if theta.dim() == 0 else tuple(float(t) for t in theta)


def _fmt(value: float | tuple[float, ...]) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:.4g}" for v in value) + ")"
    return f"{value:.4g}"


# ------------------------------------------------------------------------------------------
# numpy helper
# ------------------------------------------------------------------------------------------


def refine(probs: np.ndarray, image: np.ndarray, **params: Any) -> np.ndarray:
    """Dense-CRF post-processing of one image's or volume's label probabilities (numpy).

    Runs :func:`dense_crf` with ``logits = log(probs)`` (clipped at 1e-8) on CPU in float32.
    The reference is channels-last like an image file, ``(*S, C)``, or ``(*S)`` for a single
    channel (a grey image, one MRI modality); an RGB image (H, W, 3) holds 0–255 colours
    (uint8, or float — a [0, 1] float image is refused), other references may have any real
    dtype, in the units of ``theta_beta``.

    Args:
        probs: per-label probabilities, summing to 1 over the label axis (axis 0).
        image: the reference: an RGB image (H, W, 3) in 0–255, or any (*S) / (*S, C) array.
        **params: keyword arguments of :func:`dense_crf` (``iters``, ``theta_alpha``,
            ``spacing``, ...).

    Returns:
        Refined probabilities Q, float32, summing to 1 over labels.

    Shape:
        probs:  (L, *S)
        image:  (H, W, 3) RGB, or (*S) or (*S, C) with 1 <= len(S) <= 3
        return: (L, *S)

    Example:
        >>> img = np.zeros((8, 8, 3), np.uint8)
        >>> refine(np.full((2, 8, 8), 0.5, np.float32), img, method="exact").shape
        (2, 8, 8)
        >>> refine(np.full((2, 4, 5, 6), 0.5), np.zeros((4, 5, 6)), spacing=(2, 1, 1)).shape
        (2, 4, 5, 6)
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating-point (L, *S) probabilities; got {probs.dtype}")
    if not 2 <= probs.ndim <= 4 or probs.size == 0:
        raise ValueError(
            f"probs must be (L, *S) with 1 to 3 spatial dims, e.g. (L, H, W) or (L, D, H, W); "
            f"got shape {probs.shape}"
        )
    if image.dtype == np.bool_ or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise TypeError(f"image must be a real-valued array; got dtype {image.dtype}")
    space = probs.shape[1:]
    if image.shape == space:
        channels_last = image[..., None]
    elif image.shape[:-1] == space and image.ndim == probs.ndim:
        channels_last = image
    else:
        raise ValueError(
            f"probs (L, *S) {probs.shape} must match the image (*S, C) or (*S) {image.shape} in "
            f"its spatial size {space}"
        )
    if probs.shape[0] < 2:
        raise ValueError(f"probs must have at least 2 labels; got shape {probs.shape}")
    if not np.isfinite(probs).all() or probs.min() < 0:
        raise ValueError("probs must be finite and non-negative")
    if not np.isfinite(channels_last.astype(np.float64, copy=False)).all():
        raise ValueError("image must be finite; found NaN/inf values")
    sums = probs.sum(axis=0, dtype=np.float64)
    worst = float(sums.flat[np.abs(sums - 1.0).argmax()])
    if abs(worst - 1.0) > 1e-3:
        raise ValueError(
            f"probs must sum to 1 over the label axis (axis 0 of (L, *S)), within 1e-3; "
            f"the worst point sums to {worst:.6g}"
        )
    logits = torch.from_numpy(np.log(np.clip(probs.astype(np.float32), 1e-8, None)))[None]
    channels_first = np.moveaxis(channels_last, -1, 0).astype(np.float32)
    ref = torch.from_numpy(np.ascontiguousarray(channels_first))[None]
    _check_reference(ref)  # the shapes are checked above, on the arrays the caller gave
    with torch.no_grad():
        q = _run(logits, ref, _settings(logits, ref, params)).softmax(dim=1)[0]
    return q.numpy().astype(np.float32, copy=False)
