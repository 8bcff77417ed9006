"""PASCAL VOC 2012 segmentation reader (Everingham et al.), plus the shared file-pair dataset.

Which directory to pass: the ``VOC2012`` directory itself (the one holding ``JPEGImages``,
``SegmentationClass`` and ``ImageSets/Segmentation``), as in ``--data ~/VOCdevkit/VOC2012``.
Its parent ``VOCdevkit`` and the directory above that are accepted too (see
:func:`find_voc_root`), so ``--data ~/VOCdevkit`` and ``--data ~`` also work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..metrics import IGNORE_INDEX
from .palette import read_image, read_labels

#: The 21 VOC classes, index = label id (0 = background); 255 marks void/ignored pixels.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: A transform maps an ``(image (3, H, W) float, labels (H, W) int64)`` pair to another pair.
PairTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

_MAX_LISTED = 5  # missing files named in an error message before "... and N more"


def _missing_error(what: str, missing: Sequence[Path], total: int) -> FileNotFoundError:
    shown = ", ".join(str(p) for p in missing[:_MAX_LISTED])
    more = f" ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return FileNotFoundError(
        f"{len(missing)} of {total} {what} listed in the split are missing: {shown}{more}"
    )


def read_split_file(path: str | os.PathLike[str]) -> list[str]:
    """Read an image-id list (one id per line, blank lines ignored, first column only).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file lists no ids.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"split file not found: {p}")
    names = [line.split()[0] for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"split file {p} is empty: it must list one image id per line")
    return names


def _is_voc_dir(path: Path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "ImageSets" / "Segmentation").is_dir()


def find_voc_root(root: str | os.PathLike[str]) -> Path:
    """Locate the ``VOC2012`` directory from ``root`` (it, ``VOCdevkit`` or their parent).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no VOC layout (``JPEGImages`` and ``ImageSets/Segmentation``) is found.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"VOC root {path} does not exist or is not a directory")
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if _is_voc_dir(candidate):
            return candidate
    found = sorted(p.name for p in path.iterdir())[:10]
    raise ValueError(
        f"{path} is not a PASCAL VOC 2012 directory: expected JPEGImages/ and "
        f"ImageSets/Segmentation/ in it, in VOC2012/ or in VOCdevkit/VOC2012/ (point at "
        f"VOCdevkit/VOC2012); it contains {found}"
    )


def _to_tensors(image: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(torch.float32)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return image_t, labels_t


class SegmentationFiles(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Dataset of (image file, label file) pairs, checked at construction and at load.

    Label files are palette/greyscale PNGs (VOC) or SBD ``.mat`` files (``GTcls.Segmentation``),
    chosen by suffix. The constructor checks that every file exists; loading checks that the
    image decodes, that image and labels have the same size and that every label is in
    ``[0, num_classes)`` or 255, raising an error that names the file otherwise.

    Args:
        names: image ids, one per item (``.names``).
        image_paths: image file of each id.
        label_paths: label file of each id (``.png`` or ``.mat``).
        num_classes: number of classes ``L``; labels must lie in ``[0, L)`` or be 255.
        transform: optional callable ``(image, labels) -> (image, labels)`` applied last.

    Shape:
        image:  (3, H, W) float32 RGB in 0-255
        labels: (H, W) int64 in [0, L) or 255 = ignore
    """

    def __init__(
        self,
        names: Sequence[str],
        image_paths: Sequence[Path],
        label_paths: Sequence[Path],
        *,
        num_classes: int = 21,
        transform: PairTransform | None = None,
    ) -> None:
        if not (len(names) == len(image_paths) == len(label_paths)):
            raise ValueError(
                f"names, image_paths and label_paths must have equal lengths; got "
                f"{len(names)}, {len(image_paths)}, {len(label_paths)}"
            )
        if not names:
            raise ValueError("a segmentation dataset needs at least one image; got none")
        if not isinstance(num_classes, int) or not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be an int in [1, 255]; got {num_classes!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None; got {type(transform).__name__}")
        self.names = list(names)
        self.image_paths = [Path(p) for p in image_paths]
        self.label_paths = [Path(p) for p in label_paths]
        self.num_classes = num_classes
        self.transform = transform
        for what, paths in (("images", self.image_paths), ("label files", self.label_paths)):
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise _missing_error(what, missing, len(paths))

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read item ``index`` as ``(H, W, 3)`` uint8 RGB and ``(H, W)`` uint8 labels, checked."""
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image = read_image(image_path)
        labels = read_labels(label_path)
        if image.shape[:2] != labels.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW) but its labels "
                f"{label_path} are {labels.shape[0]}x{labels.shape[1]}"
            )
        bad = (labels >= self.num_classes) & (labels != IGNORE_INDEX)
        if bad.any():
            values = sorted(set(np.unique(labels[bad]).tolist()))
            raise ValueError(
                f"labels in {label_path} must be in [0, {self.num_classes}) or "
                f"{IGNORE_INDEX} (ignore); found {values} in {int(bad.sum())} pixels"
            )
        return image, labels

    def check(self) -> list[str]:
        """Check every item once: readable, image and labels of one size, labels in range.

        Reads each label map fully and each image's header (not its pixels), so a whole VOC
        split takes seconds. Returns one line per bad file (empty when all are good), so that
        a run can refuse to start with a single report instead of failing at the step that
        first samples the file.
        """
        from PIL import Image

        problems = []
        for image_path, label_path in zip(self.image_paths, self.label_paths, strict=True):
            try:
                with Image.open(image_path) as im:
                    width, height = im.size
                    im.verify()
                labels = read_labels(label_path)
            except (OSError, SyntaxError, ValueError) as err:
                problems.append(f"{image_path.name} / {label_path.name}: unreadable ({err})")
                continue
            if labels.shape != (height, width):
                problems.append(
                    f"{label_path}: labels are {labels.shape[0]}x{labels.shape[1]} (HxW), its "
                    f"image {image_path.name} is {height}x{width}"
                )
                continue
            bad = (labels >= self.num_classes) & (labels != IGNORE_INDEX)
            if bad.any():
                values = sorted(set(np.unique(labels[bad]).tolist()))[:8]
                problems.append(
                    f"{label_path}: labels {values} outside [0, {self.num_classes}) and not "
                    f"{IGNORE_INDEX} (ignore), in {int(bad.sum())} pixels"
                )
        return problems

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.names)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        image, labels = _to_tensors(*self.load(index % n))
        if self.transform is not None:
            image, labels = self.transform(image, labels)
        return image, labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, num_classes={self.num_classes})"


class VOCSegmentation(SegmentationFiles):
    """PASCAL VOC 2012 semantic segmentation: ``JPEGImages/*.jpg`` + ``SegmentationClass/*.png``.

    Ids come from ``ImageSets/Segmentation/<split>.txt`` (``train`` 1,464, ``val`` 1,449,
    ``trainval`` 2,913 images in the real release; any other list file placed there works too).
    Labels are the palette indices of the PNGs: 0 = background, 1-20 the classes, 255 = the
    void band VOC draws around objects (ignored in losses and metrics).

    Args:
        root: the ``VOC2012`` directory, or ``VOCdevkit`` / its parent (see :func:`find_voc_root`).
        split: name of the list file in ``ImageSets/Segmentation`` without ``.txt``.
        num_classes: number of classes; labels outside ``[0, num_classes)`` other than 255 raise.
        transform: optional ``(image, labels) -> (image, labels)``, e.g.
            :func:`deepcrf.data.transforms.train_transform`.
        label_dir: folder of label PNGs under the VOC root (``SegmentationClassAug`` for the
            widely shared augmented-label PNGs).

    Shape:
        image:  (3, H, W) float32 RGB in 0-255
        labels: (H, W) int64, 255 = ignore

    Raises:
        FileNotFoundError: the split file or any listed image/label is missing (the message
            names the first few and the count).
        ValueError: the split file is empty or the root is not a VOC directory.

    Example:
        >>> ds = VOCSegmentation("~/VOCdevkit/VOC2012", "val")  # doctest: +SKIP
        >>> image, labels = ds[0]                                # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        num_classes: int = 21,
        transform: PairTransform | None = None,
        label_dir: str = "SegmentationClass",
    ) -> None:
        voc = find_voc_root(root)
        split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_file.parent.glob("*.txt"))
            raise FileNotFoundError(
                f"split {split!r} not found: no {split_file}; available splits: {available}"
            )
        names = read_split_file(split_file)
        self.root = voc
        self.split = split
        super().__init__(
            names,
            [voc / "JPEGImages" / f"{n}.jpg" for n in names],
            [voc / label_dir / f"{n}.png" for n in names],
            num_classes=num_classes,
            transform=transform,
        )

    def __repr__(self) -> str:
        return f"VOCSegmentation({str(self.root)!r}, split={self.split!r}, {len(self)} images)"
