"""Lin et al.'s multi-scale FeatMap-Net and the contextual CNN+CRF model built on it.

Lin, Shen, van den Hengel & Reid, "Efficient piecewise training of deep structured models for
semantic segmentation" (CVPR 2016), Sec. 5:

* **FeatMap-Net** (:class:`FeatMapNet`): the image at several scales (1.2, 0.8, 0.4) goes
  through one backbone with shared weights; each scale has its own conv block; the per-scale maps
  are resampled onto one node grid and concatenated ("patch-background" context across scales);
  *sliding pyramid pooling* (stride-1 max pooling with 5×5 and 9×9 windows) is concatenated to
  the map.
* **Contextual model** (:class:`ContextualSegNet`): the FeatMap-Net output is the node features
  of :class:`deepcrf.crf.contextual.ContextualCRF` (unary and range-box pairwise nets); trained
  with the piecewise likelihood, predicting with 3 mean-field iterations on the node grid, then
  bilinear upsampling and, optionally, the dense CRF for boundaries.

Geometry: node ``(i, j)`` sits on image pixel ``(node_stride·i, node_stride·j)`` and the grid has
``ceil(H/node_stride) × ceil(W/node_stride)`` nodes, the convention of
:mod:`deepcrf.models.backbones` (feature ``i`` of a stride-``s`` map on pixel ``s·i``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepcrf._checks import check_int

from .._checks import check_tensor
from ..crf.contextual import RELATIONS, ContextualCRF, downsample_labels
from .backbones import build_backbone, check_image, upsample_logits
from .registry import register
from .segmenter import build_crf

__all__ = ["ContextualSegNet", "FeatMapNet", "resample_to_grid", "sliding_pyramid_pooling"]


def _interp_matrix(
    out_size: int, in_size: int, pos: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    # Linear interpolation at fractional input coordinates ``pos``, clamped to the map.
    pos = pos.clamp(0.0, in_size - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = pos - lo.to(pos.dtype)
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat.to(dtype=like.dtype, device=like.device)


def resample_to_grid(
    features: torch.Tensor,
    size: tuple[int, int],
    *,
    scale: float | tuple[float, float],
    feature_stride: float,
    node_stride: float,
) -> torch.Tensor:
    """Bilinearly resample features of a rescaled image onto the node grid of the original.

    Feature ``i`` of the image resized by ``scale`` sits on resized pixel ``feature_stride·i``,
    i.e. on original pixel ``(feature_stride·i + ½)/scale − ½`` (``align_corners=False``
    resizing); node ``j`` sits on original pixel ``node_stride·j``.  So node ``j`` reads the
    features at coordinate ``((node_stride·j + ½)·scale − ½) / feature_stride``, clamped to the
    map.  Two small matrix products: deterministic on every device.

    Args:
        features: features of the resized image.
        size: ``(h, w)`` of the node grid.
        scale: the image's resize factor, or ``(scale_y, scale_x)``.
        feature_stride: pixels (of the resized image) between features.
        node_stride: pixels (of the original image) between nodes.

    Shape:
        features: (B, C, h_s, w_s)
        return:   (B, C, h, w)
    """
    check_tensor(features, "features", ndim=4, layout="(B, C, h_s, w_s)", floating=True)
    h, w = int(size[0]), int(size[1])
    scale_y, scale_x = (scale, scale) if isinstance(scale, (int, float)) else scale

    def matrix(n_out: int, n_in: int, factor: float) -> torch.Tensor:
        j = torch.arange(n_out, dtype=torch.float64)
        pos = ((node_stride * j + 0.5) * factor - 0.5) / feature_stride
        return _interp_matrix(n_out, n_in, pos, features)

    rows = matrix(h, features.shape[2], float(scale_y))
    cols = matrix(w, features.shape[3], float(scale_x))
    return torch.matmul(torch.matmul(rows, features), cols.t())


def sliding_pyramid_pooling(features: torch.Tensor, pool_sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate a map with its stride-1 max poolings (Lin et al. 2016, Sec. 5.2).

    Each window size ``k`` (odd) max-pools with stride 1 and padding ``k // 2`` (padding never
    wins the max), so the map keeps its size; the output is ``[x, pool_k1(x), pool_k2(x), ...]``.

    Args:
        features: the map.
        pool_sizes: odd window sizes in nodes (5 and 9 in the paper).

    Shape:
        features: (B, C, h, w)
        return:   (B, C·(1 + len(pool_sizes)), h, w)
    """
    outs = [features]
    for k in pool_sizes:
        outs.append(F.max_pool2d(features, int(k), stride=1, padding=int(k) // 2))
    return torch.cat(outs, dim=1)


class FeatMapNet(nn.Module):
    """Multi-scale FeatMap-Net with shared backbone weights and sliding pyramid pooling.

    ``image`` → for each scale s: resize by s (bilinear) → ``backbone.forward_features`` (shared
    weights) → the scale's own conv block (two 3×3 conv + ReLU, ``branch_channels``) → resample
    onto the node grid (:func:`resample_to_grid`) → concatenate the scales →
    :func:`sliding_pyramid_pooling`.  (Lin et al. 2016, Sec. 5 and Fig. 4.)

    Parameter names: ``backbone.*`` (the shared network; ``freeze_backbone`` in the engine) and
    ``head.*`` (the per-scale blocks, new layers: the engine's ``head_lr``).

    Args:
        backbone: any backbone of :mod:`deepcrf.models.backbones` (``normalize``,
            ``forward_features``, ``out_channels``, ``stride``).
        scales: image scales (1.2, 0.8, 0.4 in the paper).
        branch_channels: output channels of each scale's conv block.
        pool_sizes: odd sliding-pooling windows in nodes (5, 9 in the paper; empty: none).
        node_stride: pixels between nodes of the output grid (default: the backbone's stride).

    Shape:
        image:  (B, 3, H, W)  float RGB in 0-255
        return: (B, out_channels, ceil(H/node_stride), ceil(W/node_stride))
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        scales: Sequence[float] = (1.2, 0.8, 0.4),
        branch_channels: int = 512,
        pool_sizes: Sequence[int] = (5, 9),
        node_stride: int | None = None,
    ) -> None:
        super().__init__()
        for attr in ("normalize", "forward_features", "out_channels", "stride"):
            if not hasattr(backbone, attr):
                raise TypeError(
                    f"backbone must have {attr!r} (see deepcrf.models.backbones); "
                    f"got {type(backbone).__name__}"
                )
        scales = tuple(float(s) for s in scales)
        if not scales or any(not (s > 0) or math.isinf(s) for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers; got {scales}")
        pools = tuple(int(k) for k in pool_sizes)
        if any(k < 1 or k % 2 == 0 for k in pools):
            raise ValueError(f"pool_sizes must be odd positive window sizes; got {pools}")
        branch_channels = check_int(branch_channels, "branch_channels", minimum=1)
        self.backbone = backbone
        self.scales = scales
        self.pool_sizes = pools
        self.feature_stride = int(backbone.stride)
        self.node_stride = int(node_stride) if node_stride is not None else self.feature_stride
        if self.node_stride < 1:
            raise ValueError(f"node_stride must be >= 1; got {node_stride}")
        c_in, c = int(backbone.out_channels), int(branch_channels)
        self.head = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1),
                nn.ReLU(inplace=True),
            )
            for _ in scales
        )
        for module in self.head.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self.out_channels = len(scales) * c * (1 + len(pools))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Node grid ``(ceil(H/node_stride), ceil(W/node_stride))`` of an ``H × W`` image."""
        return -(-int(height) // self.node_stride), -(-int(width) // self.node_stride)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Node features of ``image`` (see the class docstring)."""
        check_image(image)
        height, width = image.shape[2], image.shape[3]
        grid = self.grid_size(height, width)
        x = self.backbone.normalize(image)
        maps = []
        for scale, block in zip(self.scales, self.head, strict=True):
            size = (max(1, round(scale * height)), max(1, round(scale * width)))
            xs = (
                x
                if size == (height, width)
                else F.interpolate(
                    x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0
                )
            )
            feats = block(self.backbone.forward_features(xs))
            # The exact scale of the resized image (rounding of its size), not the nominal one.
            maps.append(
                resample_to_grid(
                    feats,
                    grid,
                    scale=(size[0] / height, size[1] / width),
                    feature_stride=self.feature_stride,
                    node_stride=self.node_stride,
                )
            )
        return sliding_pyramid_pooling(torch.cat(maps, dim=1), self.pool_sizes)


class ContextualSegNet(FeatMapNet):
    """FeatMap-Net + contextual CRF (Lin et al. 2016): the library's model contract.

    ``forward(image, use_crf=True)``: FeatMap-Net node features → mean-field on the contextual
    CRF (``self.crf``, 3 iterations) → log-marginals upsampled bilinearly to the image
    (:func:`deepcrf.models.backbones.upsample_logits`, node ``i`` on pixel ``node_stride·i``) →
    the optional dense CRF (``self.dense_crf``) for boundaries.  ``use_crf=False`` gives the
    unary net's prediction alone (log-softmax, upsampled; no pairwise term, no dense CRF).

    ``piecewise_loss(image, labels)``: the pixel labels go to the node grid by majority vote over
    the pixels nearest to each node (``label_mode="majority"``, or ``"nearest"``: the pixel under
    the node; see :func:`deepcrf.crf.contextual.downsample_labels`), then the piecewise negative
    log-likelihood of :func:`deepcrf.crf.contextual.piecewise_loss` (each potential averaged over
    its valid terms).

    Args:
        num_classes: number of labels K.
        backbone: a backbone (see :class:`FeatMapNet`).
        scales, branch_channels, pool_sizes, node_stride: see :class:`FeatMapNet`.
        hidden_channels: hidden width of the unary and pairwise nets (512 in the paper).
        relations: range-box relations (``"surrounding"``, ``"above_below"``).
        box_fraction: range-box size as a fraction of the grid's shorter side (0.4).
        iters: mean-field iterations (3).
        pairwise_scale: multiplier on pairwise messages at inference (1 = as trained).
        pairwise_mode: ``"full"`` tables (the paper) or their ``"interaction"`` part at
            inference (see :func:`deepcrf.crf.contextual.mean_field`).
        residual_pairwise: train the pairwise tables on the unaries' residual (not in the
            paper; :func:`deepcrf.crf.contextual.piecewise_loss`).
        label_mode: ``"majority"`` or ``"nearest"`` node labels for the piecewise loss.
        dense_crf: ``None`` or a dense-CRF module ``forward(logits, image) -> logits`` applied
            after upsampling when ``use_crf`` (e.g. from
            :func:`deepcrf.models.segmenter.build_crf`).

    Shape:
        image:  (B, 3, H, W)  float RGB in 0-255
        labels: (B, H, W)     int64, 255 = ignore
        return: (B, K, H, W)  logits (log-probabilities)

    Example:
        >>> import deepcrf.models as models
        >>> net = models.create("small_contextual", num_classes=4)         # doctest: +SKIP
        >>> loss = net.piecewise_loss(image, labels)                        # doctest: +SKIP
        >>> logits = net(image)                     # mean-field on the CRF  # doctest: +SKIP

    After piecewise training, ``TrainSettings(stage="joint", freeze=UNARY_PARTS)`` trains the
    pairwise nets alone with mean-field inference in the loss (not in the paper): the
    piecewise tables re-count the node evidence and over-smooth at inference, and this fits
    them to it while the unary prediction stays exactly what it was (docs/contextual_crf.md).
    """

    #: Parameter-name prefixes of everything the unary-only prediction depends on: the trunk,
    #: FeatMap-Net's per-scale blocks and the CRF's unary net (not its pairwise nets).
    UNARY_PARTS: tuple[str, ...] = ("backbone.", "head.", "crf.unary_net.")

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        *,
        scales: Sequence[float] = (1.2, 0.8, 0.4),
        branch_channels: int = 512,
        pool_sizes: Sequence[int] = (5, 9),
        node_stride: int | None = None,
        hidden_channels: int = 512,
        relations: Sequence[str] = RELATIONS,
        box_fraction: float = 0.4,
        iters: int = 3,
        pairwise_scale: float = 1.0,
        pairwise_mode: str = "full",
        residual_pairwise: bool = False,
        label_mode: str = "majority",
        dense_crf: nn.Module | None = None,
    ) -> None:
        super().__init__(
            backbone,
            scales=scales,
            branch_channels=branch_channels,
            pool_sizes=pool_sizes,
            node_stride=node_stride,
        )
        if label_mode not in ("majority", "nearest"):
            raise ValueError(f"label_mode must be 'majority' or 'nearest'; got {label_mode!r}")
        if dense_crf is not None and not isinstance(dense_crf, nn.Module):
            raise TypeError(f"dense_crf must be an nn.Module or None; got {type(dense_crf)}")
        self.num_classes = int(num_classes)
        self.stride = self.node_stride
        self.label_mode = label_mode
        self.crf = ContextualCRF(
            self.out_channels,
            self.num_classes,
            relations=relations,
            hidden_channels=hidden_channels,
            box_fraction=box_fraction,
            iters=iters,
            pairwise_scale=pairwise_scale,
            pairwise_mode=pairwise_mode,
            residual_pairwise=residual_pairwise,
        )
        self.dense_crf = dense_crf

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """FeatMap-Net node features ``(B, C, h, w)`` of ``image``."""
        return FeatMapNet.forward(self, image)

    def forward(self, image: torch.Tensor, use_crf: bool = True) -> torch.Tensor:
        """Logits at the image's resolution (see the class docstring)."""
        feats = self.features(image)
        log_q = self.crf(feats, use_pairwise=use_crf)
        logits = upsample_logits(log_q, (image.shape[2], image.shape[3]), self.node_stride)
        if use_crf and self.dense_crf is not None:
            logits = self.dense_crf(logits, image)
        return logits

    def piecewise_loss(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Piecewise training loss of a batch (see the class docstring)."""
        check_image(image)
        check_tensor(labels, "labels", ndim=3, layout="(B, H, W)", dtypes=(torch.int64,))
        if labels.shape[0] != image.shape[0] or labels.shape[1:] != image.shape[2:]:
            raise ValueError(
                f"labels must be (B, H, W) matching image {tuple(image.shape)}; "
                f"got {tuple(labels.shape)}"
            )
        feats = self.features(image)
        node_labels = downsample_labels(
            labels.to(feats.device),
            tuple(feats.shape[2:]),
            num_classes=self.num_classes,
            stride=self.node_stride,
            mode=self.label_mode,
        )
        return self.crf.piecewise_loss(feats, node_labels)


def _dense_crf(
    crf: str | nn.Module | None, crf_kwargs: Mapping[str, Any] | None, num_classes: int
) -> nn.Module | None:
    if crf is None or isinstance(crf, nn.Module):
        if crf_kwargs:
            raise ValueError(
                "crf_kwargs is only used with crf='dense'/'dense-learnable'/"
                f"'dense-bandwidths'; got crf={crf!r}"
            )
        return crf
    return build_crf(crf, num_classes, crf_kwargs)


@register("small_contextual")
def _create_small_contextual(
    num_classes: int,
    *,
    width: int = 32,
    norm: str = "batch",
    scales: Sequence[float] = (1.2, 0.8, 0.4),
    branch_channels: int = 64,
    hidden_channels: int = 128,
    crf: str | nn.Module | None = None,
    crf_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """FeatMap-Net on :class:`~deepcrf.models.backbones.SmallBackbone` + contextual CRF.

    ``crf`` names an optional dense CRF applied after upsampling (``"dense"``, ...), with
    ``crf_kwargs`` its parameters; the contextual CRF is always there (``model.crf``).
    """
    if pretrained is not None:
        raise ValueError(
            "model 'small_contextual' has no ImageNet weights; pretrained must be None"
        )
    backbone = build_backbone("small", width=width, norm=norm)
    return ContextualSegNet(
        num_classes,
        backbone,
        scales=scales,
        branch_channels=branch_channels,
        hidden_channels=hidden_channels,
        dense_crf=_dense_crf(crf, crf_kwargs, num_classes),
        **kwargs,
    )


@register("vgg16_contextual")
def _create_vgg16_contextual(
    num_classes: int,
    *,
    scales: Sequence[float] = (1.2, 0.8, 0.4),
    branch_channels: int = 512,
    hidden_channels: int = 512,
    node_stride: int = 16,
    crf: str | nn.Module | None = None,
    crf_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """FeatMap-Net on atrous VGG-16 + contextual CRF, nodes every 16 pixels (as Lin et al.).

    ``pretrained``: torchvision VGG-16 ImageNet weights for the shared backbone (nothing is
    downloaded).  ``crf``/``crf_kwargs``: the optional dense CRF after upsampling.
    """
    backbone = build_backbone("vgg16", pretrained=pretrained)
    return ContextualSegNet(
        num_classes,
        backbone,
        scales=scales,
        branch_channels=branch_channels,
        hidden_channels=hidden_channels,
        node_stride=node_stride,
        dense_crf=_dense_crf(crf, crf_kwargs, num_classes),
        **kwargs,
    )
