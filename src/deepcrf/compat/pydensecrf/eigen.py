"""Stand-in for ``pydensecrf.eigen``: its matrix/vector helpers as numpy float32 arrays.

pydensecrf returns Eigen matrices that users turn into arrays with ``np.array``; the compat
layer returns numpy arrays directly, so these helpers only convert (and copy) their input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MatrixXf", "VectorXf", "matrixXf", "vectorXf"]


def matrixXf(a: Any) -> np.ndarray:
    """A float32 copy of a 2-D array, column-major like an Eigen ``MatrixXf``."""
    arr = np.array(a, dtype=np.float32, order="F")
    if arr.ndim != 2:
        raise ValueError(f"a must be 2-D; got shape {arr.shape}")
    return arr


def vectorXf(a: Any) -> np.ndarray:
    """A float32 copy of a 1-D array (Eigen ``VectorXf``)."""
    arr = np.array(a, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"a must be 1-D; got shape {arr.shape}")
    return arr


def MatrixXf(a: Any = None) -> np.ndarray:
    """An (empty by default) float32 matrix, as ``pydensecrf.eigen.MatrixXf()`` gives."""
    return np.zeros((0, 0), dtype=np.float32, order="F") if a is None else matrixXf(a)


def VectorXf(a: Any = None) -> np.ndarray:
    """An (empty by default) float32 vector, as ``pydensecrf.eigen.VectorXf()`` gives."""
    return np.zeros(0, dtype=np.float32) if a is None else vectorXf(a)
