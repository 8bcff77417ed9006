"""Image and label-map files: VOC palette PNGs (255 = ignore, drawn as cream) and SBD ``.mat``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .._atomic import atomic_path


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The VOC colour map: label ``k`` gets the colour built from the bits of ``k``.

    Returns:
        ``(num_colors, 3)`` uint8 array; entry 255 is VOC's cream (224, 224, 192) boundary colour.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for k in range(num_colors):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[k] = (r, g, b)
    return palette


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a palette (mode ``P``) or greyscale (mode ``L``) PNG of labels as ``(H, W)`` uint8.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image, or an RGB image (colours are not labels).
    """
    p = Path(path)
    with _opened(p, "label image") as im:
        mode = im.mode
        arr = np.array(im)
    if mode not in ("P", "L"):
        raise ValueError(
            f"label image {p} must be a palette (P) or greyscale (L) PNG of label ids; "
            f"got mode {mode}"
        )
    return arr.astype(np.uint8, copy=False)


def write_label_png(path: str | os.PathLike[str], labels: np.ndarray) -> None:
    """Write ``(H, W)`` integer labels in ``[0, 255]`` as a VOC palette PNG, atomically."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must be (H, W); got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels must not be empty")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"labels must lie in [0, 255]; got range [{arr.min()}, {arr.max()}]")
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    A 16-bit (or 32-bit integer) greyscale image is scaled to 0–255 (÷257 for 16 bits) and
    rounded, not clipped (PIL's own conversion clips everything above 255 to white).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is corrupt or not an image.
    """
    arr, _ = read_image_info(path)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8) if arr.dtype != np.uint8 else arr


def read_image_info(path: str | os.PathLike[str]) -> tuple[np.ndarray, str | None]:
    """Read an image as ``(H, W, 3)`` RGB in 0–255, with a note when it was rescaled.

    8-bit images come back as uint8 and no note. A 16-bit greyscale PNG/TIFF (PIL modes
    ``I;16*`` and ``I``) comes back as float32 scaled to 0–255 by 255/65535, keeping its
    precision, with a note that says so; a float (``F``) image is refused, since its range
    is unknown.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is corrupt, not an image, or a float image.
    """
    p = Path(path)
    with _opened(p, "image") as im:
        mode = im.mode
        if mode.startswith("I;16") or mode == "I":
            raw = np.array(im).astype(np.float64)
            note = f"{mode} ({'16' if mode != 'I' else '32'}-bit) image: scaled to 0-255"
            top = 65535.0 if mode != "I" or raw.max(initial=0) <= 65535 else 2.0**31 - 1
            grey = (raw * (255.0 / top)).astype(np.float32)
            return np.repeat(grey[..., None], 3, axis=2), f"{note} (x 255/{top:.0f})"
        if mode == "F":
            raise ValueError(
                f"image {p} holds floating-point pixels (mode F) of unknown range; save it "
                "as 8- or 16-bit"
            )
        return np.array(im.convert("RGB")), None


@contextlib.contextmanager
def _opened(path: Path, what: str) -> Iterator[Image.Image]:
    """The decoded image at ``path``; a missing or unreadable file raises naming ``what``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            yield im
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {what} {path} (corrupt or not an image): {err}") from err


def colorize(labels: np.ndarray) -> np.ndarray:
    """Map ``(H, W)`` labels to ``(H, W, 3)`` uint8 RGB with the VOC palette."""
    arr = np.asarray(labels)
    return voc_palette()[arr.astype(np.int64).clip(0, 255)]


def read_sbd_mat(path: str | os.PathLike[str]) -> np.ndarray:
    """Read the ``GTcls.Segmentation`` label map of an SBD ``cls/*.mat`` file as (H, W) uint8.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a MATLAB file, has no ``GTcls.Segmentation`` field, or the
            field is not a 2-D map of labels in [0, 255].
    """
    from scipy.io import loadmat

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SBD label file not found: {p}")
    try:
        mat = loadmat(p, squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read SBD label file {p} (corrupt or not a .mat): {err}") from err
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise ValueError(f"SBD label file {p} has no GTcls.Segmentation field")
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(
            f"GTcls.Segmentation in {p} must be a non-empty 2-D integer label map; got "
            f"shape {seg.shape}, dtype {seg.dtype}"
        )
    if seg.min() < 0 or seg.max() > 255:
        raise ValueError(
            f"GTcls.Segmentation in {p} must lie in [0, 255]; got [{seg.min()}, {seg.max()}]"
        )
    return seg.astype(np.uint8)


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label map, a VOC PNG or an SBD ``cls/*.mat``, as (H, W) uint8 (255 = ignore)."""
    if Path(path).suffix.lower() == ".mat":
        return read_sbd_mat(path)
    return read_label_png(path)
