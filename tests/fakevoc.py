"""Seeded fake PASCAL VOC 2012 / SBD trees for tests: tiny, learnable, made on the fly.

``make_fake_voc(tmp_path)`` writes ``tmp_path/VOCdevkit/VOC2012/`` with the layout of the real
release and returns that ``VOC2012`` directory, which is what ``--data`` points at (the readers
also accept its parent ``VOCdevkit`` and the directory above that)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png      palette PNGs, 255 = void boundary band
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

Every image is a background plus one to three filled rectangles/ellipses. Each class has a
fixed colour (the same in every tree, whatever ``seed``), so colour predicts the label and a
tiny CNN learns something in a few steps; Gaussian noise and JPEG compression keep it from
being trivial. As in VOC, a band of 255 ("void") pixels surrounds every object.

``make_fake_sbd(tmp_path)`` writes an SBD ``benchmark_RELEASE/dataset`` tree (``img/*.jpg``,
``cls/*.mat`` holding ``GTcls.Segmentation``, ``train.txt``, ``val.txt``) with the same
drawing rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from deepcrf.data.palette import write_label_png

# Fixed colours per class, independent of ``seed``, so that the label is learnable from colour.
_CLASS_COLORS = np.random.default_rng(20120901).integers(0, 256, size=(256, 3))
_NOISE_STD = 12.0  # colour units
_BAND = 1  # half-width, in pixels, of the void band drawn around each object


def _draw_sample(
    rng: np.random.Generator, size: tuple[int, int], num_classes: int, *, void_band: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(H, W, 3)`` uint8 image and its ``(H, W)`` uint8 labels (0 = background)."""
    height, width = size
    labels = np.zeros((height, width), dtype=np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    n_objects = int(rng.integers(1, 4))
    for _ in range(n_objects):
        cls = int(rng.integers(1, num_classes)) if num_classes > 1 else 0
        h = int(rng.integers(max(4, height // 5), max(5, height // 2) + 1))
        w = int(rng.integers(max(4, width // 5), max(5, width // 2) + 1))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        if rng.random() < 0.5:
            mask = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        else:
            cy, cx = top + (h - 1) / 2.0, left + (w - 1) / 2.0
            mask = ((rows - cy) / (h / 2.0)) ** 2 + ((cols - cx) / (w / 2.0)) ** 2 <= 1.0
        labels[mask] = cls
    image = _CLASS_COLORS[labels].astype(np.float64)
    image += rng.normal(0.0, _NOISE_STD, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if void_band:
        # VOC marks object outlines as void: pixels within _BAND of a label change become 255.
        edge = np.zeros_like(labels, dtype=bool)
        edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
        edge[1:, :] |= labels[1:, :] != labels[:-1, :]
        edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
        if _BAND > 1:
            edge = ndimage.binary_dilation(edge, iterations=_BAND - 1)
        labels = np.where(edge, np.uint8(255), labels)
    return image, labels


def _ids(prefix: str, start: int, count: int) -> list[str]:
    return [f"{prefix}_{start + i:06d}" for i in range(count)]


def _write_list(path: Path, names: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))


def make_fake_voc(
    root: str | Path,
    *,
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (48, 64),
    num_classes: int = 21,
    seed: int = 0,
) -> Path:
    """Write a seeded fake VOC 2012 segmentation tree under ``root``; return its ``VOC2012`` dir.

    Args:
        root: directory to write into (created if missing); the tree is ``root/VOCdevkit/VOC2012``.
        n_train: number of ``train`` images.
        n_val: number of ``val`` images (ids distinct from ``train``'s).
        size: ``(H, W)`` of every image, in pixels.
        num_classes: labels drawn are in ``[0, num_classes)`` plus 255 boundary bands.
        seed: seeds the shapes, classes and noise; the same arguments give identical files.

    Returns:
        ``root/VOCdevkit/VOC2012`` (the directory holding ``JPEGImages``).
    """
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    train = _ids("2007", 1, n_train)
    val = _ids("2008", 1, n_val)
    for name in train + val:
        image, labels = _draw_sample(rng, size, num_classes)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        write_label_png(voc / "SegmentationClass" / f"{name}.png", labels)
    sets = voc / "ImageSets" / "Segmentation"
    _write_list(sets / "train.txt", train)
    _write_list(sets / "val.txt", val)
    _write_list(sets / "trainval.txt", sorted(train + val))
    return voc


def make_fake_sbd(
    root: str | Path,
    *,
    train: Sequence[str] = ("2007_000001", "2009_000001", "2009_000002"),
    val: Sequence[str] = ("2008_000001", "2009_000003"),
    size: tuple[int, int] = (48, 64),
    num_classes: int = 21,
    seed: int = 1,
) -> Path:
    """Write a seeded fake SBD tree under ``root``; return its ``dataset`` directory.

    SBD has no void band, so none is drawn. The default ids overlap a default ``make_fake_voc``
    tree the way the real sets overlap: ``2007_000001`` is in VOC train and SBD train,
    ``2008_000001`` (VOC val) is in SBD val and must be removed from ``train_aug``.

    Args:
        root: directory to write into; the tree is ``root/benchmark_RELEASE/dataset``.
        train: ids listed in ``train.txt``.
        val: ids listed in ``val.txt``.
        size: ``(H, W)`` of every image, in pixels.
        num_classes: labels drawn are in ``[0, num_classes)``.
        seed: seeds the drawing.

    Returns:
        ``root/benchmark_RELEASE/dataset`` (the directory holding ``img`` and ``cls``).
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    sbd = Path(root) / "benchmark_RELEASE" / "dataset"
    (sbd / "img").mkdir(parents=True, exist_ok=True)
    (sbd / "cls").mkdir(parents=True, exist_ok=True)
    for name in list(train) + list(val):
        image, labels = _draw_sample(rng, size, num_classes, void_band=False)
        Image.fromarray(image).save(sbd / "img" / f"{name}.jpg", quality=95)
        # SBD's layout: a 1x1 struct GTcls with fields Segmentation, Boundaries, CategoriesPresent.
        gtcls = {
            "Segmentation": labels,
            "Boundaries": np.empty((0, 1), dtype=object),
            "CategoriesPresent": np.unique(labels[labels > 0]).astype(np.uint8),
        }
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": gtcls})
    _write_list(sbd / "train.txt", list(train))
    _write_list(sbd / "val.txt", list(val))
    return sbd
