"""CNN + Deep Gaussian CRF: an embedding branch and a G-CRF on top of any stride-8 backbone.

Chandra & Kokkinos (2016): the network gives unary scores ``u`` and, from a parallel branch,
pixel embeddings ``e``; the G-CRF returns ``x = (λI + L_W(e))⁻¹ u`` at the feature resolution
(:mod:`deepcrf.crf.gaussian`), which is upsampled bilinearly to the image.  Everything trains
end to end with cross-entropy on the output: the CRF's backward is one more linear solve.

Registered models:

- ``small_gcrf``: :class:`~deepcrf.models.backbones.SmallBackbone` with the LargeFOV-like head
  of ``small``, for CPU training on small images.
- ``deeplab_largefov_gcrf``: VGG-16 atrous with DeepLab-LargeFOV's fc6 (3×3, dilation 12) /
  fc7 / fc8 head (``pretrained=`` loads torchvision VGG-16 weights, decimated as in DeepLab).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from deepcrf._checks import check_int
from deepcrf.crf.gaussian import GaussianCRF, MultiScaleGaussianCRF

from .backbones import build_backbone, check_image, load_vgg16_imagenet, upsample_logits
from .registry import register

__all__ = ["GaussianCRFSegmenter"]


class GaussianCRFSegmenter(nn.Module):
    """Backbone → unary head + embedding branch → Gaussian CRF at stride 8 → upsampling.

    Implements the Deep G-CRF network of Chandra & Kokkinos (2016): ``x = (λI + L_W(e))⁻¹ u``
    on the backbone's stride-8 grid, ``u`` from ``head``/``classifier`` and ``e`` from a
    two-layer embedding branch (3×3 conv, ReLU, 1×1 conv to ``embedding_dim`` channels).
    With ``num_scales`` 2 or 3 the features are also average-pooled by 2 (and 4), the same
    branches give unaries and embeddings there, and a :class:`MultiScaleGaussianCRF` solves all
    resolutions jointly; the finest scale's scores are returned.

    The G-CRF lives in ``self.crf`` (parameters ``crf.*``: ``λ``, ``β``, ``γ`` as logs); the
    embedding branch is ``self.embedding`` and trains with the network's learning rate.

    Args:
        backbone: ``normalize(image)``, ``forward_features(x) -> (B, C, h, w)``,
            ``out_channels``, ``stride``.
        head: layers between the features and the classifier (``nn.Identity()`` for none).
        head_channels: channels the head outputs.
        num_classes: number of labels L.
        embedding_dim: D, channels of the pixel embeddings.
        embedding_hidden: channels of the embedding branch's hidden layer.
        num_scales: 1 (:class:`GaussianCRF`), 2 or 3 (:class:`MultiScaleGaussianCRF`).
        resolution: ``"features"`` solves on the backbone's stride-8 grid (the paper);
            ``"image"`` upsamples the unary first and solves on the image grid, the embeddings
            being the learned ones (upsampled; their last layer starts near zero) plus the
            colour divided by ``colour_scale`` (one scale only).
        colour_scale: 0–255 colour units per embedding unit with ``resolution="image"``: two
            pixels ``colour_scale`` apart in colour get affinity β·e⁻¹.
        **crf_kwargs: passed to the CRF (``connectivity``, ``radius``, ``lam``,
            ``pairwise_weight``, ``coupling_weight``, ``learnable``, ``tol``, ``max_iter``).

    Shape:
        image:  (B, 3, H, W)  float RGB in 0-255
        return: (B, L, H, W)  logits at the input resolution
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        head_channels: int,
        num_classes: int,
        *,
        embedding_dim: int = 8,
        embedding_hidden: int = 64,
        num_scales: int = 1,
        resolution: str = "features",
        colour_scale: float = 20.0,
        **crf_kwargs: Any,
    ) -> None:
        super().__init__()
        if resolution not in ("features", "image"):
            raise ValueError(f"resolution must be 'features' or 'image'; got {resolution!r}")
        if resolution == "image" and num_scales != 1:
            raise ValueError("resolution='image' solves one grid: num_scales must be 1")
        if not (colour_scale > 0):
            raise ValueError(f"colour_scale must be > 0 (0-255 colour units); got {colour_scale}")
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        if num_scales not in (1, 2, 3):
            raise ValueError(f"num_scales must be 1, 2 or 3; got {num_scales!r}")
        if int(embedding_dim) < 1 or int(embedding_hidden) < 1:
            raise ValueError(
                f"embedding_dim and embedding_hidden must be >= 1; got {embedding_dim}, "
                f"{embedding_hidden}"
            )
        self.num_classes = int(num_classes)
        self.num_scales = int(num_scales)
        self.backbone = backbone
        self.stride = int(backbone.stride)
        self.head = head
        self.classifier = nn.Conv2d(head_channels, self.num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.embedding = nn.Sequential(
            nn.Conv2d(backbone.out_channels, embedding_hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(embedding_hidden, embedding_dim, 1),
        )
        self.resolution = resolution
        self.colour_scale = float(colour_scale)
        crf_dim = int(embedding_dim)
        if resolution == "image":
            # The learned part starts near zero: the first affinities come from colour
            # (meaningful at once), and the fresh branch cannot disturb the trained unary
            # through random affinities before it has learned anything. Not exactly zero:
            # the affinity's gradient is proportional to the embeddings' differences, so
            # all-equal embeddings would never move.
            nn.init.normal_(self.embedding[2].weight, std=1e-2)
            nn.init.zeros_(self.embedding[2].bias)
            crf_dim += 3
        if self.num_scales == 1:
            self.crf: nn.Module = GaussianCRF(self.num_classes, crf_dim, **crf_kwargs)
        else:
            self.crf = MultiScaleGaussianCRF(
                self.num_classes, embedding_dim, num_scales=self.num_scales, **crf_kwargs
            )

    def forward(self, image: torch.Tensor, use_crf: bool = True) -> torch.Tensor:
        """Logits at the input resolution.

        Args:
            image: (B, 3, H, W) float RGB in 0-255.
            use_crf: ``False`` returns the unary scores alone, upsampled (stage 1 training,
                or evaluating the CNN without the CRF).

        Returns:
            (B, L, H, W) logits.
        """
        check_image(image)
        features = self.backbone.forward_features(self.backbone.normalize(image))
        unary = self.classifier(self.head(features))
        size = (image.shape[2], image.shape[3])
        if use_crf and self.resolution == "image":
            # Solve on the image grid: the unary upsampled, the embeddings the learned ones
            # upsampled plus the colour, so that the affinities follow the image's edges.
            up = upsample_logits(unary, size, self.stride)
            emb = upsample_logits(self.embedding(features), size, self.stride)
            emb = torch.cat([emb, image / self.colour_scale], dim=1)
            return self.crf(up, emb)
        if use_crf:
            if self.num_scales == 1:
                scores = self.crf(unary, self.embedding(features))
            else:
                unaries, embeddings = [unary], [self.embedding(features)]
                pooled = features
                for _ in range(self.num_scales - 1):
                    pooled = F.avg_pool2d(pooled, 2, ceil_mode=True)
                    unaries.append(self.classifier(self.head(pooled)))
                    embeddings.append(self.embedding(pooled))
                scores = self.crf(unaries, embeddings)[0]
        else:
            scores = unary
        return upsample_logits(scores, size, self.stride)


def _small_head(in_ch: int, hidden: int, dilation: int, dropout: float) -> nn.Sequential:
    # The LargeFOV-like head of the 'small' model: dilated 3×3, then 1×1, dropout after each.
    return nn.Sequential(
        nn.Conv2d(in_ch, hidden, 3, padding=dilation, dilation=dilation),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


@register("small_gcrf")
def _create_small_gcrf(
    num_classes: int,
    *,
    width: int = 32,
    norm: str = "batch",
    hidden: int = 128,
    head_dilation: int = 3,
    dropout: float = 0.1,
    embedding_dim: int = 8,
    embedding_hidden: int = 64,
    num_scales: int = 1,
    connectivity: int | str = 8,
    radius: int | None = None,
    lam: float = 1.0,
    pairwise_weight: float | None = None,
    learnable: Sequence[str] = ("pairwise_weight",),
    tol: float = 1e-4,
    max_iter: int | None = None,
    resolution: str | None = None,
    colour_scale: float = 20.0,
    pretrained: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """``small`` backbone + head with a Deep Gaussian CRF (see :class:`GaussianCRFSegmenter`).

    By default the G-CRF is solved on the image grid (``resolution="image"``, radius 2,
    β = 16): the stride-8 grid of the small images this model is for has ~12×12 nodes, and a
    quadratic smoother there cannot move the boundaries, which is where the CNN errs; on the
    image grid with colour in the embeddings the affinities follow the image's edges
    (docs/gaussian_crf.md, "Why the G-CRF did not help, and what does": after 30 joint steps
    from the demo's CNN, 54.9 → 64.2 mIoU on its validation images). ``resolution="features"``
    is the paper's stride-8 solve (radius 1, β = 0.1 by default there: stronger initial
    smoothing on an ~8×8 grid washes out small objects).
    """
    if resolution is None:  # the image grid for one scale; the multi-scale model is stride 8
        resolution = "image" if num_scales == 1 else "features"
    if radius is None:
        radius = 2 if resolution == "image" else 1
    if pairwise_weight is None:
        pairwise_weight = 16.0 if resolution == "image" else 0.1
    if pretrained is not None:
        raise ValueError("model 'small_gcrf' has no ImageNet weights; pretrained must be None")
    backbone = build_backbone("small", width=width, norm=norm)
    head = _small_head(backbone.out_channels, hidden, int(head_dilation), float(dropout))
    crf_kwargs: dict[str, Any] = {
        "connectivity": connectivity,
        "radius": radius,
        "lam": lam,
        "pairwise_weight": pairwise_weight,
        "tol": tol,
        "max_iter": max_iter,
    }
    if num_scales > 1:
        crf_kwargs["learnable"] = (*learnable, "coupling_weight")
    else:
        crf_kwargs["learnable"] = tuple(learnable)
    return GaussianCRFSegmenter(
        backbone,
        head,
        hidden,
        num_classes,
        embedding_dim=embedding_dim,
        embedding_hidden=embedding_hidden,
        num_scales=num_scales,
        resolution=resolution,
        colour_scale=colour_scale,
        **crf_kwargs,
    )


@register("deeplab_largefov_gcrf")
def _create_deeplab_largefov_gcrf(
    num_classes: int,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    fc_channels: int = 1024,
    fc_dilation: int = 12,
    dropout: float = 0.5,
    embedding_dim: int = 64,
    embedding_hidden: int = 256,
    num_scales: int = 1,
    connectivity: int | str = 8,
    radius: int = 1,
    lam: float = 1.0,
    pairwise_weight: float = 1.0,
    learnable: Sequence[str] = ("pairwise_weight",),
    tol: float = 1e-4,
    max_iter: int | None = None,
) -> nn.Module:
    """DeepLab-LargeFOV (VGG-16 atrous, fc6 3×3 dilation 12, fc7, fc8) with a Deep G-CRF.

    ``pretrained`` is a local torchvision VGG-16 file; its fc6/fc7 are decimated into the head
    (:func:`~deepcrf.models.backbones.load_vgg16_imagenet`).  Nothing is downloaded.
    """
    backbone = build_backbone("vgg16")
    d = int(fc_dilation)
    head = nn.Sequential()
    head.add_module("fc6", nn.Conv2d(backbone.out_channels, fc_channels, 3, padding=d, dilation=d))
    head.add_module("relu6", nn.ReLU(inplace=True))
    head.add_module("drop6", nn.Dropout2d(dropout))
    head.add_module("fc7", nn.Conv2d(fc_channels, fc_channels, 1))
    head.add_module("relu7", nn.ReLU(inplace=True))
    head.add_module("drop7", nn.Dropout2d(dropout))
    learn_all = (*learnable, "coupling_weight") if num_scales > 1 else tuple(learnable)
    model = GaussianCRFSegmenter(
        backbone,
        head,
        fc_channels,
        num_classes,
        embedding_dim=embedding_dim,
        embedding_hidden=embedding_hidden,
        num_scales=num_scales,
        connectivity=connectivity,
        radius=radius,
        lam=lam,
        pairwise_weight=pairwise_weight,
        learnable=learn_all,
        tol=tol,
        max_iter=max_iter,
    )
    if pretrained is not None:
        load_vgg16_imagenet(model, pretrained)
    return model
