"""Semantic Boundaries Dataset (Hariharan et al. 2011) and the VOC "train_aug" set built from it.

SBD's release ``benchmark_RELEASE/dataset`` holds ``img/<id>.jpg``, ``cls/<id>.mat`` (a MATLAB
struct ``GTcls`` whose ``Segmentation`` field is the ``(H, W)`` label map, 0 = background,
1-20 the VOC classes, no void band) and the lists ``train.txt`` (8,498) and ``val.txt`` (2,857).

``train_aug`` is the training set DeepLab, CRF-RNN and most later VOC work use: SBD train ∪ SBD
val ∪ VOC 2012 train, minus every VOC 2012 val image, 10,582 images; labels come from VOC's
PNG where VOC annotated the image (finer, with a void band) and from SBD's ``.mat`` otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from .voc import (
    PairTransform,
    SegmentationFiles,
    VOCSegmentation,
    find_voc_root,
    read_split_file,
)


def _is_sbd_dir(path: Path) -> bool:
    return (path / "cls").is_dir() and (path / "img").is_dir()


def find_sbd_root(root: str | os.PathLike[str]) -> Path:
    """Locate SBD's ``dataset`` directory from ``root`` (it, ``benchmark_RELEASE`` or its parent).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no ``cls/`` and ``img/`` directories are found.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"SBD root {path} does not exist or is not a directory")
    for candidate in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if _is_sbd_dir(candidate):
            return candidate
    raise ValueError(
        f"{path} is not an SBD directory: expected cls/ and img/ in it, in dataset/ or in "
        f"benchmark_RELEASE/dataset/"
    )


class SBDSegmentation(SegmentationFiles):
    """SBD semantic segmentation: ``img/<id>.jpg`` with labels from ``cls/<id>.mat``.

    Args:
        root: SBD's ``dataset`` directory, or ``benchmark_RELEASE`` / its parent.
        split: ``"train"`` or ``"val"`` (any ``<split>.txt`` in the root works).
        num_classes: number of classes; labels outside ``[0, num_classes)`` other than 255 raise.
        transform: optional ``(image, labels) -> (image, labels)``.

    Shape:
        image:  (3, H, W) float32 RGB in 0-255
        labels: (H, W) int64 in [0, num_classes)

    Raises:
        FileNotFoundError: the split file or a listed image/.mat is missing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        num_classes: int = 21,
        transform: PairTransform | None = None,
    ) -> None:
        sbd = find_sbd_root(root)
        names = read_split_file(sbd / f"{split}.txt")
        self.root = sbd
        self.split = split
        super().__init__(
            names,
            [sbd / "img" / f"{n}.jpg" for n in names],
            [sbd / "cls" / f"{n}.mat" for n in names],
            num_classes=num_classes,
            transform=transform,
        )


def train_aug_names(
    voc_root: str | os.PathLike[str], sbd_root: str | os.PathLike[str]
) -> list[str]:
    """The sorted ids of VOC "train_aug": (SBD train ∪ SBD val ∪ VOC train) − VOC val."""
    voc = find_voc_root(voc_root)
    sbd = find_sbd_root(sbd_root)
    sets = voc / "ImageSets" / "Segmentation"
    union = set(read_split_file(sbd / "train.txt")) | set(read_split_file(sbd / "val.txt"))
    union |= set(read_split_file(sets / "train.txt"))
    return sorted(union - set(read_split_file(sets / "val.txt")))


def train_aug(
    voc_root: str | os.PathLike[str],
    sbd_root: str | os.PathLike[str],
    *,
    num_classes: int = 21,
    transform: PairTransform | None = None,
) -> SegmentationFiles:
    """The augmented VOC 2012 training set (10,582 images with the real VOC and SBD releases).

    Ids are (SBD train ∪ SBD val ∪ VOC train) − VOC val. Each image is read from VOC's
    ``JPEGImages`` when there (VOC 2012 contains every SBD image), else from SBD's ``img``;
    labels from VOC's ``SegmentationClass`` PNG when VOC annotated the image, else from SBD's
    ``cls/*.mat``.

    Args:
        voc_root: the ``VOC2012`` directory (or ``VOCdevkit`` / its parent).
        sbd_root: SBD's ``dataset`` directory (or ``benchmark_RELEASE`` / its parent).
        num_classes: number of classes.
        transform: optional ``(image, labels) -> (image, labels)``.

    Shape:
        image:  (3, H, W) float32 RGB in 0-255
        labels: (H, W) int64, 255 = ignore (VOC labels only)
    """
    voc = find_voc_root(voc_root)
    sbd = find_sbd_root(sbd_root)
    names = train_aug_names(voc, sbd)
    images: list[Path] = []
    labels: list[Path] = []
    for name in names:
        voc_image = voc / "JPEGImages" / f"{name}.jpg"
        images.append(voc_image if voc_image.is_file() else sbd / "img" / f"{name}.jpg")
        voc_label = voc / "SegmentationClass" / f"{name}.png"
        labels.append(voc_label if voc_label.is_file() else sbd / "cls" / f"{name}.mat")
    return SegmentationFiles(names, images, labels, num_classes=num_classes, transform=transform)


def build_dataset(
    root: str | os.PathLike[str],
    split: str = "train",
    *,
    num_classes: int = 21,
    transform: PairTransform | None = None,
    sbd_root: str | os.PathLike[str] | None = None,
) -> SegmentationFiles:
    """Build the dataset the CLI's ``--data`` and ``--split`` name.

    ``root`` must hold a VOC 2012 layout (the ``VOC2012`` directory, ``VOCdevkit`` or their
    parent). ``split`` is a list in ``ImageSets/Segmentation`` (``train``, ``val``,
    ``trainval``, ...) or ``"train_aug"``, which is built from SBD when ``sbd_root`` is given or
    an SBD tree sits beside ``VOCdevkit`` (``benchmark_RELEASE/dataset``), and otherwise read
    from ``ImageSets/Segmentation/train_aug.txt`` with labels in ``SegmentationClassAug/``
    (the widely shared pre-converted PNGs).

    Args:
        root: VOC directory (see above).
        split: split name.
        num_classes: number of classes.
        transform: optional ``(image, labels) -> (image, labels)``.
        sbd_root: SBD directory for ``train_aug``.

    Shape:
        image:  (3, H, W) float32 RGB in 0-255
        labels: (H, W) int64, 255 = ignore

    Raises:
        ValueError: ``root`` is not a VOC directory, or ``train_aug`` has no source.
        FileNotFoundError: the split or some of its files are missing.
    """
    voc = find_voc_root(root)
    if split == "train_aug":
        if sbd_root is None:
            for candidate in (voc.parent.parent / "benchmark_RELEASE", voc.parent / "SBD"):
                if candidate.is_dir() and _is_sbd_dir(candidate / "dataset"):
                    sbd_root = candidate
                    break
        if sbd_root is not None:
            return train_aug(voc, sbd_root, num_classes=num_classes, transform=transform)
        if (voc / "SegmentationClassAug").is_dir() and (
            voc / "ImageSets" / "Segmentation" / "train_aug.txt"
        ).is_file():
            return VOCSegmentation(
                voc,
                "train_aug",
                num_classes=num_classes,
                transform=transform,
                label_dir="SegmentationClassAug",
            )
        raise ValueError(
            f"split 'train_aug' needs SBD: pass sbd_root (SBD's benchmark_RELEASE), put "
            f"benchmark_RELEASE/ beside {voc.parent}, or provide "
            f"{voc}/ImageSets/Segmentation/train_aug.txt with {voc}/SegmentationClassAug/"
        )
    return VOCSegmentation(voc, split, num_classes=num_classes, transform=transform)
