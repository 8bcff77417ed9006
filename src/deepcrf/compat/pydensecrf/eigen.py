"""Stand-in for ``pydensecrf.eigen``: its matrix/vector helpers as numpy float32 arrays.

pydensecrf returns Eigen matrices that users turn into arrays with ``np.array``; the compat
layer returns numpy arrays directly, so these helpers only convert (and copy) their input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MatrixXf", "VectorXf", "matrixXf", "vectorXf"]


def _float32_buffer(a: Any, ndim: int) -> np.ndarray:
    """Check ``a`` as pydensecrf's typed ``float[...]`` buffer argument does."""
    if a is None:
        raise TypeError("Argument 'arr' must not be None")
    if not isinstance(a, np.ndarray):
        raise TypeError(f"arr must be a float32 numpy array (a buffer); got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"arr must be {ndim}-D; got shape {a.shape}")
    if a.dtype != np.float32:
        raise ValueError(
            f"arr must be float32 (as pydensecrf requires); got dtype {a.dtype}. "
            "Convert it with .astype(np.float32)"
        )
    return a


def matrixXf(a: Any) -> np.ndarray:
    """A float32 copy of a 2-D float32 array, column-major like an Eigen ``MatrixXf``."""
    return np.array(_float32_buffer(a, 2), dtype=np.float32, order="F")


def vectorXf(a: Any) -> np.ndarray:
    """A float32 copy of a 1-D float32 array (Eigen ``VectorXf``)."""
    return np.array(_float32_buffer(a, 1), dtype=np.float32)


def MatrixXf(a: Any = None) -> np.ndarray:
    """An (empty by default) float32 matrix, as ``pydensecrf.eigen.MatrixXf()`` gives."""
    return np.zeros((0, 0), dtype=np.float32, order="F") if a is None else matrixXf(a)


def VectorXf(a: Any = None) -> np.ndarray:
    """An (empty by default) float32 vector, as ``pydensecrf.eigen.VectorXf()`` gives."""
    return np.zeros(0, dtype=np.float32) if a is None else vectorXf(a)
