"""Datasets, palette PNG I/O and joint transforms for semantic segmentation.

Every dataset yields ``(image (3, H, W) float32 RGB in 0-255, labels (H, W) int64)`` with
255 = ignore. ``--data`` / ``root`` points at ``VOCdevkit/VOC2012`` (its parents are accepted).
"""

from ..metrics import IGNORE_INDEX
from .palette import (
    colorize,
    read_image,
    read_label_png,
    read_labels,
    read_sbd_mat,
    voc_palette,
    write_label_png,
)
from .sbd import SBDSegmentation, build_dataset, find_sbd_root, train_aug
from .synthetic import SyntheticSegmentation
from .transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    rescale,
    train_transform,
)
from .voc import VOC_CLASSES, SegmentationFiles, VOCSegmentation, find_voc_root, read_split_file

__all__ = [
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScale",
    "SBDSegmentation",
    "SegmentationFiles",
    "SyntheticSegmentation",
    "VOCSegmentation",
    "build_dataset",
    "colorize",
    "find_sbd_root",
    "find_voc_root",
    "read_image",
    "read_label_png",
    "read_labels",
    "read_sbd_mat",
    "read_split_file",
    "rescale",
    "train_aug",
    "train_transform",
    "voc_palette",
    "write_label_png",
]
