"""Drop-in replacement for ``pydensecrf.densecrf`` running on deepcrf's permutohedral lattice.

Swap ``import pydensecrf.densecrf as dcrf`` for
``import deepcrf.compat.pydensecrf.densecrf as dcrf``: the classes, methods, argument names,
defaults, constants and return shapes are pydensecrf's, and the numbers are too — the lattice
is built in :class:`~deepcrf.ops.permutohedral.PermutohedralLattice`'s
``pydensecrf_compatible`` mode and inference is the mean-field engine's
(:mod:`deepcrf.ops.meanfield`), which reproduces densecrf's feature scaling, blur and final
scale bit for bit up to float summation order.

Mean field as pydensecrf computes it (Krähenbühl & Koltun 2011, eq. 4/5, pydensecrf signs):

    Q⁰ = softmax(−U),   Qᵗ⁺¹ = softmax(−U − Σ_m C_m(N_m K_m N'_m Qᵗ))

with K_m the lattice filter (j = i included), N_m / N'_m the normalisation of each term and
C_m the label compatibility: Potts ``w`` applies −w·x, a vector ``w`` applies +diag(w)·x, a
matrix ``M`` applies +½(M + Mᵀ)·x.  In deepcrf's energy convention (μ a penalty) the Potts term
``w`` is μ = w·[l ≠ l′] (they differ by a per-pixel constant that the softmax removes), and
a matrix/vector compatibility is μ = ½(M + Mᵀ) as given (docs/densecrf.md).

Inputs are checked as pydensecrf's typed buffers check them: arrays must be float32 numpy
arrays (another dtype raises ``ValueError``, a list or None ``TypeError``), ``compat`` is a
number or a float32 array, ``setUnaryEnergy(u, f)`` takes u as (L, N), ``LogisticUnary(L, f)``
is the energy L·f (tests/compat/test_pydensecrf.py runs these cases against pydensecrf itself
when it is installed).  Differences from pydensecrf, all of them stricter checks with clear
messages (pydensecrf silently reads out of bounds or crashes in these cases): diagonal/matrix
compatibilities must match the label count, unaries must be finite, images must be non-empty
uint8 (H, W, 3), a logistic unary's feature dimensions must agree.  The one leniency:
non-contiguous float32 arrays are accepted (pydensecrf raises), with the same results.
``inference`` and ``startInference`` return numpy float32 arrays of shape (L, N)
(column-major like pydensecrf's Eigen matrices, so ``np.array(...)``, ``.reshape``,
``np.argmax(..., axis=0)`` behave the same).
"""

from __future__ import annotations

import enum
from numbers import Number
from typing import Any

import numpy as np
import torch

from deepcrf.ops.meanfield import KernelOp, PairwiseTerm, mean_field, step

__all__ = [
    "CONST_KERNEL",
    "DIAG_KERNEL",
    "FULL_KERNEL",
    "NORMALIZE_AFTER",
    "NORMALIZE_BEFORE",
    "NORMALIZE_SYMMETRIC",
    "NO_NORMALIZATION",
    "ConstUnary",
    "DenseCRF",
    "DenseCRF2D",
    "KernelType",
    "LogisticUnary",
    "NormalizationType",
    "Unary",
]


class KernelType(enum.IntEnum):
    """pydensecrf's kernel parametrisation (only matters for its learning code)."""

    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(enum.IntEnum):
    """pydensecrf's kernel normalisation modes."""

    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL = KernelType.CONST_KERNEL
DIAG_KERNEL = KernelType.DIAG_KERNEL
FULL_KERNEL = KernelType.FULL_KERNEL
NO_NORMALIZATION = NormalizationType.NO_NORMALIZATION
NORMALIZE_BEFORE = NormalizationType.NORMALIZE_BEFORE
NORMALIZE_AFTER = NormalizationType.NORMALIZE_AFTER
NORMALIZE_SYMMETRIC = NormalizationType.NORMALIZE_SYMMETRIC


def _float32_matrix(x: Any, name: str, shape: tuple[int | None, int | None]) -> np.ndarray:
    """Check a 2-D float32 array (pydensecrf's ``float[:, ::1]``) and return it as an array."""
    arr = np.asarray(x)
    if arr.dtype != np.float32:
        raise ValueError(
            f"{name} must be a float32 array (as pydensecrf requires); got dtype {arr.dtype}. "
            "Convert it with .astype(np.float32)"
        )
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D {shape}; got shape {arr.shape}")
    for axis, want in enumerate(shape):
        if want is not None and arr.shape[axis] != want:
            raise ValueError(f"{name} must have shape {shape}; got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; found {int((~np.isfinite(arr)).sum())} NaN/inf")
    return arr


def _kernel_type(kernel: Any) -> KernelType:
    try:
        return KernelType(int(kernel))
    except (TypeError, ValueError):
        raise ValueError(
            f"kernel must be CONST_KERNEL, DIAG_KERNEL or FULL_KERNEL; got {kernel!r}"
        ) from None


def _normalization(normalization: Any) -> NormalizationType:
    try:
        return NormalizationType(int(normalization))
    except (TypeError, ValueError):
        raise ValueError(
            "normalization must be NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER or "
            f"NORMALIZE_SYMMETRIC; got {normalization!r}"
        ) from None


class Unary:
    """Base class of the unary energies accepted by :meth:`DenseCRF.setUnary`."""

    def _energy(self, nlabels: int, nvar: int) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} is not a concrete unary")


class ConstUnary(Unary):
    """A fixed unary energy U (L, N), float32: pydensecrf's ``ConstUnary``."""

    def __init__(self, u: Any) -> None:
        self.u = _float32_matrix(u, "u", (None, None)).copy()

    def _energy(self, nlabels: int, nvar: int) -> np.ndarray:
        if self.u.shape != (nlabels, nvar):
            raise ValueError(
                f"unary energy must have shape (labels, variables) = {(nlabels, nvar)}; "
                f"got {self.u.shape}"
            )
        return self.u


class LogisticUnary(Unary):
    """Unary energy L·f of a linear classifier: pydensecrf's ``LogisticUnary``.

    densecrf's ``LogisticUnaryEnergy`` returns ``L * f`` as the energy (lower is likelier), so
    the labels whose scores L·f are *smallest* win, as in pydensecrf.

    Args:
        L: classifier weights (labels, feature dim), float32.
        f: per-variable features (feature dim, variables), float32.
    """

    def __init__(self, L: Any, f: Any) -> None:
        self.weights = _float32_matrix(L, "L", (None, None)).copy()
        self.features = _float32_matrix(f, "f", (self.weights.shape[1], None)).copy()

    def _energy(self, nlabels: int, nvar: int) -> np.ndarray:
        if self.weights.shape[0] != nlabels or self.features.shape[1] != nvar:
            raise ValueError(
                f"LogisticUnary must give (labels, variables) = {(nlabels, nvar)}; got L "
                f"{self.weights.shape} and f {self.features.shape}"
            )
        return self.weights @ self.features


class _Pairwise:
    """One pairwise term: pydensecrf's lattice, normalisation and compatibility as an engine term.

    pydensecrf subtracts ``C(N K N' q)`` from −U; the engine adds ``K̄q ∘ A`` to its base, so a
    Potts weight w is A = w, a vector d is A = −d, a matrix M is A = −½(M + Mᵀ).
    """

    def __init__(
        self,
        features: np.ndarray,
        compat: Any,
        kernel: KernelType,
        normalization: NormalizationType,
        nlabels: int,
    ) -> None:
        # features: (N, D) float32, point-major (the lattice's layout)
        self.kernel = kernel
        self.normalization = normalization
        feats = torch.from_numpy(np.ascontiguousarray(features))[None]
        op = KernelOp(feats, pydensecrf_compatible=True)
        del feats
        n = features.shape[0]
        # densecrf normalises with the filtered constant image, computed once per term.  The
        # per-pixel arithmetic is numpy's (single-threaded: an OpenMP region here would leave
        # torch's workers spinning on the cores the lattice kernel uses next).
        norm = op.row_sums(torch.float32)[:, 0].numpy()
        if normalization == NORMALIZE_SYMMETRIC:
            norm = np.float32(1.0) / np.sqrt(norm + np.float32(1e-20))
        elif normalization == NO_NORMALIZATION:
            # Computed (as densecrf does) but unused by its filter.
            norm = np.full_like(norm, n / float(norm.sum()))
        else:
            norm = np.float32(1.0) / (norm + np.float32(1e-20))
        factor = torch.from_numpy(np.ascontiguousarray(norm, dtype=np.float32))[:, None]
        pre = factor if normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_BEFORE) else None
        post = factor if normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_AFTER) else None
        self.mode, coef = self._label_map(compat, nlabels)
        self.term = PairwiseTerm(op, pre, post, coef)

    @staticmethod
    def _label_map(compat: Any, nlabels: int) -> tuple[str, torch.Tensor]:
        # pydensecrf: a Python or numpy number is a Potts weight; anything else must be a
        # float32 array (a typed buffer: other dtypes raise ValueError, non-buffers TypeError)
        if isinstance(compat, (Number, np.number)):  # True is 1, as in pydensecrf
            value = float(np.float32(compat)) if np.isfinite(float(compat)) else float("nan")
            if not np.isfinite(value):
                raise ValueError(f"compat must be finite (a float32 number); got {compat!r}")
            return "potts", torch.tensor(value)
        if not isinstance(compat, np.ndarray):
            raise TypeError(
                "compat must be a number (Potts), or a float32 numpy vector (diagonal) or "
                f"matrix, as in pydensecrf; got {type(compat).__name__}"
            )
        arr = compat
        if arr.dtype == np.float32 and not np.isfinite(arr).all():
            raise ValueError("compat must be finite; the array holds NaN/inf")
        if arr.dtype != np.float32:
            raise ValueError(
                f"compat arrays must be float32 (as pydensecrf requires); got dtype {arr.dtype}. "
                "Convert it with .astype(np.float32)"
            )
        if arr.ndim == 1:
            if arr.shape[0] != nlabels:
                raise ValueError(
                    f"compat as a vector (diagonal compatibility) must have one entry per label "
                    f"({nlabels}); got shape {arr.shape}"
                )
            return "diag", -torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())
        if arr.ndim == 2:
            if arr.shape != (nlabels, nlabels):
                raise ValueError(
                    f"compat as a matrix must be (labels, labels) = {(nlabels, nlabels)}; "
                    f"got {arr.shape}"
                )
            m = np.asarray(arr, dtype=np.float32)
            # densecrf stores ½(M + Mᵀ) and applies it as out = M_sym · x (labels × labels).
            sym = (np.float32(0.5) * (m + m.T)).astype(np.float32)
            return "matrix", -torch.from_numpy(sym)
        raise ValueError(
            "compat must be a number (Potts), a vector (diagonal) or a matrix; "
            f"got an array of shape {arr.shape} (LabelCompatibility of dimension >2 not "
            "meaningful)"
        )

    def message(self, q: torch.Tensor) -> torch.Tensor:
        """The term pydensecrf subtracts from −U: C(N K N' q) = −(K̄q ∘ A), q (N, L) float32."""
        t = self.term
        x = t.op.apply(q, False, t.pre, t.post)
        if t.coef.dim() == 2:
            return -(x @ t.coef)
        return -(x * t.coef)


class DenseCRF:
    """Fully connected CRF over N variables and L labels (pydensecrf's ``DenseCRF``).

    Mean-field inference of Krähenbühl & Koltun (2011) with pydensecrf's conventions (see the
    module docstring); pairwise features are given explicitly with :meth:`addPairwiseEnergy`.

    Args:
        nvar: number of variables N (pixels).
        nlabels: number of labels L.

    Shape:
        setUnaryEnergy(u):      u (L, N) float32, energy = −log p
        addPairwiseEnergy(f):   f (D, N) float32, features divided by their bandwidths
        inference(n) -> Q:      (L, N) float32 marginals
    """

    def __init__(self, nvar: int, nlabels: int) -> None:
        self._nvar = self._positive_int(nvar, "nvar")
        self._nlabel = self._positive_int(nlabels, "nlabels")
        # Only −U is stored (what every step uses), as (N, L) with labels contiguous.
        self._neg_unary: torch.Tensor | None = None
        self._pairwise: list[_Pairwise] = []

    @staticmethod
    def _positive_int(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
        return int(value)

    # ------------------------------------------------------------------ model
    def setUnaryEnergy(self, u: Any, f: Any = None) -> None:
        """Set the unary energy U (L, N) float32 (−log p); with ``f``, the logistic u·f.

        As in pydensecrf, ``u`` must be (L, N) float32 in both forms (with ``f`` it is the
        classifier's weights, so f must then be (N, N)); :meth:`setUnary` with a
        :class:`LogisticUnary` takes any feature dimension.
        """
        if f is not None:
            arr = _float32_matrix(u, "u", (None, None))
            if arr.shape != (self._nlabel, self._nvar):
                raise ValueError(
                    f"Bad shape for unary energy (Need {(self._nlabel, self._nvar)}, got "
                    f"{arr.shape}): with f, pydensecrf still takes u as (labels, variables); "
                    "use setUnary(LogisticUnary(L, f)) for other feature dimensions"
                )
            self.setUnary(LogisticUnary(arr, f))
            return
        if u is None:
            raise TypeError("Argument 'u' must not be None (a float32 (labels, variables) array)")
        arr = np.asarray(u)
        if arr.ndim == 3 and arr.shape[0] == self._nlabel and arr[0].size == self._nvar:
            raise ValueError(
                f"unary energy must be 2-D (labels, variables) = {(self._nlabel, self._nvar)}; "
                f"got shape {arr.shape}: reshape it with u.reshape({self._nlabel}, -1)"
            )
        if arr.ndim == 2 and arr.shape[0] != self._nlabel and arr.shape[1] == self._nlabel:
            raise ValueError(
                f"unary energy must be (labels, variables) = {(self._nlabel, self._nvar)}; got "
                f"{arr.shape}, which looks transposed"
            )
        if arr.ndim == 2 and arr.shape[0] != self._nlabel:
            raise ValueError(
                f"unary energy has {arr.shape[0]} labels but the CRF was created with "
                f"{self._nlabel}: unary must be (labels, variables) = "
                f"{(self._nlabel, self._nvar)}; got {arr.shape}"
            )
        arr = _float32_matrix(arr, "unary energy", (self._nlabel, self._nvar))
        self._neg_unary = torch.from_numpy(np.negative(arr.T, order="C"))

    def setUnary(self, u: Unary) -> None:
        """Set a :class:`ConstUnary` or :class:`LogisticUnary` energy."""
        if not isinstance(u, Unary):
            raise TypeError(f"u must be a ConstUnary or LogisticUnary; got {type(u).__name__}")
        energy = u._energy(self._nlabel, self._nvar).astype(np.float32)
        if not np.isfinite(energy).all():
            raise ValueError("unary energy must be finite")
        self._neg_unary = torch.from_numpy(np.negative(energy.T, order="C"))

    def addPairwiseEnergy(
        self,
        features: Any,
        compat: Any,
        kernel: Any = DIAG_KERNEL,
        normalization: Any = NORMALIZE_SYMMETRIC,
    ) -> None:
        """Add a Gaussian pairwise term exp(−½‖f_i − f_j‖²) with features (D, N) float32.

        Args:
            features: per-variable features already divided by their bandwidths, (D, N).
            compat: label compatibility — a number (Potts weight w), a vector (L,) (diagonal)
                or a matrix (L, L) (symmetrised as densecrf does).
            kernel: ``DIAG_KERNEL`` (default), ``CONST_KERNEL`` or ``FULL_KERNEL``; only
                pydensecrf's learning code uses it, inference is identical.
            normalization: ``NORMALIZE_SYMMETRIC`` (default), ``NORMALIZE_BEFORE``,
                ``NORMALIZE_AFTER`` or ``NO_NORMALIZATION``.
        """
        arr = np.asarray(features)
        if arr.ndim == 2 and arr.shape[1] != self._nvar and arr.shape[0] == self._nvar:
            raise ValueError(
                f"features must be (D, variables) = (D, {self._nvar}); got {arr.shape}, which "
                "looks transposed"
            )
        arr = _float32_matrix(arr, "features", (None, self._nvar))
        self._add(arr.T, compat, kernel, normalization, "features (too large)")

    def _add(
        self,
        features: np.ndarray,
        compat: Any,
        kernel: Any,
        normalization: Any,
        scales: str = "features",
    ) -> None:
        """Append a term; ``features`` (N, D) float32, finite; ``scales`` names their source."""
        try:
            term = _Pairwise(
                features, compat, _kernel_type(kernel), _normalization(normalization), self._nlabel
            )
        except ValueError as err:
            if "features reach" not in str(err):
                raise
            raise ValueError(f"{scales}: {err}") from err
        self._pairwise.append(term)

    # ------------------------------------------------------------------ inference
    def _negative_unary(self) -> torch.Tensor:
        if self._neg_unary is None:
            return torch.zeros(self._nvar, self._nlabel, dtype=torch.float32)
        return self._neg_unary

    def _step(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One mean-field update; returns (new Q, its logits −U − Σ messages, last message)."""
        logits = step(self._negative_unary(), q, [t.term for t in self._pairwise])
        last = self._pairwise[-1].message(q) if self._pairwise else None
        return torch.softmax(logits, dim=1), logits, last

    @staticmethod
    def _to_numpy(x: torch.Tensor) -> np.ndarray:
        # (N, L) row-major is (L, N) column-major: the layout of pydensecrf's Eigen matrices.
        return x.numpy().T

    def _read_q(self, q: Any, name: str = "Q") -> np.ndarray:
        arr = np.asarray(q)
        if arr.dtype != np.float32 or arr.shape != (self._nlabel, self._nvar):
            raise ValueError(
                f"{name} must be a float32 array of shape (labels, variables) = "
                f"{(self._nlabel, self._nvar)}; got {arr.dtype} {arr.shape}"
            )
        return arr

    def inference(self, niter: int) -> np.ndarray:
        """Run ``niter`` mean-field iterations from softmax(−U); return Q (L, N) float32."""
        if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 0:
            raise ValueError(f"niter must be a non-negative integer; got {niter!r}")
        with torch.no_grad():
            neg_unary = self._negative_unary().contiguous()
            terms = [t.term for t in self._pairwise]
            # The engine: with Potts terms on the compiled kernel the whole loop is one fused
            # pass over the pixels per iteration.
            q = mean_field(neg_unary, terms, int(niter), probabilities=True)
        return self._to_numpy(q)

    def startInference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (Q⁰ = softmax(−U), tmp1, tmp2) for :meth:`stepInference`, each (L, N)."""
        with torch.no_grad():
            q = torch.softmax(self._negative_unary(), dim=1).contiguous()
        zeros = np.zeros((self._nlabel, self._nvar), dtype=np.float32, order="F")
        return self._to_numpy(q), zeros, zeros.copy(order="F")

    def stepInference(self, Q: Any, tmp1: Any, tmp2: Any) -> None:
        """One mean-field step in place: Q ← softmax(tmp1), tmp1 = −U − Σ messages.

        As in pydensecrf, ``tmp2`` receives the last pairwise term's message.  ``Q``, ``tmp1``
        and ``tmp2`` must be writable float32 arrays of shape (L, N) (as startInference gives).
        """
        q_arr = self._read_q(Q, "Q")
        t1 = self._read_q(tmp1, "tmp1")
        t2 = self._read_q(tmp2, "tmp2")
        with torch.no_grad():
            q = torch.from_numpy(np.ascontiguousarray(q_arr.T))
            new_q, logits, last = self._step(q)
        q_arr[...] = new_q.numpy().T
        t1[...] = logits.numpy().T
        if last is not None:
            t2[...] = last.numpy().T

    def klDivergence(self, Q: Any) -> float:
        """KL(Q‖P) up to the log-partition: Σ Q log Q + Σ U·Q + Σ_m Σ Q·message_m(Q)."""
        q_arr = self._read_q(Q, "Q")
        with torch.no_grad():
            q = torch.from_numpy(np.ascontiguousarray(q_arr.T))
            qd = q.double()
            kl = float((qd * torch.log(torch.clamp(q, min=1e-20)).double()).sum())
            if self._neg_unary is not None:
                kl -= float((self._neg_unary.double() * qd).sum())
            for term in self._pairwise:
                kl += float((qd * term.message(q).double()).sum())
        return kl


class DenseCRF2D(DenseCRF):
    """Fully connected CRF on a W × H image grid (pydensecrf's ``DenseCRF2D(w, h, nlabels)``).

    Variables are pixels in row-major order (index y·W + x), the layout of ``image.reshape(-1)``
    for an (H, W) array.  Note the argument order: width first, as in pydensecrf.

    Args:
        w: image width W in pixels.
        h: image height H in pixels.
        nlabels: number of labels L.

    Shape:
        setUnaryEnergy(u):            u (L, H·W) float32
        addPairwiseBilateral(rgbim):  rgbim (H, W, 3) uint8
        inference(n) -> Q:            (L, H·W) float32
    """

    def __init__(self, w: int, h: int, nlabels: int) -> None:
        self._w = self._positive_int(w, "w")
        self._h = self._positive_int(h, "h")
        super().__init__(self._w * self._h, nlabels)

    def _grid_features(self, sx: np.float32, sy: np.float32, extra: int) -> np.ndarray:
        """(N, 2 + extra) float32 features: columns x / sx and y / sy filled, the rest not.

        Built point-major in place (no (D, N) array to transpose).  The division is float32,
        as densecrf computes i / sx (no reciprocal multiply).
        """
        xs = np.arange(self._w, dtype=np.float32) / sx
        ys = np.arange(self._h, dtype=np.float32) / sy
        if not (np.isfinite(xs[-1]) and np.isfinite(ys[-1])):
            raise ValueError(
                f"sxy is too small: the pixel positions divided by it overflow float32; got "
                f"{(float(sx), float(sy))}"
            )
        features = np.empty((self._h, self._w, 2 + extra), dtype=np.float32)
        features[..., 0] = xs[None, :]
        features[..., 1] = ys[:, None]
        return features.reshape(self._nvar, 2 + extra)

    @staticmethod
    def _pair(value: Any, name: str, count: int) -> list[np.float32]:
        try:
            items = [value] * count if isinstance(value, Number) else list(value)
        except TypeError:
            raise TypeError(f"{name} must be a number or {count} numbers; got {value!r}") from None
        if len(items) != count or isinstance(value, (str, bytes)):
            raise ValueError(f"{name} must be a number or {count} numbers; got {value!r}")
        out = []
        for item in items:
            try:
                v = np.float32(item)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must hold numbers; got {value!r}") from None
            if not (v > 0) or not np.isfinite(v):
                raise ValueError(f"{name} must be finite and positive; got {value!r}")
            out.append(v)
        return out

    def addPairwiseGaussian(
        self,
        sxy: Any,
        compat: Any,
        kernel: Any = DIAG_KERNEL,
        normalization: Any = NORMALIZE_SYMMETRIC,
    ) -> None:
        """Add the smoothness kernel exp(−|p_i − p_j|²/2·sxy²) (θγ = sxy, in pixels).

        Args:
            sxy: spatial standard deviation θγ in pixels, a number or (sx, sy).
            compat: label compatibility (see :meth:`DenseCRF.addPairwiseEnergy`).
            kernel: kernel type constant.
            normalization: normalisation constant.
        """
        sx, sy = self._pair(sxy, "sxy", 2)
        self._add(self._grid_features(sx, sy, 0), compat, kernel, normalization, "sxy too small")

    def addPairwiseBilateral(
        self,
        sxy: Any,
        srgb: Any,
        rgbim: Any,
        compat: Any,
        kernel: Any = DIAG_KERNEL,
        normalization: Any = NORMALIZE_SYMMETRIC,
    ) -> None:
        """Add the appearance kernel exp(−|p_i − p_j|²/2θα² − |I_i − I_j|²/2θβ²).

        Args:
            sxy: spatial standard deviation θα in pixels, a number or (sx, sy).
            srgb: colour standard deviation θβ in 0–255 units, a number or (sr, sg, sb).
            rgbim: the image, uint8 (H, W, 3) — height first, unlike the constructor.
            compat: label compatibility (see :meth:`DenseCRF.addPairwiseEnergy`).
            kernel: kernel type constant.
            normalization: normalisation constant.
        """
        sx, sy = self._pair(sxy, "sxy", 2)
        channel_scales = self._pair(srgb, "srgb", 3)
        if not isinstance(rgbim, np.ndarray):
            raise TypeError(f"rgbim must be a numpy uint8 array (H, W, 3); got {type(rgbim)}")
        if rgbim.dtype != np.uint8:
            raise ValueError(
                f"rgbim must be uint8 (colour in 0-255) of shape (H, W, 3) = "
                f"({self._h}, {self._w}, 3); got dtype {rgbim.dtype}"
            )
        if rgbim.size == 0:
            raise ValueError(f"rgbim must not be empty; got shape {rgbim.shape}")
        if rgbim.ndim != 3 or rgbim.shape[:2] != (self._h, self._w):
            hint = ""
            if rgbim.ndim == 3 and rgbim.shape[:2] == (self._w, self._h):
                hint = (
                    " — it looks like (W, H, 3): DenseCRF2D takes (W, H, L) but the image is "
                    "indexed (H, W, 3)"
                )
            raise ValueError(
                f"rgbim must have shape (H, W, 3) = ({self._h}, {self._w}, 3) for "
                f"DenseCRF2D(w={self._w}, h={self._h}); got {rgbim.shape}{hint}"
            )
        if rgbim.shape[2] != 3:
            raise ValueError(
                f"rgbim must have 3 colour channels (H, W, 3); got {rgbim.shape}. For other "
                "images build the features with utils.create_pairwise_bilateral and use "
                "addPairwiseEnergy"
            )
        for scale in channel_scales:
            if not np.isfinite(np.float32(255) / scale):
                raise ValueError(
                    f"srgb is too small: colours divided by it overflow float32; got {srgb!r}"
                )
        features = self._grid_features(sx, sy, 3)
        grid = features.reshape(self._h, self._w, 5)
        for c in range(3):  # float32 colour / srgb, as densecrf (in place: no temporaries)
            grid[..., 2 + c] = rgbim[..., c]
            grid[..., 2 + c] /= channel_scales[c]
        self._add(features, compat, kernel, normalization, "sxy or srgb too small")
