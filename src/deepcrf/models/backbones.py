"""Stride-8 atrous backbones: VGG-16 made fully convolutional (DeepLab) and a small CPU network.

Every backbone has the interface the heads of :mod:`deepcrf.models` build on:

* ``normalize(image)``: ``(B, 3, H, W)`` RGB in 0-255 -> the network's input scale, with the
  backbone's own ``mean``/``std`` buffers (ImageNet statistics, times 255);
* ``forward_features(x_normalised) -> (B, out_channels, ceil(H/8), ceil(W/8))``;
* ``out_channels`` and ``stride`` (= 8).

Geometry: every strided layer is a 3×3 kernel with padding 1, so feature pixel ``(i, j)`` is
centred on image pixel ``(8i, 8j)`` and the map has ``ceil(H/8) × ceil(W/8)`` pixels for any H, W.
:func:`upsample_logits` interpolates bilinearly with exactly that alignment.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._checks import check_int, check_tensor
from .registry import register
from .segmenter import with_crf

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SmallBackbone",
    "SmallSegNet",
    "VGG16Atrous",
    "build_backbone",
    "check_image",
    "load_vgg16_imagenet",
    "upsample_logits",
]

# torchvision's ImageNet statistics for RGB in 0-1; the backbones take 0-255, hence the ×255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image(image: object, name: str = "image") -> torch.Tensor:
    """Validate a batch of RGB images ``(B, 3, H, W)`` with a floating-point dtype.

    Args:
        image: the value to check.
        name: the argument's name used in error messages.

    Returns:
        ``image`` unchanged.

    Raises:
        TypeError: not a tensor, or an integer dtype (convert with ``.float()``; values 0-255).
        ValueError: not 4-D, not 3 channels, or empty.
    """
    layout = "(B, 3, H, W) float RGB in 0-255"
    x = check_tensor(image, name, ndim=4, layout=layout)
    if x.shape[1] != 3:
        raise ValueError(
            f"{name} must be {layout}; got shape {tuple(x.shape)} with {x.shape[1]} channels"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (colour values in 0-255, e.g. "
            f"image.float()); got {x.dtype}"
        )
    return x


def _interp_matrix(
    out_size: int, in_size: int, stride: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # Row y: linear interpolation at feature coordinate y / stride (feature i sits on pixel
    # stride*i), clamped to the last feature past the map's end.  The hat function
    # max(0, 1 - |pos - i|) gives exactly the two bilinear weights, built on the device.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    pos = torch.arange(out_size, dtype=work, device=device) / stride
    pos = pos.clamp(max=in_size - 1)
    grid = torch.arange(in_size, dtype=work, device=device)
    return (1.0 - (pos[:, None] - grid[None, :]).abs()).clamp(min=0.0).to(dtype)


def upsample_logits(scores: torch.Tensor, size: tuple[int, int], stride: int = 8) -> torch.Tensor:
    """Bilinear upsampling of stride-``stride`` scores to the image, as DeepLab's last layer.

    Output pixel ``(y, x)`` takes the bilinear interpolation of ``scores`` at feature coordinates
    ``(y/stride, x/stride)`` (feature ``(i, j)`` is centred on pixel ``(stride·i, stride·j)``),
    clamped at the map's last row/column.  Computed as two small matrix products, so it is
    deterministic on every device (``F.interpolate``'s CUDA backward uses atomics).

    Args:
        scores: (B, L, h, w) scores on the stride-``stride`` grid.
        size: (H, W) of the image in pixels.
        stride: the scores' output stride in pixels.

    Shape:
        scores: (B, L, h, w)
        return: (B, L, H, W)
    """
    check_tensor(scores, "scores", ndim=4, layout="(B, L, h, w)", floating=True)
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (H, W); got {tuple(size)}")
    rows = _interp_matrix(height, scores.shape[2], stride, scores.dtype, scores.device)
    cols = _interp_matrix(width, scores.shape[3], stride, scores.dtype, scores.device)
    # (H, h) @ (B, L, h, w) @ (w, W)
    return torch.matmul(torch.matmul(rows, scores), cols.t())


class _Normalizer(nn.Module):
    """Mixin: ImageNet ``mean``/``std`` buffers (0-255 scale) and ``normalize``."""

    stride: int = 8

    def __init__(self) -> None:
        super().__init__()
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        # Not persistent: constants of the architecture, not learned state of a checkpoint.
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """``(image - mean) / std`` in the backbone's dtype; never modifies ``image``.

        Args:
            image: (B, 3, H, W) float RGB in 0-255.

        Returns:
            (B, 3, H, W) normalised image, in the dtype of the backbone's buffers (``.double()``
            on the model gives float64 throughout).
        """
        check_image(image)
        x = image.to(dtype=self.mean.dtype)
        return (x - self.mean) / self.std


def _check_normalised(x: object) -> torch.Tensor:
    t = check_tensor(x, "x", ndim=4, layout="(B, 3, H, W) normalised image", floating=True)
    if t.shape[1] != 3:
        raise ValueError(f"x must be (B, 3, H, W) normalised image; got shape {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------
# VGG-16, atrous
# ----------------------------------------------------------------------------------------------

# (name, out_channels) per conv of VGG-16's five blocks (Simonyan & Zisserman, configuration D).
_VGG16_BLOCKS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("conv1_1", 64), ("conv1_2", 64)),
    (("conv2_1", 128), ("conv2_2", 128)),
    (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
    (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
    (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)

# torchvision's ``vgg16`` ``features`` index of each conv (ReLUs and max-pools in between).
TORCHVISION_VGG16_CONV_INDEX: dict[str, int] = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
    "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
    "conv5_1": 24, "conv5_2": 26, "conv5_3": 28,
}  # fmt: skip


class VGG16Atrous(_Normalizer):
    """VGG-16's 13 conv layers made fully convolutional with output stride 8 (DeepLab v1).

    Chen et al. (2015), Sec. 3.1: pool4 and pool5 keep stride 1 (3×3 max-pool, padding 1) and
    the conv5 block uses the 'hole' (atrous) algorithm with dilation 2, so conv5 sees the same
    context as in the stride-32 classifier while the map stays at stride 8.  Pools 1-3 are
    DeepLab's 3×3/stride 2/padding 1 max-pools.  ``forward_features`` returns pool5.

    Args:
        conv5_dilation: dilation of conv5_1..conv5_3 (2 in DeepLab; 1 gives the plain net).

    Shape:
        x:      (B, 3, H, W)  normalised image (see :meth:`normalize`)
        return: (B, 512, ceil(H/8), ceil(W/8))
    """

    out_channels = 512

    def __init__(self, conv5_dilation: int = 2) -> None:
        super().__init__()
        if int(conv5_dilation) < 1:
            raise ValueError(f"conv5_dilation must be >= 1; got {conv5_dilation}")
        self.conv5_dilation = int(conv5_dilation)
        stages: list[nn.Sequential] = []
        in_ch = 3
        for b, convs in enumerate(_VGG16_BLOCKS, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            dilation = self.conv5_dilation if b == 5 else 1
            for name, out_ch in convs:
                layers[name] = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
                layers["relu" + name[4:]] = nn.ReLU(inplace=True)
                in_ch = out_ch
            layers[f"pool{b}"] = nn.MaxPool2d(3, stride=2 if b <= 3 else 1, padding=1)
            stages.append(nn.Sequential(layers))
        self.stages = nn.ModuleList(stages)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def conv(self, name: str) -> nn.Conv2d:
        """The convolution called ``name`` (``"conv1_1"`` ... ``"conv5_3"``)."""
        for stage in self.stages:
            layer = getattr(stage, name, None)
            if isinstance(layer, nn.Conv2d):
                return layer
        raise KeyError(f"no VGG-16 convolution named {name!r}")

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of pool1 ... pool5 (strides 2, 4, 8, 8, 8) for multi-scale heads.

        Args:
            x: (B, 3, H, W) normalised image.

        Returns:
            Five maps with 64, 128, 256, 512, 512 channels.
        """
        _check_normalised(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """pool5 features at stride 8: (B, 512, ceil(H/8), ceil(W/8))."""
        return self.forward_stages(x)[-1]


def _torch_load(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"pretrained weights file not found: {p}")
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(p, device="cpu")
    # weights_only: never unpickle arbitrary objects from a downloaded file.
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{p} cannot be read with torch.load(weights_only=True): it holds pickled objects, "
            f"not only tensors (save model.state_dict() instead of the model); {err}"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p} does not hold a state dict (got {type(obj).__name__})")
    return obj


def _decimate_fc(
    weight: torch.Tensor, bias: torch.Tensor, target: nn.Conv2d, in_step: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    # weight: (4096, C, 7, 7) or (4096, 4096, 1, 1) from the classifier; keep every out_step-th
    # filter, every in_step-th input channel and an evenly spaced k×k subset of the kernel taps.
    out_full, in_full, k_full = weight.shape[0], weight.shape[1], weight.shape[2]
    co, ci, kh, kw = target.weight.shape
    if kh != kw or out_full % co or in_full != ci * in_step:
        raise ValueError(
            f"cannot map {name} of shape {tuple(weight.shape)} onto a conv of shape "
            f"{tuple(target.weight.shape)}: need {out_full} divisible by the output channels and "
            f"{in_full} input channels = {ci} × {in_step}"
        )
    if kh == k_full:
        taps = torch.arange(k_full)
    elif kh == 1:
        taps = torch.tensor([k_full // 2])
    elif (k_full - 1) % (kh - 1) == 0:
        taps = torch.arange(0, k_full, (k_full - 1) // (kh - 1))
    else:
        raise ValueError(
            f"cannot subsample the {k_full}×{k_full} kernel of {name} to {kh}×{kw} evenly"
        )
    out_step = out_full // co
    w = weight[::out_step, ::in_step][:, :, taps][:, :, :, taps]
    return w, bias[::out_step], out_step


def load_vgg16_imagenet(
    model: nn.Module, weights: str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> dict[str, list[str]]:
    """Load torchvision-format ImageNet VGG-16 weights into a model built on :class:`VGG16Atrous`.

    ``features.{0,2,5,...,28}`` go to conv1_1 ... conv5_3.  When the model has convolutions named
    ``fc6``/``fc7`` (DeepLab's heads), ``classifier.0`` (4096×25088 = 4096×512×7×7) and
    ``classifier.3`` (4096×4096) are reshaped into convolutions and, where the head is smaller,
    decimated as in DeepLab-LargeFOV (Chen et al. 2015, Sec. 3.2 and Table 2): every 4th filter
    of fc6 and its 7×7 kernel subsampled to 3×3 (taps 0, 3, 6); fc7 keeps every 4th output and
    the matching every 4th input channel, so 4096×4096 -> 1024×1024.  ``classifier.6``
    (ImageNet's 1000-way classifier) is not used.  Nothing is downloaded.

    Args:
        model: a :class:`VGG16Atrous`, or any module containing exactly one (e.g. a DeepLab
            model, possibly inside a :class:`~deepcrf.models.segmenter.CRFSegmenter`).
        weights: path to a ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``) or
            ``.safetensors`` file, or a state dict, with torchvision ``vgg16`` key names
            (a leading ``module.`` is stripped).

    Returns:
        ``{"loaded": [our parameter names], "ignored": [file keys not used]}``.

    Raises:
        FileNotFoundError: ``weights`` path does not exist.
        ValueError: missing keys, unexpected keys (e.g. ``vgg16_bn``'s BatchNorm statistics),
            or shape mismatches — all listed in one message; the model is left unchanged.
        TypeError: ``model`` holds no (or several) :class:`VGG16Atrous`.
    """
    trunks = [(n, m) for n, m in model.named_modules() if isinstance(m, VGG16Atrous)]
    if len(trunks) != 1:
        raise TypeError(
            f"model must contain exactly one VGG16Atrous to load VGG-16 weights into; found "
            f"{len(trunks)} in {type(model).__name__}"
        )
    trunk = trunks[0][1]
    heads: dict[str, tuple[str, nn.Conv2d]] = {}
    for n, m in model.named_modules():
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ("fc6", "fc7") and isinstance(m, nn.Conv2d):
            if leaf in heads:
                raise TypeError(f"model has several convolutions named {leaf!r}")
            heads[leaf] = (n, m)
    if "fc7" in heads and "fc6" not in heads:
        raise TypeError("model has an fc7 convolution but no fc6")

    state = dict(_torch_load(weights)) if not isinstance(weights, Mapping) else dict(weights)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}

    expected: dict[str, tuple[int, ...]] = {}
    in_ch = 3
    for convs in _VGG16_BLOCKS:
        for name, out_ch in convs:
            idx = TORCHVISION_VGG16_CONV_INDEX[name]
            expected[f"features.{idx}.weight"] = (out_ch, in_ch, 3, 3)
            expected[f"features.{idx}.bias"] = (out_ch,)
            in_ch = out_ch
    classifier = {
        "classifier.0.weight": (4096, 512 * 7 * 7),
        "classifier.0.bias": (4096,),
        "classifier.3.weight": (4096, 4096),
        "classifier.3.bias": (4096,),
        "classifier.6.weight": (1000, 4096),
        "classifier.6.bias": (1000,),
    }
    required = dict(expected)
    if "fc6" in heads:
        required.update({k: classifier[k] for k in ("classifier.0.weight", "classifier.0.bias")})
    if "fc7" in heads:
        required.update({k: classifier[k] for k in ("classifier.3.weight", "classifier.3.bias")})

    problems: list[str] = []
    missing = [k for k in required if k not in state]
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    known = set(expected) | set(classifier)
    unexpected = sorted(k for k in state if k not in known)
    if unexpected:
        hint = (
            " (BatchNorm keys: this looks like vgg16_bn; only plain vgg16 weights are supported)"
            if any("running_mean" in k for k in unexpected)
            else ""
        )
        problems.append(
            f"unexpected keys: {', '.join(unexpected[:20])}"
            f"{' ...' if len(unexpected) > 20 else ''}{hint}"
        )
    for key, shape in {**expected, **classifier}.items():
        if key in state:
            value = state[key]
            if not isinstance(value, torch.Tensor):
                problems.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif tuple(value.shape) != shape:
                problems.append(f"{key} has shape {tuple(value.shape)}, expected {shape}")
    if problems:
        raise ValueError("cannot load VGG-16 ImageNet weights: " + "; ".join(problems))

    # Build every target tensor first, so that a decimation error leaves the model unchanged.
    updates: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    for convs in _VGG16_BLOCKS:
        for name, _ in convs:
            idx = TORCHVISION_VGG16_CONV_INDEX[name]
            conv = trunk.conv(name)
            updates.append((conv.weight, state[f"features.{idx}.weight"]))
            updates.append((conv.bias, state[f"features.{idx}.bias"]))
    used = set(expected)
    if "fc6" in heads:
        fc6 = heads["fc6"][1]
        w6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
        w, b, step6 = _decimate_fc(w6, state["classifier.0.bias"], fc6, 1, "classifier.0")
        updates += [(fc6.weight, w), (fc6.bias, b)]
        used |= {"classifier.0.weight", "classifier.0.bias"}
        if "fc7" in heads:
            fc7 = heads["fc7"][1]
            w7 = state["classifier.3.weight"].reshape(4096, 4096, 1, 1)
            w, b, _ = _decimate_fc(w7, state["classifier.3.bias"], fc7, step6, "classifier.3")
            updates += [(fc7.weight, w), (fc7.bias, b)]
            used |= {"classifier.3.weight", "classifier.3.bias"}
    names = {id(p): n for n, p in model.named_parameters()}
    for param, value in updates:
        if param is None:
            raise ValueError("cannot load VGG-16 weights into a convolution without bias")
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(
                f"cannot load into {names.get(id(param), '?')}: shape {tuple(param.shape)}, "
                f"weights give {tuple(value.shape)}"
            )
    with torch.no_grad():
        for param, value in updates:
            param.copy_(value.to(dtype=param.dtype, device=param.device))  # type: ignore[union-attr]
    loaded = [names.get(id(param), "?") for param, _ in updates]
    return {"loaded": loaded, "ignored": sorted(k for k in state if k not in used)}


# ----------------------------------------------------------------------------------------------
# A small backbone that trains on a laptop CPU
# ----------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none'; got {kind!r}")


def _conv_block(
    in_ch: int, out_ch: int, norm: str, *, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_ch,
            out_ch,
            3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=norm == "none",
        ),
        _norm(norm, out_ch),
        nn.ReLU(inplace=True),
    )


class SmallBackbone(_Normalizer):
    """A small stride-8 atrous backbone for CPU training on 64-128 px images.

    Three resolution levels (3×3 convs; the first of each level has stride 2), then two 3×3
    convolutions with dilation 2 and 4 that enlarge the field of view at stride 8 without losing
    resolution, the atrous idea of DeepLab at a size that trains in minutes on two CPU cores.
    Receptive field: 125 pixels (:data:`SMALL_BACKBONE_LAYERS`).

    Args:
        width: channels of the first level; levels have width, 2·width, 4·width channels.
        norm: ``"batch"`` (BatchNorm), ``"group"`` (GroupNorm, batch-size independent) or
            ``"none"``.

    Shape:
        x:      (B, 3, H, W)  normalised image (see :meth:`normalize`)
        return: (B, 4·width, ceil(H/8), ceil(W/8))
    """

    def __init__(self, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        width = check_int(width, "width", minimum=1)
        w = int(width)
        self.out_channels = 4 * w
        self.layers = nn.Sequential(
            _conv_block(3, w, norm),
            _conv_block(w, w, norm, stride=2),  # stride 2
            _conv_block(w, 2 * w, norm),
            _conv_block(2 * w, 2 * w, norm, stride=2),  # stride 4
            _conv_block(2 * w, 4 * w, norm),
            _conv_block(4 * w, 4 * w, norm, stride=2),  # stride 8
            _conv_block(4 * w, 4 * w, norm, dilation=2),
            _conv_block(4 * w, 4 * w, norm, dilation=4),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features at stride 8: (B, 4·width, ceil(H/8), ceil(W/8))."""
        return self.layers(_check_normalised(x))


class SmallSegNet(nn.Module):
    """:class:`SmallBackbone` plus a LargeFOV-like head: the default model of ``deepcrf train``.

    Head as DeepLab-LargeFOV's fc6/fc7/fc8, scaled down: a 3×3 convolution with dilation
    ``head_dilation`` (``hidden`` channels), a 1×1 convolution, dropout after each, and a 1×1
    classifier; the stride-8 scores are upsampled bilinearly to the image (:func:`upsample_logits`).

    Args:
        num_classes: number of labels L.
        width: backbone width (see :class:`SmallBackbone`).
        hidden: channels of the head's two hidden layers.
        head_dilation: dilation of the head's 3×3 convolution (field of view at stride 8).
        dropout: dropout probability in the head.
        norm: normalisation of the backbone (``"batch"``, ``"group"``, ``"none"``).

    Shape:
        image:  (B, 3, H, W)  float RGB in 0-255
        return: (B, L, H, W)  logits
    """

    def __init__(
        self,
        num_classes: int,
        *,
        width: int = 32,
        hidden: int = 128,
        head_dilation: int = 3,
        dropout: float = 0.1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        head_dilation = check_int(head_dilation, "head_dilation", minimum=1)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.num_classes = int(num_classes)
        self.backbone = SmallBackbone(width, norm)
        self.stride = self.backbone.stride
        d = int(head_dilation)
        self.head = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, hidden, 3, padding=d, dilation=d),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.classifier = nn.Conv2d(hidden, self.num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution (no CRF: wrap with ``crf=`` in :func:`models.create`).

        Args:
            image: (B, 3, H, W) float RGB in 0-255.

        Returns:
            (B, L, H, W) logits.
        """
        x = self.backbone.normalize(image)
        scores = self.classifier(self.head(self.backbone.forward_features(x)))
        return upsample_logits(scores, (image.shape[2], image.shape[3]), self.stride)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A bare backbone by name, for heads built on top of it (Gaussian CRF, FeatMap-Net).

    Args:
        name: ``"small"`` (:class:`SmallBackbone`) or ``"vgg16"`` (:class:`VGG16Atrous`).
        **kwargs: the backbone's constructor arguments; for ``"vgg16"`` also
            ``pretrained=PATH`` (torchvision VGG-16 weights, see :func:`load_vgg16_imagenet`).

    Returns:
        The backbone, with ``normalize``, ``forward_features``, ``out_channels``, ``stride``.
    """
    if name == "small":
        return SmallBackbone(**kwargs)
    if name == "vgg16":
        pretrained = kwargs.pop("pretrained", None)
        trunk = VGG16Atrous(**kwargs)
        if pretrained is not None:
            load_vgg16_imagenet(trunk, pretrained)
        return trunk
    raise ValueError(f"unknown backbone {name!r}; available: 'small', 'vgg16'")


@register("small")
def _create_small(
    num_classes: int,
    *,
    crf: str | nn.Module | None = None,
    crf_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    if pretrained is not None:
        raise ValueError("model 'small' has no ImageNet weights; pretrained must be None")
    net = SmallSegNet(num_classes, **kwargs)
    return with_crf(net, crf, crf_kwargs, num_classes=num_classes)


def receptive_field(layers: list[tuple[int, int, int]]) -> int:
    """Receptive field in pixels of a chain of ``(kernel, stride, dilation)`` layers.

    r = 1 + Σ_k (kernel_k - 1)·dilation_k·Π_{j<k} stride_j.
    """
    field, jump = 1, 1
    for kernel, stride, dilation in layers:
        field += (kernel - 1) * dilation * jump
        jump *= stride
    return field


# Layers of SmallBackbone as (kernel, stride, dilation), for its documented receptive field.
SMALL_BACKBONE_LAYERS = [(3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1),
                         (3, 1, 2), (3, 1, 4)]  # fmt: skip
