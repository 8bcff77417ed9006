"""DeepLab v1 (Chen, Papandreou, Kokkinos, Murphy & Yuille, ICLR 2015): VGG-16 atrous heads.

The network part of "Semantic Image Segmentation with Deep Convolutional Nets and Fully
Connected CRFs".  VGG-16 is made fully convolutional with output stride 8
(:class:`~deepcrf.models.backbones.VGG16Atrous`), its fully connected layers become
convolutions, and the stride-8 scores are bilinearly upsampled to the image.  Registered:

* ``deeplab_largefov`` — DeepLab-LargeFOV: fc6 3×3 with dilation ('input stride') 12 and
  1024 channels, fc7 1×1 with 1024 channels;
* ``deeplab_msc_largefov`` — DeepLab-MSc-LargeFOV: the same plus the multi-scale branches;
* ``deeplab_v1`` — DeepLab-7×7: fc6 7×7 with dilation 4 and 4096 channels (ImageNet's fc6
  without decimation), fc7 4096.

Every factory accepts ``pretrained=PATH`` (torchvision VGG-16 weights, decimated for LargeFOV,
see :func:`~deepcrf.models.backbones.load_vgg16_imagenet`) and ``crf=`` (see
:func:`~deepcrf.models.segmenter.with_crf`); the dense-CRF defaults are the values the DeepLab
release cross-validated for each variant.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deepcrf._checks import check_int

from .backbones import VGG16Atrous, load_vgg16_imagenet, upsample_logits
from .registry import register
from .segmenter import with_crf

__all__ = ["DEEPLAB_CRF_DEFAULTS", "DeepLabV1", "MultiScaleBranch", "load_vgg16_imagenet"]

# Dense-CRF parameters cross-validated by the DeepLab v1 release on VOC 2012 val (bi_w, bi_xy_std,
# bi_rgb_std, pos_w, pos_xy_std in its scripts); 10 mean-field iterations at test time as in the
# paper (``iters``, the training-mode count, stays DenseCRF's default).
DEEPLAB_CRF_DEFAULTS: dict[str, dict[str, float]] = {
    "deeplab_v1": {"w_bilateral": 5.0, "theta_alpha": 50.0, "theta_beta": 10.0,
                   "w_spatial": 3.0, "theta_gamma": 3.0, "eval_iters": 10},
    "deeplab_largefov": {"w_bilateral": 4.0, "theta_alpha": 121.0, "theta_beta": 5.0,
                         "w_spatial": 3.0, "theta_gamma": 3.0, "eval_iters": 10},
    "deeplab_msc_largefov": {"w_bilateral": 4.0, "theta_alpha": 83.0, "theta_beta": 5.0,
                             "w_spatial": 3.0, "theta_gamma": 3.0, "eval_iters": 10},
}  # fmt: skip


class MultiScaleBranch(nn.Module):
    """One DeepLab-MSc branch: a two-layer MLP from an early map to class scores at stride 8.

    Chen et al. (2015), Sec. 4.3 ("multi-scale prediction"): a 3×3 convolution with 128 filters
    and a 1×1 convolution with 128 filters (ReLU and dropout after each) on the input image or a
    pooling output; its 128 features are concatenated to the main network's last features before
    the classifier, which is the same as adding this branch's own linear scores to the main
    scores.  The 3×3 convolution's stride brings the map to stride 8 (8, 4, 2, 1, 1 for the
    image and pool1 ... pool4); with padding 1, output ``i`` stays centred on image pixel ``8i``.

    Args:
        in_channels: channels of the input map.
        stride: stride of the 3×3 convolution (8 / the input map's stride).
        num_classes: number of labels L.
        channels: hidden channels (128 in the paper).
        dropout: dropout probability after each hidden layer.

    Shape:
        x:      (B, in_channels, h·stride', w·stride') a map at stride 8/stride
        return: (B, L, ceil(H/8), ceil(W/8))
    """

    def __init__(
        self,
        in_channels: int,
        stride: int,
        num_classes: int,
        channels: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.score = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout(dropout)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        # Small initial scores: the branches start as a perturbation of the main network's.
        nn.init.normal_(self.score.weight, std=0.001)
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, L, ceil(H/8), ceil(W/8)) of this branch."""
        x = self.dropout(torch.relu(self.conv1(x)))
        x = self.dropout(torch.relu(self.conv2(x)))
        return self.score(x)


# (name of the branch's input, its channels, stride of its 3×3 conv to reach stride 8)
_MSC_INPUTS = (("image", 3, 8), ("pool1", 64, 4), ("pool2", 128, 2), ("pool3", 256, 1),
               ("pool4", 512, 1))  # fmt: skip


class DeepLabV1(nn.Module):
    """DeepLab v1: VGG-16 atrous + convolutional fc6/fc7/fc8, scores upsampled to the image.

    Chen et al. (2015), Sec. 3: score map s = fc8(fc7(fc6(pool5))) at stride 8 (ReLU and
    dropout after fc6 and fc7), plus, with ``msc``, the multi-scale branches' scores
    s += Σ_b MLP_b(x_b) for x_b ∈ {image, pool1, pool2, pool3, pool4}; logits = bilinear
    upsampling of s by 8.  fc6 has ``fc6_kernel``×``fc6_kernel`` taps with dilation
    ``fc6_dilation`` (3×3, 12 for LargeFOV; 7×7, 4 for DeepLab-7×7).

    Args:
        num_classes: number of labels L (21 for VOC).
        fc6_kernel: fc6 kernel size.
        fc6_dilation: fc6 dilation ('input stride' in the paper), in stride-8 pixels.
        fc_channels: channels of fc6 and fc7 (1024 LargeFOV, 4096 DeepLab-7×7).
        dropout: dropout probability after fc6 and fc7.
        msc: add the multi-scale branches (DeepLab-MSc).
        msc_channels: hidden channels of each branch (128).
        msc_dropout: dropout probability in the branches.
        conv5_dilation: dilation of the conv5 block (2).

    Shape:
        image:  (B, 3, H, W)  float RGB in 0-255
        return: (B, L, H, W)  logits

    Example:
        >>> net = DeepLabV1(21)                                 # DeepLab-LargeFOV
        >>> net.eval()(torch.rand(1, 3, 65, 81) * 255).shape  # doctest: +SKIP
        torch.Size([1, 21, 65, 81])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        fc6_kernel: int = 3,
        fc6_dilation: int = 12,
        fc_channels: int = 1024,
        dropout: float = 0.5,
        msc: bool = False,
        msc_channels: int = 128,
        msc_dropout: float = 0.5,
        conv5_dilation: int = 2,
    ) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        if int(fc6_kernel) < 1 or int(fc6_kernel) % 2 == 0:
            raise ValueError(f"fc6_kernel must be a positive odd number; got {fc6_kernel}")
        if int(fc6_dilation) < 1:
            raise ValueError(f"fc6_dilation must be >= 1; got {fc6_dilation}")
        fc_channels = check_int(fc_channels, "fc_channels", minimum=1)
        for name, p in (("dropout", dropout), ("msc_dropout", msc_dropout)):
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {p}")
        self.num_classes = int(num_classes)
        self.backbone = VGG16Atrous(conv5_dilation)
        self.stride = self.backbone.stride
        k, d, c = int(fc6_kernel), int(fc6_dilation), int(fc_channels)
        self.fc6 = nn.Conv2d(self.backbone.out_channels, c, k, padding=d * (k - 1) // 2, dilation=d)
        self.fc7 = nn.Conv2d(c, c, 1)
        self.fc8 = nn.Conv2d(c, self.num_classes, 1)
        self.dropout = nn.Dropout(dropout)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        # DeepLab initialises the new classifier with N(0, 0.01²).
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
        self.msc_branches: nn.ModuleList | None = None
        if msc:
            self.msc_branches = nn.ModuleList(
                MultiScaleBranch(ch, s, self.num_classes, msc_channels, msc_dropout)
                for _, ch, s in _MSC_INPUTS
            )

    def freeze_main_network(self) -> None:
        """Train only the multi-scale branches, as the paper trains DeepLab-MSc.

        Chen et al. (2015), Sec. 4.3: the branches are added to a trained DeepLab and only the new
        weights are adjusted.  Sets ``requires_grad=False`` on every parameter except
        ``msc_branches.*``.

        Raises:
            ValueError: the model has no multi-scale branches (``msc=False``).
        """
        if self.msc_branches is None:
            raise ValueError("freeze_main_network needs the multi-scale branches (msc=True)")
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.msc_branches.parameters():
            p.requires_grad_(True)

    def forward_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Class scores at stride 8: (B, L, ceil(H/8), ceil(W/8)), before upsampling.

        Args:
            image: (B, 3, H, W) float RGB in 0-255.
        """
        x = self.backbone.normalize(image)
        pools = self.backbone.forward_stages(x)
        h = self.dropout(torch.relu(self.fc6(pools[-1])))
        h = self.dropout(torch.relu(self.fc7(h)))
        scores = self.fc8(h)
        if self.msc_branches is not None:
            for branch, inp in zip(self.msc_branches, (x, *pools[:4]), strict=True):
                scores = scores + branch(inp)
        return scores

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution (no CRF: wrap with ``crf=`` in :func:`models.create`).

        Args:
            image: (B, 3, H, W) float RGB in 0-255.

        Returns:
            (B, L, H, W) logits.
        """
        scores = self.forward_scores(image)
        return upsample_logits(scores, (image.shape[2], image.shape[3]), self.stride)


def _build(
    variant: str,
    num_classes: int,
    crf: str | nn.Module | None,
    crf_kwargs: Mapping[str, Any] | None,
    pretrained: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None,
    arch: dict[str, Any],
    kwargs: dict[str, Any],
) -> nn.Module:
    net = DeepLabV1(num_classes, **{**arch, **kwargs})
    if pretrained is not None:
        load_vgg16_imagenet(net, pretrained)
    return with_crf(
        net, crf, crf_kwargs, num_classes=num_classes, defaults=DEEPLAB_CRF_DEFAULTS[variant]
    )


@register("deeplab_largefov")
def _create_largefov(
    num_classes: int,
    *,
    crf: str | nn.Module | None = None,
    crf_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> nn.Module:
    arch = {"fc6_kernel": 3, "fc6_dilation": 12, "fc_channels": 1024}
    return _build("deeplab_largefov", num_classes, crf, crf_kwargs, pretrained, arch, kwargs)


@register("deeplab_msc_largefov")
def _create_msc_largefov(
    num_classes: int,
    *,
    crf: str | nn.Module | None = None,
    crf_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> nn.Module:
    arch = {"fc6_kernel": 3, "fc6_dilation": 12, "fc_channels": 1024, "msc": True}
    return _build("deeplab_msc_largefov", num_classes, crf, crf_kwargs, pretrained, arch, kwargs)


@register("deeplab_v1")
def _create_v1(
    num_classes: int,
    *,
    crf: str | nn.Module | None = None,
    crf_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> nn.Module:
    arch = {"fc6_kernel": 7, "fc6_dilation": 4, "fc_channels": 4096}
    return _build("deeplab_v1", num_classes, crf, crf_kwargs, pretrained, arch, kwargs)
