r"""Deep Gaussian CRF (Chandra & Kokkinos 2016): exact inference by one SPD linear solve.

The energy over real-valued per-label scores ``x`` (``L`` labels, ``N = H·W`` pixels) is

    E(x) = Σ_l [ ½ x_lᵀ (λI + L_W) x_l − u_lᵀ x_l ]                                   (1)

with ``u`` the unary scores (a CNN's logits) and ``L_W = D_W − W`` the graph Laplacian of
non-negative pixel affinities ``w_ij`` computed from learned pixel embeddings.  Its unique
minimiser solves

    (λI + L_W) x_l = u_l        for every label l,                                     (2)

which is the paper's ``(A + λI) x = B`` with ``A = L_W`` and ``B = u``.  The pairwise term is
shared by all labels ("Potts-type" in the paper): one ``N×N`` matrix, ``L`` right-hand sides.
Because ``x_lᵀ L_W x_l = ½ Σ_ij w_ij (x_il − x_jl)²`` with ``w_ij ≥ 0``, ``L_W`` is positive
semi-definite and ``λI + L_W`` is symmetric positive definite with smallest eigenvalue ``≥ λ``
*by construction*, for any embeddings.  The pairwise term is attractive: it pulls the scores
of similar pixels together, never apart.

Two pairwise graphs:

- local (``connectivity=4`` or ``8``, ``radius=r``): ``w_ij = β·exp(−|e_i − e_j|²)`` for the
  pixels ``j`` in a diamond (4) or square (8) window of radius ``r`` around ``i``, the paper's
  local neighbourhood.
- dense (``connectivity="dense"``): every pixel pair, through a low-rank product,
  ``w_ij = (β/N)·φ(e_i)·φ(e_j)`` with ``φ = softmax`` over the embedding channels (a soft
  assignment to ``D`` clusters, so ``w_ij ≥ 0``; ``/N`` keeps every degree ``≤ β`` whatever the
  resolution).  ``W v = Φᵀ(Φ v)`` costs ``O(N·D·L)``; the ``N×N`` matrix is never formed.
  This is the dense, low-rank G-CRF of Chandra, Usunier & Kokkinos (2017), in a Laplacian form
  that keeps the system positive definite.

:class:`MultiScaleGaussianCRF` stacks two or three resolutions into one system: each scale has
its own (1), and each pixel of a finer scale is tied to its parent at the next coarser one by
``c_p (x_p − x_parent(p))²`` with ``c_p = γ·exp(−|e_p − e_parent(p)|²)``: the Laplacian of a
bipartite graph, so the joint matrix stays SPD and all scales are solved at once.

Inference is :func:`deepcrf.ops.cg.conjugate_gradient` (Jacobi preconditioned); gradients are
its closed-form adjoint solve, never back-propagation through the iterations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from deepcrf._checks import (
    check_int,
    check_positive,
    check_positive_scalar,
    check_tensor,
    to_tensor,
)
from deepcrf.ops.cg import CGInfo, conjugate_gradient

__all__ = [
    "GaussianCRF",
    "MultiScaleGaussianCRF",
    "gaussian_crf",
    "gaussian_crf_energy",
    "multiscale_gaussian_crf",
    "multiscale_gaussian_crf_energy",
]

Connectivity = int | str
_Scalar = float | torch.Tensor


# ----------------------------------------------------------------------------------------------
# Pairwise graphs: affinities from embeddings, the Laplacian product and its diagonal.
# ----------------------------------------------------------------------------------------------


def _window_offsets(connectivity: int, radius: int) -> list[tuple[int, int]]:
    """Half of a symmetric neighbourhood: each undirected edge appears once."""
    out = []
    for dy in range(0, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx <= 0:
                continue
            if connectivity == 4 and abs(dy) + abs(dx) > radius:
                continue
            out.append((dy, dx))
    return out


def _edge_slices(dy: int, dx: int, height: int, width: int) -> tuple[tuple[slice, slice], ...]:
    """Slices (rows, cols) of the pixels p and q = p + (dy, dx) of every in-image edge."""
    # Offsets larger than the image give empty slices (no edge), never negative bounds.
    rows = max(0, height - dy)
    cols = max(0, width - abs(dx))
    start = max(0, -dx) if cols else 0
    p = (slice(0, rows), slice(start, start + cols))
    q = (slice(dy, dy + rows), slice(start + dx, start + dx + cols) if cols else slice(0, 0))
    return p, q


class _LocalGraph:
    """Affinities over a local window; weights stored as ``(B, K, H, W)``, one map per offset."""

    def __init__(self, connectivity: int, radius: int) -> None:
        self.offsets = _window_offsets(connectivity, radius)

    def affinities(self, emb: torch.Tensor, beta: _Scalar) -> torch.Tensor:
        _, _, height, width = emb.shape
        maps = []
        for dy, dx in self.offsets:
            (pr, pc), (qr, qc) = _edge_slices(dy, dx, height, width)
            dist2 = (emb[:, :, pr, pc] - emb[:, :, qr, qc]).pow(2).sum(1)
            w = beta * torch.exp(-dist2)
            # Edges leaving the image get weight 0 (pad at the far side of p's slice).
            pad = (pc.start, width - pc.stop, 0, height - pr.stop)
            maps.append(torch.nn.functional.pad(w, pad))
        return torch.stack(maps, dim=1)

    def laplacian(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        out = torch.zeros_like(x)
        for k, (dy, dx) in enumerate(self.offsets):
            (pr, pc), (qr, qc) = _edge_slices(dy, dx, height, width)
            flux = w[:, k : k + 1, pr, pc] * (x[..., pr, pc] - x[..., qr, qc])
            out[..., pr, pc] += flux
            out[..., qr, qc] -= flux
        return out

    def diagonal(self, w: torch.Tensor) -> torch.Tensor:
        height, width = w.shape[-2:]
        deg = w.sum(1, keepdim=True)
        for k, (dy, dx) in enumerate(self.offsets):
            (pr, pc), (qr, qc) = _edge_slices(dy, dx, height, width)
            deg[..., qr, qc] += w[:, k : k + 1, pr, pc]
        return deg


class _DenseGraph:
    """All pairs through a low-rank factor: weights stored as ``Φ`` ``(B, D, N)`` scaled."""

    def affinities(self, emb: torch.Tensor, beta: _Scalar) -> torch.Tensor:
        n = emb.shape[-2] * emb.shape[-1]
        phi = torch.softmax(emb.flatten(2), dim=1)
        scale = beta / n
        return phi * (scale.sqrt() if isinstance(scale, torch.Tensor) else math.sqrt(scale))

    def laplacian(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        deg = torch.einsum("bdn,bd->bn", phi, phi.sum(-1)).unsqueeze(1)
        wx = torch.einsum("bdn,bld->bln", phi, torch.einsum("bdn,bln->bld", phi, flat))
        return (deg * flat - wx).view_as(x)

    def diagonal(self, phi: torch.Tensor) -> torch.Tensor:
        deg = torch.einsum("bdn,bd->bn", phi, phi.sum(-1)) - phi.pow(2).sum(1)
        return deg.unsqueeze(1)


def _make_graph(connectivity: Connectivity, radius: int) -> _LocalGraph | _DenseGraph:
    if connectivity == "dense":
        return _DenseGraph()
    if isinstance(connectivity, bool) or connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4, 8 or 'dense'; got {connectivity!r}")
    radius = check_int(radius, "radius", minimum=1)
    return _LocalGraph(int(connectivity), radius)


# ----------------------------------------------------------------------------------------------
# Input checks and precision.
# ----------------------------------------------------------------------------------------------


def _check_logits_embeddings(logits: Any, embeddings: Any, name: str = "") -> None:
    check_tensor(logits, f"logits{name}", ndim=4, layout="(B, L, H, W)", floating=True, finite=True)
    check_tensor(
        embeddings, f"embeddings{name}", ndim=4, layout="(B, D, H, W)", floating=True, finite=True
    )
    b = logits.shape[0]
    if embeddings.shape[0] != b or embeddings.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"embeddings{name} must be (B, D, H, W) matching logits{name} {tuple(logits.shape)} "
            f"in B, H, W; got {tuple(embeddings.shape)}"
        )
    if embeddings.device != logits.device or embeddings.dtype != logits.dtype:
        raise ValueError(
            f"embeddings{name} must have logits{name}' dtype and device ({logits.dtype}, "
            f"{logits.device}); got ({embeddings.dtype}, {embeddings.device})"
        )


def _solver_precision(t: torch.Tensor) -> tuple[torch.dtype, AbstractContextManager[Any]]:
    """CG needs at least float32: half precision cannot reach useful tolerances."""
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    try:
        autocast_on = torch.is_autocast_enabled(t.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        autocast_on = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    guard: AbstractContextManager[Any] = (
        torch.autocast(device_type=t.device.type, enabled=False) if autocast_on else nullcontext()
    )
    return dtype, guard


def _solve(
    matvec: Any,
    b: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    diag: torch.Tensor,
    solver: _Solver,
) -> tuple[torch.Tensor, CGInfo]:
    return conjugate_gradient(
        matvec,
        b,
        params=params,
        preconditioner=diag if solver.precondition else None,
        tol=solver.tol,
        max_iter=solver.max_iter,
        return_info=True,
    )


class _Solver:
    """CG settings: relative tolerance, iteration limit, Jacobi preconditioning."""

    def __init__(self, tol: float, max_iter: int | None, precondition: bool) -> None:
        self.tol = check_positive(tol, "tol")
        self.max_iter = None if max_iter is None else check_int(max_iter, "max_iter", minimum=1)
        self.precondition = bool(precondition)


# ----------------------------------------------------------------------------------------------
# Single scale.
# ----------------------------------------------------------------------------------------------


def _single_system(
    embeddings: torch.Tensor,
    lam: torch.Tensor,
    beta: torch.Tensor,
    connectivity: Connectivity,
    radius: int,
) -> tuple[Any, tuple[torch.Tensor, ...], torch.Tensor]:
    """matvec, its params and the diagonal of ``λI + L_W`` for one resolution."""
    graph = _make_graph(connectivity, radius)
    w = graph.affinities(embeddings, beta)

    def matvec(v: torch.Tensor, lam_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return lam_ * v + graph.laplacian(v, w_)

    diag = lam.detach() + graph.diagonal(w.detach()).view(w.shape[0], 1, *embeddings.shape[2:])
    return matvec, (lam, w), diag


def _gaussian_crf(
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    scalars: Sequence[_Scalar],
    connectivity: Connectivity,
    radius: int,
    solver: _Solver,
) -> tuple[torch.Tensor, CGInfo]:
    """Eq. (2) for checked inputs; ``scalars = (λ, β)``."""
    dtype, guard = _solver_precision(logits)
    with guard:
        u = logits.to(dtype)
        lam, beta = (to_tensor(s, u) for s in scalars)
        matvec, params, diag = _single_system(embeddings.to(dtype), lam, beta, connectivity, radius)
        x, info = _solve(matvec, u, params, diag, solver)
    return x.to(logits.dtype), info


def _gaussian_crf_energy(
    x: torch.Tensor,
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    scalars: Sequence[_Scalar],
    connectivity: Connectivity,
    radius: int,
) -> torch.Tensor:
    """Eq. (1) per image for checked inputs; ``scalars = (λ, β)``."""
    lam, beta = (to_tensor(s, logits) for s in scalars)
    matvec, params, _ = _single_system(embeddings, lam, beta, connectivity, radius)
    return (0.5 * x * matvec(x, *params) - logits * x).flatten(1).sum(1)


def gaussian_crf(
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    connectivity: Connectivity = 8,
    radius: int = 1,
    lam: _Scalar = 1.0,
    pairwise_weight: _Scalar = 1.0,
    tol: float = 1e-5,
    max_iter: int | None = None,
    precondition: bool = True,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, CGInfo]:
    r"""Exact Gaussian-CRF inference: solve ``(λI + L_W) x = u`` for every label (eq. 2).

    Chandra & Kokkinos (2016), eq. ``(A + λI) x = B`` with ``A = L_W`` the Laplacian of learned,
    non-negative embedding affinities (see the module docstring), shared by all labels.  Solved
    by Jacobi-preconditioned conjugate gradient; the backward is one more solve (closed form).

    Args:
        logits: unary scores ``u`` (the paper's ``B``), higher = more likely.
        embeddings: pixel embeddings ``e`` from a CNN branch (dimensionless).
        connectivity: ``4`` (diamond window), ``8`` (square window) or ``"dense"`` (all pairs,
            low rank).
        radius: window radius in pixels for the local graphs (ignored for ``"dense"``).
        lam: ``λ > 0``, the weight of the quadratic unary term; the smallest eigenvalue of the
            system is ``≥ λ``.  Float or positive scalar tensor (learnable).
        pairwise_weight: ``β > 0`` scaling every affinity.  Float or positive scalar tensor.
        tol: relative residual tolerance of CG (forward and backward).
        max_iter: CG iteration limit (``None`` = ``max(H·W, 100)``); warns if it is hit.
        precondition: Jacobi-precondition CG with the diagonal ``λ + deg_W``.
        return_info: also return the forward solve's :class:`~deepcrf.ops.cg.CGInfo`.

    Returns:
        The minimiser ``x`` of eq. (1) (scores, use as logits), same dtype as ``logits``
        (computed in at least float32).

    Shape:
        logits:     (B, L, H, W)
        embeddings: (B, D, H, W)
        return:     (B, L, H, W)

    Example:
        >>> u, e = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
        >>> gaussian_crf(u, e, connectivity=4).shape
        torch.Size([1, 3, 8, 8])
    """
    _check_logits_embeddings(logits, embeddings)
    _make_graph(connectivity, radius)
    scalars = _check_scalars(lam=lam, pairwise_weight=pairwise_weight)
    solver = _Solver(tol, max_iter, precondition)
    x, info = _gaussian_crf(logits, embeddings, scalars, connectivity, radius, solver)
    return (x, info) if return_info else x


def gaussian_crf_energy(
    x: torch.Tensor,
    logits: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    connectivity: Connectivity = 8,
    radius: int = 1,
    lam: _Scalar = 1.0,
    pairwise_weight: _Scalar = 1.0,
) -> torch.Tensor:
    r"""The Gaussian-CRF energy ``Σ_l ½ x_lᵀ(λI + L_W)x_l − u_lᵀx_l`` (eq. 1), per image.

    Its gradient w.r.t. ``x`` is ``(λI + L_W)x − u``, zero at :func:`gaussian_crf`'s output.

    Args:
        x: scores to evaluate.
        logits: unary scores ``u``.
        embeddings: pixel embeddings.
        connectivity: as in :func:`gaussian_crf`.
        radius: as in :func:`gaussian_crf`.
        lam: as in :func:`gaussian_crf`.
        pairwise_weight: as in :func:`gaussian_crf`.

    Shape:
        x, logits:  (B, L, H, W)
        embeddings: (B, D, H, W)
        return:     (B,)
    """
    _check_logits_embeddings(logits, embeddings)
    _check_x([x], [logits])
    _make_graph(connectivity, radius)
    scalars = _check_scalars(lam=lam, pairwise_weight=pairwise_weight)
    return _gaussian_crf_energy(x, logits, embeddings, scalars, connectivity, radius)


def _check_scalars(**values: _Scalar) -> list[_Scalar]:
    return [check_positive_scalar(v, name) for name, v in values.items()]


def _check_x(xs: Sequence[Any], logits: Sequence[torch.Tensor]) -> None:
    if len(xs) != len(logits):
        raise ValueError(f"x must have one entry per scale ({len(logits)}); got {len(xs)}")
    for x, u in zip(xs, logits, strict=True):
        check_tensor(x, "x", ndim=4, layout="(B, L, H, W)", floating=True)
        if x.shape != u.shape:
            raise ValueError(f"x must have logits' shape {tuple(u.shape)}; got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# Several resolutions in one system.
# ----------------------------------------------------------------------------------------------


def _parent_index(fine: tuple[int, int], coarse: tuple[int, int], device: torch.device) -> Any:
    """Flat index of each fine pixel's parent: the coarse pixel whose footprint contains it."""
    (hf, wf), (hc, wc) = fine, coarse
    rows = torch.arange(hf, device=device) * hc // hf
    cols = torch.arange(wf, device=device) * wc // wf
    return (rows[:, None] * wc + cols[None, :]).flatten()


def _multiscale_system(
    embeddings: Sequence[torch.Tensor],
    lam: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    connectivity: Connectivity,
    radius: int,
) -> tuple[Any, tuple[torch.Tensor, ...], torch.Tensor]:
    """The matvec over the concatenated flat vector, its params and the joint diagonal."""
    graph = _make_graph(connectivity, radius)
    sizes = [tuple(e.shape[2:]) for e in embeddings]
    counts = [h * w for h, w in sizes]
    weights = [graph.affinities(e, beta) for e in embeddings]
    parents = []
    couplings = []
    for s in range(len(embeddings) - 1):
        idx = _parent_index(sizes[s], sizes[s + 1], embeddings[s].device)
        ef = embeddings[s].flatten(2)
        ec = embeddings[s + 1].flatten(2)[..., idx]
        couplings.append(gamma * torch.exp(-(ef - ec).pow(2).sum(1)))  # (B, N_fine)
        parents.append(idx)
    num = len(embeddings)

    def matvec(v: torch.Tensor, lam_: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        w_scale, c_inter = ws[:num], ws[num:]
        parts = list(torch.split(v, counts, dim=-1))
        outs = []
        for s, part in enumerate(parts):
            grid = part.reshape(*part.shape[:2], *sizes[s])
            outs.append((lam_ * grid + graph.laplacian(grid, w_scale[s])).flatten(2))
        for s, (idx, c) in enumerate(zip(parents, c_inter, strict=True)):
            flux = c.unsqueeze(1) * (parts[s] - parts[s + 1][..., idx])
            outs[s] = outs[s] + flux
            outs[s + 1] = outs[s + 1].index_add(-1, idx, -flux)
        return torch.cat(outs, dim=-1)

    diags = [graph.diagonal(w.detach()).reshape(w.shape[0], 1, -1) for w in weights]
    for s, (idx, c) in enumerate(zip(parents, couplings, strict=True)):
        cd = c.detach().unsqueeze(1)
        diags[s] = diags[s] + cd
        diags[s + 1] = diags[s + 1].index_add(-1, idx, cd)
    diag = lam.detach() + torch.cat(diags, dim=-1)
    return matvec, (lam, *weights, *couplings), diag


def _check_scales(logits: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor]) -> None:
    if not isinstance(logits, (list, tuple)) or not isinstance(embeddings, (list, tuple)):
        raise TypeError("logits and embeddings must be lists of tensors, finest scale first")
    if len(logits) not in (2, 3) or len(embeddings) != len(logits):
        raise ValueError(
            "logits and embeddings must be lists of 2 or 3 scales of equal length; got "
            f"{len(logits)} and {len(embeddings)}"
        )
    for s, (u, e) in enumerate(zip(logits, embeddings, strict=True)):
        _check_logits_embeddings(u, e, name=f"[{s}]")
        ref_u, ref_e = logits[0], embeddings[0]
        if u.shape[:2] != ref_u.shape[:2] or e.shape[1] != ref_e.shape[1]:
            raise ValueError(
                f"logits[{s}] / embeddings[{s}] must share B, L, D with scale 0 "
                f"({tuple(ref_u.shape[:2])}, D={ref_e.shape[1]}); got {tuple(u.shape)}, "
                f"{tuple(e.shape)}"
            )
        if u.dtype != ref_u.dtype or u.device != ref_u.device:
            raise ValueError(f"logits[{s}] must have logits[0]'s dtype and device")
        if s > 0:
            prev = logits[s - 1].shape[2:]
            if u.shape[2] > prev[0] or u.shape[3] > prev[1]:
                raise ValueError(
                    f"scales must go from fine to coarse: logits[{s}] is {tuple(u.shape)}, "
                    f"larger than logits[{s - 1}] {tuple(logits[s - 1].shape)}"
                )


def _multiscale_gaussian_crf(
    logits: Sequence[torch.Tensor],
    embeddings: Sequence[torch.Tensor],
    scalars: Sequence[_Scalar],
    connectivity: Connectivity,
    radius: int,
    solver: _Solver,
) -> tuple[list[torch.Tensor], CGInfo]:
    """The joint system for checked inputs; ``scalars = (λ, β, γ)``."""
    dtype, guard = _solver_precision(logits[0])
    with guard:
        us = [u.to(dtype) for u in logits]
        lam, beta, gamma = (to_tensor(s, us[0]) for s in scalars)
        es = [e.to(dtype) for e in embeddings]
        matvec, params, diag = _multiscale_system(es, lam, beta, gamma, connectivity, radius)
        b = torch.cat([u.flatten(2) for u in us], dim=-1)
        x, info = _solve(matvec, b, params, diag, solver)
    parts = torch.split(x.to(logits[0].dtype), [u.shape[2] * u.shape[3] for u in logits], -1)
    return [p.reshape(u.shape) for p, u in zip(parts, logits, strict=True)], info


def _multiscale_gaussian_crf_energy(
    xs: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    embeddings: Sequence[torch.Tensor],
    scalars: Sequence[_Scalar],
    connectivity: Connectivity,
    radius: int,
) -> torch.Tensor:
    """The joint energy per image for checked inputs; ``scalars = (λ, β, γ)``."""
    lam, beta, gamma = (to_tensor(s, logits[0]) for s in scalars)
    matvec, params, _ = _multiscale_system(list(embeddings), lam, beta, gamma, connectivity, radius)
    x = torch.cat([t.flatten(2) for t in xs], dim=-1)
    b = torch.cat([u.flatten(2) for u in logits], dim=-1)
    return (0.5 * x * matvec(x, *params) - b * x).flatten(1).sum(1)


def multiscale_gaussian_crf(
    logits: Sequence[torch.Tensor],
    embeddings: Sequence[torch.Tensor],
    *,
    connectivity: Connectivity = 8,
    radius: int = 1,
    lam: _Scalar = 1.0,
    pairwise_weight: _Scalar = 1.0,
    coupling_weight: _Scalar = 1.0,
    tol: float = 1e-5,
    max_iter: int | None = None,
    precondition: bool = True,
    return_info: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], CGInfo]:
    r"""Multi-resolution Gaussian CRF: 2-3 scales coupled in one SPD system, solved jointly.

    Chandra & Kokkinos (2016, Sec. 4, multi-resolution G-CRF): the joint energy is the sum of
    each scale's eq. (1) plus ``Σ_l Σ_p c_p (x_pl − x_parent(p),l)²/2`` between each pixel ``p``
    of scale ``s`` and its parent at scale ``s+1`` (the coarse pixel whose footprint holds it),
    ``c_p = γ·exp(−|e_p − e_parent(p)|²)``.  The joint matrix is ``λI`` plus a Laplacian, hence
    SPD; one CG solve returns every scale's scores.

    Args:
        logits: per-scale unary scores, finest first.
        embeddings: per-scale embeddings, same ``D`` at every scale (they are compared across
            scales by the coupling).
        connectivity: the within-scale graph, as in :func:`gaussian_crf`.
        radius: local window radius in pixels (of each scale).
        lam: ``λ > 0``, shared by the scales.
        pairwise_weight: ``β > 0``, shared by the scales.
        coupling_weight: ``γ > 0``, the inter-scale coupling strength.
        tol: CG relative residual tolerance.
        max_iter: CG iteration limit (``None`` = ``max(total pixels, 100)``).
        precondition: Jacobi preconditioning.
        return_info: also return the :class:`~deepcrf.ops.cg.CGInfo`.

    Returns:
        The list of per-scale scores, finest first.

    Shape:
        logits[s]:     (B, L, H_s, W_s)   H_0 >= H_1 >= H_2
        embeddings[s]: (B, D, H_s, W_s)
        return[s]:     (B, L, H_s, W_s)
    """
    _check_scales(logits, embeddings)
    _make_graph(connectivity, radius)
    scalars = _check_scalars(
        lam=lam, pairwise_weight=pairwise_weight, coupling_weight=coupling_weight
    )
    solver = _Solver(tol, max_iter, precondition)
    xs, info = _multiscale_gaussian_crf(logits, embeddings, scalars, connectivity, radius, solver)
    return (xs, info) if return_info else xs


def multiscale_gaussian_crf_energy(
    xs: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    embeddings: Sequence[torch.Tensor],
    *,
    connectivity: Connectivity = 8,
    radius: int = 1,
    lam: _Scalar = 1.0,
    pairwise_weight: _Scalar = 1.0,
    coupling_weight: _Scalar = 1.0,
) -> torch.Tensor:
    r"""The joint multi-scale energy ``½ xᵀA x − uᵀx`` (all scales, all labels), per image.

    Args:
        xs: per-scale scores to evaluate, finest first.
        logits: as in :func:`multiscale_gaussian_crf`.
        embeddings: as in :func:`multiscale_gaussian_crf`.
        connectivity: as in :func:`multiscale_gaussian_crf`.
        radius: as in :func:`multiscale_gaussian_crf`.
        lam: as in :func:`multiscale_gaussian_crf`.
        pairwise_weight: as in :func:`multiscale_gaussian_crf`.
        coupling_weight: as in :func:`multiscale_gaussian_crf`.

    Shape:
        xs[s], logits[s]: (B, L, H_s, W_s)
        embeddings[s]:    (B, D, H_s, W_s)
        return:           (B,)
    """
    _check_scales(logits, embeddings)
    _check_x(xs, logits)
    _make_graph(connectivity, radius)
    scalars = _check_scalars(
        lam=lam, pairwise_weight=pairwise_weight, coupling_weight=coupling_weight
    )
    return _multiscale_gaussian_crf_energy(xs, logits, embeddings, scalars, connectivity, radius)


# ----------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------


class _GaussianCRFLayer(nn.Module):
    """What the single- and multi-scale layers share.

    Sizes, graph, CG settings, the positive scalars kept as logs (parameters or buffers per
    ``learnable``) and the forward/energy that check the inputs once and call the unchecked
    solvers with the layer's own values.
    """

    SCALARS: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        connectivity: Connectivity,
        radius: int,
        scalars: dict[str, float],
        learnable: Sequence[str],
        tol: float,
        max_iter: int | None,
        precondition: bool,
    ) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", minimum=1)
        _make_graph(connectivity, radius)
        self.connectivity = connectivity
        self.radius = radius
        self.solver = _Solver(tol, max_iter, precondition)
        if isinstance(learnable, str):
            raise TypeError(
                f"learnable must be a sequence of names, not a string; got {learnable!r}"
            )
        unknown = sorted(set(learnable) - set(scalars))
        if unknown:
            raise ValueError(f"learnable must be among {tuple(scalars)}; got {unknown}")
        self.learnable = tuple(name for name in scalars if name in learnable)
        for name, value in scalars.items():
            log_value = torch.tensor(math.log(check_positive(value, name)))
            if name in learnable:
                self.register_parameter(f"log_{name}", nn.Parameter(log_value))
            else:
                self.register_buffer(f"log_{name}", log_value)
        self.last_info: CGInfo | None = None

    @property
    def lam(self) -> torch.Tensor:
        """Current ``λ``."""
        return self.log_lam.exp()

    @property
    def pairwise_weight(self) -> torch.Tensor:
        """Current ``β``."""
        return self.log_pairwise_weight.exp()

    def _scalars(self) -> list[torch.Tensor]:
        return [getattr(self, f"log_{name}").exp() for name in self.SCALARS]

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"connectivity={self.connectivity!r}, radius={self.radius}, "
            f"learnable={self.learnable}, tol={self.solver.tol:g}"
        )


class GaussianCRF(_GaussianCRFLayer):
    r"""Deep Gaussian CRF layer: ``x = (λI + L_W)⁻¹ u`` with learned embedding affinities.

    Module form of :func:`gaussian_crf` (Chandra & Kokkinos 2016, ``(A + λI) x = B``): holds
    ``λ`` and ``β`` (as logs, so they stay positive and the system SPD), trainable as chosen by
    ``learnable``.  The embeddings come from the caller's CNN branch.

    Args:
        num_classes: ``L`` (>= 2), checked against ``logits``.
        embedding_dim: ``D``, checked against ``embeddings``.
        connectivity: ``4``, ``8`` (local windows) or ``"dense"`` (all pairs, low rank).
        radius: local window radius in pixels.
        lam: initial ``λ > 0``.
        pairwise_weight: initial ``β > 0``.
        learnable: which of ``"lam"``, ``"pairwise_weight"`` are trainable.
        tol: CG relative residual tolerance.
        max_iter: CG iteration limit (``None`` = ``max(H·W, 100)``).
        precondition: Jacobi preconditioning.

    Shape:
        logits:     (B, L, H, W)  unary scores, higher = more likely
        embeddings: (B, D, H, W)
        return:     (B, L, H, W)  scores (use as logits)

    Example:
        >>> crf = GaussianCRF(num_classes=3, embedding_dim=4, connectivity=4)
        >>> crf(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    SCALARS = ("lam", "pairwise_weight")

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        connectivity: Connectivity = 8,
        radius: int = 1,
        lam: float = 1.0,
        pairwise_weight: float = 1.0,
        learnable: Sequence[str] = ("pairwise_weight",),
        tol: float = 1e-5,
        max_iter: int | None = None,
        precondition: bool = True,
    ) -> None:
        super().__init__(
            num_classes, embedding_dim, connectivity, radius,
            {"lam": lam, "pairwise_weight": pairwise_weight}, learnable,
            tol, max_iter, precondition,
        )  # fmt: skip

    def _check_sizes(self, logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        _check_logits_embeddings(logits, embeddings)
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have num_classes={self.num_classes} channels (B, L, H, W); "
                f"got {tuple(logits.shape)}"
            )
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must have embedding_dim={self.embedding_dim} channels "
                f"(B, D, H, W); got {tuple(embeddings.shape)}"
            )

    def forward(self, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Solve eq. (2); the CG report of the last call is kept in ``self.last_info``."""
        self._check_sizes(logits, embeddings)
        x, self.last_info = _gaussian_crf(
            logits, embeddings, self._scalars(), self.connectivity, self.radius, self.solver
        )
        return x

    def energy(
        self, x: torch.Tensor, logits: torch.Tensor, embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Eq. (1) at ``x`` per image, ``(B,)``; minimised by ``forward(logits, embeddings)``."""
        self._check_sizes(logits, embeddings)
        _check_x([x], [logits])
        return _gaussian_crf_energy(
            x, logits, embeddings, self._scalars(), self.connectivity, self.radius
        )


class MultiScaleGaussianCRF(_GaussianCRFLayer):
    r"""Multi-resolution Deep Gaussian CRF: 2-3 scales coupled in one linear system.

    Module form of :func:`multiscale_gaussian_crf` (Chandra & Kokkinos 2016, multi-resolution
    G-CRF).  Holds ``λ``, ``β`` and the coupling ``γ`` as logs.

    Args:
        num_classes: ``L`` (>= 2).
        embedding_dim: ``D`` (the same at every scale).
        num_scales: 2 or 3, checked against the inputs.
        connectivity: within-scale graph: ``4``, ``8`` or ``"dense"``.
        radius: local window radius in pixels.
        lam: initial ``λ > 0``.
        pairwise_weight: initial ``β > 0``.
        coupling_weight: initial ``γ > 0``.
        learnable: trainable among ``"lam"``, ``"pairwise_weight"``, ``"coupling_weight"``.
        tol: CG relative residual tolerance.
        max_iter: CG iteration limit.
        precondition: Jacobi preconditioning.

    Shape:
        logits[s]:     (B, L, H_s, W_s)  finest first
        embeddings[s]: (B, D, H_s, W_s)
        return[s]:     (B, L, H_s, W_s)

    Example:
        >>> crf = MultiScaleGaussianCRF(3, 4, num_scales=2, connectivity=4)
        >>> us = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)]
        >>> es = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
        >>> [x.shape[-1] for x in crf(us, es)]
        [8, 4]
    """

    SCALARS = ("lam", "pairwise_weight", "coupling_weight")

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        num_scales: int = 2,
        connectivity: Connectivity = 8,
        radius: int = 1,
        lam: float = 1.0,
        pairwise_weight: float = 1.0,
        coupling_weight: float = 1.0,
        learnable: Sequence[str] = ("pairwise_weight", "coupling_weight"),
        tol: float = 1e-5,
        max_iter: int | None = None,
        precondition: bool = True,
    ) -> None:
        if num_scales not in (2, 3) or isinstance(num_scales, bool):
            raise ValueError(f"num_scales must be 2 or 3; got {num_scales!r}")
        super().__init__(
            num_classes, embedding_dim, connectivity, radius,
            {"lam": lam, "pairwise_weight": pairwise_weight, "coupling_weight": coupling_weight},
            learnable, tol, max_iter, precondition,
        )  # fmt: skip
        self.num_scales = int(num_scales)

    @property
    def coupling_weight(self) -> torch.Tensor:
        """Current ``γ``."""
        return self.log_coupling_weight.exp()

    def _check_sizes(
        self, logits: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor]
    ) -> None:
        _check_scales(logits, embeddings)
        if len(logits) != self.num_scales:
            raise ValueError(
                f"logits must have num_scales={self.num_scales} entries; got {len(logits)}"
            )
        if logits[0].shape[1] != self.num_classes or embeddings[0].shape[1] != self.embedding_dim:
            raise ValueError(
                f"logits/embeddings must have L={self.num_classes}, D={self.embedding_dim} "
                f"channels; got {tuple(logits[0].shape)}, {tuple(embeddings[0].shape)}"
            )

    def forward(
        self, logits: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Solve the joint system; per-scale scores, finest first."""
        self._check_sizes(logits, embeddings)
        xs, self.last_info = _multiscale_gaussian_crf(
            logits, embeddings, self._scalars(), self.connectivity, self.radius, self.solver
        )
        return xs

    def energy(
        self,
        xs: Sequence[torch.Tensor],
        logits: Sequence[torch.Tensor],
        embeddings: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """The joint energy at ``xs`` per image, ``(B,)``."""
        self._check_sizes(logits, embeddings)
        _check_x(xs, logits)
        return _multiscale_gaussian_crf_energy(
            xs, logits, embeddings, self._scalars(), self.connectivity, self.radius
        )

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return f"{super().extra_repr()}, num_scales={self.num_scales}"
