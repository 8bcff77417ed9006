"""CNN + CRF: put any CRF layer of the library on top of any segmentation network.

DeepLab (Chen et al. 2015) couples the network's stride-8 scores, bilinearly upsampled to the
image, with a fully connected CRF whose unary term is U_i(l) = -logit_i(l).  The wrapper here is
that coupling, for every model in the registry and every CRF in :mod:`deepcrf.crf`:
``refined = crf(model(image), image)``.  The CRF lives in the attribute ``crf`` so that its
parameters are named ``crf.*`` (the engine gives them their own learning rate) and the network's
parameters ``model.*``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deepcrf.crf.dense import DenseCRF

__all__ = ["CRF_KINDS", "CRFSegmenter", "build_crf", "with_crf"]

# ``crf=`` strings accepted by every factory of the registry -> ``DenseCRF`` settings: a fixed
# CRF (DeepLab's post-processing); CRF-as-RNN (Zheng et al. 2015): learnable compatibility and
# kernel weights as L×L matrices; the same plus learnable kernel bandwidths (Schwing & Urtasun).
CRF_KINDS: dict[str, dict[str, Any]] = {
    "dense": {"learnable": ()},
    "dense-learnable": {"learnable": ("compat", "weights"), "weight_shape": "matrix"},
    "dense-bandwidths": {
        "learnable": ("compat", "weights", "bandwidths"),
        "weight_shape": "matrix",
    },
}


def build_crf(
    kind: str,
    num_classes: int,
    crf_kwargs: Mapping[str, Any] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the dense CRF named ``kind`` for ``num_classes`` labels.

    The CRF is ``deepcrf.crf.dense.DenseCRF`` (mean-field inference in the fully connected CRF,
    Q_i(l) ∝ exp(-U_i(l) - Σ_l' μ(l,l') Σ_m w_m Σ_j k_m(f_i,f_j) Q_j(l'))), imported lazily so
    that the models layer does not pull the CRF layer in until one is asked for.

    Args:
        kind: one of ``"dense"`` (fixed parameters), ``"dense-learnable"`` (learnable
            compatibility and L×L kernel-weight matrices, as CRF-as-RNN),
            ``"dense-bandwidths"`` (also learnable kernel bandwidths); see :data:`CRF_KINDS`.
        num_classes: number of labels L.
        crf_kwargs: keyword arguments for ``DenseCRF`` overriding ``defaults`` and ``kind``'s
            settings (e.g. ``{"theta_alpha": 50.0, "eval_iters": 10}``).
        defaults: the calling model's default CRF parameters (bandwidths θα, θγ in pixels, θβ
            in 0-255 colour units, kernel weights, iterations); ``DenseCRF``'s own defaults
            (θα=80, θβ=13, θγ=3, w=10 and 3, pydensecrf's example values) where not given.

    Returns:
        The CRF module, ``forward(logits (B, L, H, W), image (B, 3, H, W)) -> (B, L, H, W)``.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in CRF_KINDS:
        raise ValueError(
            f"crf must be None, an nn.Module or one of {sorted(CRF_KINDS)}; got {kind!r}"
        )
    params: dict[str, Any] = dict(defaults or {})
    params.update(CRF_KINDS[kind])
    params.update(crf_kwargs or {})
    return DenseCRF(int(num_classes), **params)


class CRFSegmenter(nn.Module):
    """A segmentation network followed by a CRF layer: ``crf(model(image), image)``.

    The network's logits are the CRF's unary scores (U = -logits, as DeepLab's CRF takes the
    negative log of the network's softmax; log-softmax only shifts each pixel's energies by a
    constant, which mean-field ignores).

    Args:
        model: any registered network: ``forward(image (B, 3, H, W) in 0-255) -> (B, L, H, W)``.
        crf: a CRF module ``forward(logits (B, L, H, W), image (B, 3, H, W)) -> (B, L, H, W)``,
            or ``None`` for the network alone.

    Shape:
        image:  (B, 3, H, W)  float RGB in 0-255
        return: (B, L, H, W)  logits at the input resolution (refined by the CRF when used)

    Example:
        >>> import deepcrf.models as models
        >>> net = models.create("small", num_classes=4, crf="dense")  # doctest: +SKIP
        >>> logits = net(torch.rand(1, 3, 64, 64) * 255)               # doctest: +SKIP
        >>> unary_only = net(torch.rand(1, 3, 64, 64) * 255, use_crf=False)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, crf: nn.Module | None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if crf is not None and not isinstance(crf, nn.Module):
            raise TypeError(f"crf must be an nn.Module or None; got {type(crf).__name__}")
        model_labels = getattr(model, "num_classes", None)
        crf_labels = getattr(crf, "num_classes", None)
        if model_labels is not None and crf_labels is not None and model_labels != crf_labels:
            raise ValueError(
                f"the crf has num_classes={crf_labels} but the model has {model_labels}"
            )
        self.model = model
        self.crf = crf

    @property
    def num_classes(self) -> int | None:
        """Number of labels L of the network (``None`` if it does not say)."""
        return getattr(self.model, "num_classes", None)

    def forward(self, image: torch.Tensor, use_crf: bool = True) -> torch.Tensor:
        """Network logits, refined by the CRF when ``use_crf`` and there is one.

        Args:
            image: (B, 3, H, W) float RGB in 0-255.
            use_crf: ``False`` returns the network's logits alone (stage 1 "unary" training,
                or evaluating the CNN without the CRF).

        Returns:
            (B, L, H, W) logits.
        """
        logits = self.model(image)
        if use_crf and self.crf is not None:
            return self.crf(logits, image)
        return logits


def with_crf(
    model: nn.Module,
    crf: str | nn.Module | None,
    crf_kwargs: Mapping[str, Any] | None = None,
    *,
    num_classes: int,
    defaults: Mapping[str, Any] | None = None,
) -> nn.Module:
    """What every registry factory returns: ``model`` alone or wrapped with a CRF.

    Args:
        model: the network.
        crf: ``None`` (return ``model`` unchanged), a kind accepted by :func:`build_crf`, or a
            ready CRF module (e.g. a ``GaussianCRF``).
        crf_kwargs: keyword arguments for :func:`build_crf`; an error with ``crf=None`` or a
            module, where they would be silently ignored.
        num_classes: number of labels L.
        defaults: the model's default dense-CRF parameters.

    Returns:
        ``model`` or ``CRFSegmenter(model, crf)``.
    """
    if crf is None or isinstance(crf, nn.Module):
        if crf_kwargs:
            raise ValueError(
                "crf_kwargs is only used with crf='dense'/'dense-learnable'/'dense-bandwidths'; "
                f"got crf={type(crf).__name__ if crf is not None else None} with "
                f"crf_kwargs={dict(crf_kwargs)}"
            )
        return model if crf is None else CRFSegmenter(model, crf)
    if not isinstance(crf, str):
        raise TypeError(f"crf must be None, a string or an nn.Module; got {type(crf).__name__}")
    return CRFSegmenter(model, build_crf(crf, num_classes, crf_kwargs, defaults=defaults))
