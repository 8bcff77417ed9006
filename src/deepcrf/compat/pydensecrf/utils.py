"""Drop-in replacement for ``pydensecrf.utils``: unaries and pairwise features as numpy arrays.

Same functions, arguments, defaults, dtypes (float32) and shapes as pydensecrf's, with input
checks that name the argument (e.g. softmax outputs that do not sum to one along axis 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from numbers import Number
from typing import Any

import numpy as np

__all__ = [
    "compute_unary",
    "create_pairwise_bilateral",
    "create_pairwise_gaussian",
    "softmax_to_unary",
    "unary_from_labels",
    "unary_from_softmax",
]


def unary_from_labels(
    labels: Any, n_labels: int, gt_prob: float, zero_unsure: bool = True
) -> np.ndarray:
    """Unary energy from a label map trusted with probability ``gt_prob``.

    Each pixel's given label gets energy −log(gt_prob), every other label
    −log((1 − gt_prob)/(n_labels − 1)).  With ``zero_unsure`` the value 0 means "unknown"
    (uniform energy −log(1/n_labels)) and the labels are 1 … n_labels, mapped to rows
    0 … n_labels − 1; otherwise the labels are 0 … n_labels − 1.

    Args:
        labels: integer label map of any shape (flattened in C order).
        n_labels: number of labels (not counting 0 when ``zero_unsure``).
        gt_prob: confidence in the given labels, in (0, 1).
        zero_unsure: treat label 0 as "unsure".

    Shape:
        labels: (H, W) or any shape with N elements
        return: (n_labels, N) float32
    """
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1); got {gt_prob!r}")
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 2:
        raise ValueError(f"n_labels must be an integer >= 2; got {n_labels!r}")
    flat = np.asarray(labels).reshape(-1)
    if flat.size == 0:
        raise ValueError("labels must not be empty")
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"labels must be an integer array; got dtype {flat.dtype}")
    low, high = (0, n_labels) if zero_unsure else (0, n_labels - 1)
    if flat.min() < low or flat.max() > high:
        raise ValueError(
            f"labels must be in [{low}, {high}] for n_labels={n_labels}, "
            f"zero_unsure={zero_unsure}; got values in [{flat.min()}, {flat.max()}]"
        )
    energy_other = -np.log((1.0 - gt_prob) / (n_labels - 1))
    energy_given = -np.log(gt_prob)
    unary = np.full((n_labels, flat.size), energy_other, dtype=np.float32)
    rows = flat.astype(np.int64) - 1 if zero_unsure else flat.astype(np.int64)
    cols = np.arange(flat.size)
    if zero_unsure:
        known = flat != 0
        unary[rows[known], cols[known]] = energy_given
        unary[:, ~known] = -np.log(1.0 / n_labels)
    else:
        unary[rows, cols] = energy_given
    return unary


def unary_from_softmax(
    sm: Any, scale: float | None = None, clip: float | None = 1e-5
) -> np.ndarray:
    """Unary energy −log p from class probabilities with the classes on axis 0.

    Args:
        sm: probabilities, classes on axis 0, summing to 1 along it (within 1e-3, 1e-2 for
            float16); the other axes are flattened in C order.
        scale: if given, in (0, 1]: mix with the uniform distribution, p ← scale·p +
            (1 − scale)/L.
        clip: lower bound applied to p before the log (None: no clipping).

    Shape:
        sm:     (L, H, W) or (L, N)
        return: (L, N) float32
    """
    probs = np.asarray(sm)
    if probs.ndim < 1 or probs.size == 0:
        raise ValueError(
            f"sm must be a non-empty array with the classes on axis 0; got {probs.shape}"
        )
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"sm must hold floating-point probabilities; got dtype {probs.dtype}")
    if not np.isfinite(probs).all():
        raise ValueError("sm must be finite")
    if probs.min() < 0:
        raise ValueError(f"sm must hold probabilities >= 0; found {probs.min()}")
    tol = 1e-2 if probs.dtype.itemsize < 4 else 1e-3
    sums = probs.sum(axis=0, dtype=np.float64)
    worst = float(np.abs(sums - 1.0).max())
    if worst > tol:
        raise ValueError(
            f"sm must be probabilities summing to 1 along axis 0 (the {probs.shape[0]} classes); "
            f"the sums deviate by up to {worst:.3g} — pass softmax outputs, not logits, with "
            "the classes first"
        )
    num_classes = probs.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1]; got {scale!r}")
        probs = scale * probs + (1 - scale) * (np.ones(probs.shape) / num_classes)
    if clip is not None:
        probs = np.clip(probs, clip, 1.0)
    return (-np.log(probs)).reshape(num_classes, -1).astype(np.float32)


def softmax_to_unary(sm: Any, GT_PROB: float = 1) -> np.ndarray:
    """Deprecated alias kept for pydensecrf compatibility: use :func:`unary_from_softmax`."""
    warnings.warn(
        "softmax_to_unary is deprecated, use unary_from_softmax", DeprecationWarning, stacklevel=2
    )
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)


def compute_unary(labels: Any, M: int, GT_PROB: float = 0.5) -> np.ndarray:
    """Deprecated alias kept for pydensecrf compatibility: use :func:`unary_from_labels`."""
    warnings.warn(
        "compute_unary is deprecated, use unary_from_labels", DeprecationWarning, stacklevel=2
    )
    return unary_from_labels(labels, M, GT_PROB)


def _check_scales(values: Sequence[float], name: str) -> None:
    for v in values:
        if not (float(v) > 0) or not np.isfinite(float(v)):
            raise ValueError(f"{name} must hold finite positive numbers; got {values!r}")


def create_pairwise_gaussian(sdims: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Position features for a Gaussian (smoothness) kernel on a grid of any dimension.

    Feature k of variable (i_0, i_1, …) is i_k / sdims[k] (C order, so for an (H, W) image the
    first feature is the row y, the second the column x).  For 2-D images
    ``DenseCRF2D.addPairwiseGaussian`` gives the same kernel.

    Args:
        sdims: standard deviation per grid axis, in pixels.
        shape: the grid shape, e.g. (H, W).

    Shape:
        return: (len(shape), prod(shape)) float32
    """
    shape = tuple(int(s) for s in shape)
    if len(sdims) != len(shape):
        raise ValueError(
            f"sdims must give one scale per grid axis ({len(shape)} for shape {shape}); "
            f"got {tuple(sdims)}"
        )
    if any(s <= 0 for s in shape):
        raise ValueError(f"shape must be positive sizes; got {shape}")
    _check_scales(sdims, "sdims")
    mesh = np.array(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), dtype=np.float32)
    for axis, s in enumerate(sdims):
        mesh[axis] /= np.float32(s)
    return mesh.reshape(len(shape), -1)


def create_pairwise_bilateral(
    sdims: Sequence[float], schan: float | Sequence[float], img: Any, chdim: int = -1
) -> np.ndarray:
    """Position-and-channel features for a bilateral (appearance) kernel.

    Features are the grid positions divided by ``sdims`` followed by the image channels divided
    by ``schan``.

    Args:
        sdims: spatial standard deviation per grid axis (θα), in pixels.
        schan: channel standard deviation(s) (θβ), one number or one per channel.
        img: the image; ``chdim`` is its channel axis, or -1 for a single-channel image
            without one.
        chdim: channel axis of ``img`` (2 for (H, W, 3)), -1 for none.

    Shape:
        img:    (H, W, C) with chdim=2, (H, W) with chdim=-1
        return: (len(sdims) + C, H·W) float32
    """
    image = np.asarray(img)
    if image.size == 0:
        raise ValueError(f"img must not be empty; got shape {image.shape}")
    if chdim == -1:
        channels = image[np.newaxis].astype(np.float32)
    else:
        if not -image.ndim <= chdim < image.ndim:
            raise ValueError(f"chdim {chdim} is out of range for img of shape {image.shape}")
        channels = np.moveaxis(image, chdim, 0).astype(np.float32)
    if len(sdims) != channels.ndim - 1:
        raise ValueError(
            f"sdims must give one scale per spatial axis ({channels.ndim - 1} for img of shape "
            f"{image.shape} with chdim={chdim}); got {tuple(sdims)}"
        )
    _check_scales(sdims, "sdims")
    if isinstance(schan, Number):
        _check_scales([schan], "schan")  # type: ignore[list-item]
        channels /= np.float32(schan)
    else:
        if len(schan) != channels.shape[0]:
            raise ValueError(
                f"schan must be one number or one per channel ({channels.shape[0]}); "
                f"got {tuple(schan)}"
            )
        _check_scales(schan, "schan")
        for c, s in enumerate(schan):
            channels[c] /= np.float32(s)
    mesh = np.array(
        np.meshgrid(*[np.arange(s) for s in channels.shape[1:]], indexing="ij"), dtype=np.float32
    )
    for axis, s in enumerate(sdims):
        mesh[axis] /= np.float32(s)
    features = np.concatenate([mesh, channels])
    return features.reshape(features.shape[0], -1)
