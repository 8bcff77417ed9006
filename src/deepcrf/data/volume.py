"""Volume files for ``deepcrf refine``: ``.npy`` arrays and NIfTI (``.nii``, ``.nii.gz``).

NIfTI goes through nibabel, an optional extra (``pip install "deepcrf[medical]"``). Arrays
keep the file's axis order (nibabel's is x, y, z); the voxel spacing comes from the header
(``pixdim``, in the file's units, usually mm), and a label volume is written with the
reference's affine and header so that viewers overlay it on the input. ``.npy`` volumes carry
no spacing (pass ``--spacing``). Every write is atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_path

__all__ = ["VOLUME_SUFFIXES", "Volume", "is_volume_path", "read_volume", "write_label_volume"]

VOLUME_SUFFIXES = (".npy", ".nii", ".nii.gz")


@dataclass
class Volume:
    """An array read from a volume file, with what is known of its geometry.

    Attributes:
        data: the array, in the file's axis order.
        spacing: voxel size per spatial axis from a NIfTI header, else None.
        nifti: the nibabel image it came from (affine, header), else None.
        path: the file.
    """

    data: np.ndarray
    spacing: tuple[float, ...] | None
    nifti: Any
    path: Path


def volume_suffix(path: str | os.PathLike[str]) -> str:
    """``.npy``, ``.nii`` or ``.nii.gz`` (lower case), or the file's last suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_volume_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii``, ``.nii.gz``)."""
    return volume_suffix(path) in (".nii", ".nii.gz")


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError as err:
        raise ImportError(
            'NIfTI files need nibabel, an optional extra: pip install "deepcrf[medical]" '
            "(or pip install nibabel)"
        ) from err
    return nibabel


def read_volume(path: str | os.PathLike[str], *, spatial_dims: int | None = None) -> Volume:
    """Read a ``.npy`` array or a NIfTI image (intensities with the header's scaling applied).

    Args:
        path: the file.
        spatial_dims: how many leading axes are spatial (for the spacing of a 4-D NIfTI whose
            last axis holds modalities); None = min(ndim, 3).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, not an array, or an unknown suffix.
        ImportError: a NIfTI file without nibabel (says which extra to install).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"volume not found: {p}")
    suffix = volume_suffix(p)
    if suffix == ".npy":
        try:
            data = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {p} as a .npy array: {err}") from err
        return Volume(data, None, None, p)
    if suffix not in (".nii", ".nii.gz"):
        raise ValueError(f"{p}: a volume must be {', '.join(VOLUME_SUFFIXES)}; got {suffix!r}")
    nib = _nibabel()
    try:
        image = nib.load(str(p))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types for damaged files
        raise ValueError(f"cannot read NIfTI file {p}: {err}") from err
    dims = min(data.ndim, 3) if spatial_dims is None else spatial_dims
    zooms = tuple(float(z) for z in image.header.get_zooms()[:dims])
    spacing = zooms if len(zooms) == dims and all(z > 0 for z in zooms) else None
    return Volume(data, spacing, image, p)


def write_label_volume(
    path: str | os.PathLike[str], labels: np.ndarray, like: Volume | None = None
) -> None:
    """Write integer labels as ``.npy`` or NIfTI (with ``like``'s affine and header), atomically.

    uint8 when every label fits, else uint16 (more than 255 labels).

    Raises:
        ValueError: labels outside [0, 65535] or an unknown suffix.
        ImportError: a NIfTI output without nibabel.
    """
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"labels must lie in [0, 65535]; got [{arr.min()}, {arr.max()}]")
    arr = arr.astype(np.uint8 if arr.size == 0 or arr.max() <= 255 else np.uint16)
    suffix = volume_suffix(path)
    if suffix == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr)
        return
    if suffix not in (".nii", ".nii.gz"):
        raise ValueError(f"{path}: a label volume is written as .npy, .nii or .nii.gz")
    nib = _nibabel()
    if like is not None and like.nifti is not None:
        header = like.nifti.header.copy()
        image = nib.Nifti1Image(arr, like.nifti.affine, header=header)
    else:
        image = nib.Nifti1Image(arr, np.eye(4))
    image.set_data_dtype(arr.dtype)
    image.header.set_slope_inter(1.0, 0.0)  # labels are stored as they are, never scaled
    payload = image.to_bytes()
    if suffix == ".nii.gz":
        payload = gzip.compress(payload, compresslevel=6)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
