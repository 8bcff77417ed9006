"""Joint image/label augmentations for segmentation training (DeepLab's recipe).

Each transform is a callable on an ``(image, labels)`` pair and returns a new pair (inputs are
never modified). No mean/std normalisation happens here: models normalise inside (see
``docs/architecture.md``).

Randomness: every random transform draws from ``generator`` when one is given, else from torch's
global RNG (``torch.manual_seed``), with a fixed number of draws per call, so seeding the
process (or each DataLoader worker, which PyTorch seeds from the main process RNG) makes the
augmentation stream bit-reproducible. Prefer the global RNG with DataLoader workers: each
worker receives a copy of an explicit ``generator`` in the same state, so the workers would
repeat each other's draws, whereas PyTorch seeds each worker's global RNG differently.

Shape (every transform):
    image:  (3, H, W) float, RGB in 0-255
    labels: (H, W) int64, 255 = ignore
    return: (3, H', W') float and (H', W') int64
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from ..metrics import IGNORE_INDEX

#: Mean RGB colour of the ImageNet-trained VGG DeepLab starts from (Caffe's BGR
#: 104.008, 116.669, 122.675 reversed): padding with it reads as ~0 after normalisation.
MEAN_RGB: tuple[float, float, float] = (122.675, 116.669, 104.008)

Pair = tuple[torch.Tensor, torch.Tensor]


def _check_sample(image: torch.Tensor, labels: torch.Tensor) -> None:
    check_tensor(image, "image", ndim=3, layout="(3, H, W)", floating=True)
    check_tensor(labels, "labels", ndim=2, layout="(H, W)", dtypes=(torch.int64,))
    if image.shape[0] != 3 or image.shape[1:] != labels.shape:
        raise ValueError(
            f"image must be (3, H, W) matching labels {tuple(labels.shape)}; "
            f"got {tuple(image.shape)}"
        )


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high]``; one draw even when ``high == 0`` keeps streams aligned."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def _size_pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or (height, width); got {size!r}")
    return int(pair[0]), int(pair[1])


def rescale(image: torch.Tensor, labels: torch.Tensor, scale: float) -> Pair:
    """Resize a pair by ``scale``: bilinear for the image, nearest for the labels.

    The output size is ``round(H * scale) x round(W * scale)`` (at least 1x1). Nearest-neighbour
    uses half-pixel centres (``nearest-exact``), as PIL/OpenCV do, so labels stay aligned.

    Args:
        image: RGB image.
        labels: label map.
        scale: positive factor.

    Shape:
        image: (3, H, W) float; labels: (H, W) int64
        return: (3, h, w) float, (h, w) int64 with h = round(H * scale), w = round(W * scale)
    """
    _check_sample(image, labels)
    scale = float(scale)
    if not scale > 0.0 or scale == float("inf"):
        raise ValueError(f"scale must be a finite positive number; got {scale!r}")
    height, width = labels.shape
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size == (height, width):
        return image.clone(), labels.clone()
    out_image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    # Labels go through float32, exact for ids in [0, 255].
    out_labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")
    return out_image, out_labels[0, 0].to(torch.int64)


class RandomScale:
    """Rescale by a factor drawn uniformly from ``[min_scale, max_scale]`` (DeepLab uses 0.5-1.5).

    Args:
        min_scale: smallest factor (> 0).
        max_scale: largest factor (>= min_scale).
        generator: RNG to draw from; torch's global RNG when ``None``.
    """

    def __init__(
        self,
        min_scale: float = 0.5,
        max_scale: float = 1.5,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 < min_scale <= max_scale < float("inf"):
            raise ValueError(
                f"scale range must satisfy 0 < min_scale <= max_scale; got ({min_scale}, "
                f"{max_scale})"
            )
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.generator = generator

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> Pair:
        """Rescale the pair by one random factor."""
        scale = _uniform(self.min_scale, self.max_scale, self.generator)
        return rescale(image, labels, scale)

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Crop a random ``size`` window; pad first (mean colour, ignore labels) when smaller.

    Padding goes at the bottom and right, as in DeepLab's Caffe data layer; padded label pixels
    are 255 so they never enter the loss.

    Args:
        size: crop ``(height, width)`` in pixels, or one int for a square.
        fill: RGB colour of padded image pixels, 0-255 (default: :data:`MEAN_RGB`).
        ignore_index: label of padded pixels.
        generator: RNG to draw from; torch's global RNG when ``None``.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        fill: Sequence[float] = MEAN_RGB,
        ignore_index: int = IGNORE_INDEX,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _size_pair(size, "size")
        if len(fill) != 3:
            raise ValueError(f"fill must be an RGB triple; got {fill!r}")
        self.fill = tuple(float(c) for c in fill)
        self.ignore_index = int(ignore_index)
        self.generator = generator

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> Pair:
        """Pad if needed, then crop the pair at one random offset."""
        _check_sample(image, labels)
        crop_h, crop_w = self.size
        height, width = labels.shape
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            fill = torch.tensor(self.fill, dtype=image.dtype, device=image.device)
            padded = fill[:, None, None].expand(3, height + pad_h, width + pad_w).clone()
            padded[:, :height, :width] = image
            padded_labels = labels.new_full((height + pad_h, width + pad_w), self.ignore_index)
            padded_labels[:height, :width] = labels
            image, labels = padded, padded_labels
            height, width = labels.shape
        top = _randint(height - crop_h, self.generator)
        left = _randint(width - crop_w, self.generator)
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        return image[:, window[0], window[1]].clone(), labels[window].clone()

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class RandomHorizontalFlip:
    """Mirror image and labels left-right with probability ``p``.

    Args:
        p: flip probability in [0, 1].
        generator: RNG to draw from; torch's global RNG when ``None``.
    """

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1]; got {p!r}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> Pair:
        """Flip the pair or return copies."""
        _check_sample(image, labels)
        # Always one draw, so the stream does not depend on p.
        if _uniform(0.0, 1.0, self.generator) < self.p:
            return image.flip(-1), labels.flip(-1)
        return image.clone(), labels.clone()

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply pair transforms in order.

    Args:
        transforms: callables ``(image, labels) -> (image, labels)``.
    """

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor, torch.Tensor], Pair]]) -> None:
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"every transform must be callable; got {type(t).__name__}")

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> Pair:
        """Run the pair through every transform in turn."""
        _check_sample(image, labels)
        for t in self.transforms:
            image, labels = t(image, labels)
        return image, labels

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def train_transform(
    crop_size: int | Sequence[int],
    scale_range: tuple[float, float] | None = (0.5, 1.5),
    flip: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> Compose:
    """DeepLab-style training augmentation: random scale, random crop (padded), random flip.

    Args:
        crop_size: crop ``(height, width)`` or one int, in pixels (DeepLab: 321 on VOC).
        scale_range: ``(min, max)`` scale factors, or ``None`` for no rescaling.
        flip: add a random horizontal flip.
        generator: RNG shared by all three steps; torch's global RNG when ``None``.

    Shape:
        image: (3, H, W) float; labels: (H, W) int64
        return: (3, crop_h, crop_w) float, (crop_h, crop_w) int64

    Example:
        >>> t = train_transform(321)
        >>> image = torch.rand(3, 100, 120) * 255
        >>> image, labels = t(image, torch.zeros(100, 120, dtype=torch.long))
        >>> tuple(image.shape), tuple(labels.shape)
        ((3, 321, 321), (321, 321))
    """
    steps: list[Callable[[torch.Tensor, torch.Tensor], Pair]] = []
    if scale_range is not None:
        steps.append(RandomScale(*scale_range, generator=generator))
    steps.append(RandomCrop(crop_size, generator=generator))
    if flip:
        steps.append(RandomHorizontalFlip(generator=generator))
    return Compose(steps)
