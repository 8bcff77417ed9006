"""Batched conjugate gradient with an implicit (adjoint) backward.

Solves ``A x = b`` for a symmetric positive definite operator ``A`` that is only available as a
matrix-free product ``matvec(v, *params) -> A v``.  The forward runs CG under ``no_grad``; the
backward is one more CG solve with the same matrix (the adjoint system ``A x̄ = ḡ``, ``A`` being
symmetric), and the parameter gradients come from one differentiable product, as in the
closed-form gradients of Chandra & Kokkinos (2016):

    b̄ = A⁻¹ ḡ,        θ̄ = ∂/∂θ ⟨−b̄, A(θ) x⟩   (x held fixed),

so backward memory is that of one ``matvec``, whatever the number of CG iterations.

Layout: ``b`` is ``(B, K, *N)``: ``B`` independent systems (one matrix each), each with ``K``
right-hand sides sharing that matrix (e.g. the labels of a Potts-type Gaussian CRF), and ``*N``
the shape of one vector (e.g. ``H, W``).  Inner products reduce over ``*N``; every one of the
``B·K`` columns has its own step sizes and its own stopping test.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deepcrf._checks import check_int, check_tensor

__all__ = ["CGConvergenceWarning", "CGInfo", "conjugate_gradient"]

Matvec = Callable[..., torch.Tensor]


class CGConvergenceWarning(UserWarning):
    """Conjugate gradient stopped at ``max_iter`` before reaching the requested tolerance."""


@dataclass(frozen=True)
class CGInfo:
    """What a conjugate gradient solve did.

    Attributes:
        iterations: CG iterations run (the slowest column's count).
        residual: ``(B, K)`` final relative residual ``‖b − A x‖₂ / ‖b‖₂`` per column
            (the recursively updated residual; 0 for a zero right-hand side).
        converged: whether every column met the tolerance.
    """

    iterations: int
    residual: torch.Tensor
    converged: bool


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-column inner product over the vector dims: ``(B, K, *N) x2 -> (B, K, 1, ...)``."""
    dims = tuple(range(2, u.dim()))
    return (u * v).sum(dim=dims, keepdim=True)


def _cg_loop(
    apply_a: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    diag: torch.Tensor | None,
    tol: float,
    atol: float,
    max_iter: int,
) -> tuple[torch.Tensor, CGInfo]:
    """Preconditioned CG, written out of place so that it is differentiable when unrolled.

    The implicit backward never unrolls it (it runs under ``no_grad``); benchmarks call it with
    autograd on to measure what back-propagating through the iterations would cost.
    """
    x = torch.zeros_like(b)
    r = b
    inv_diag = None if diag is None else 1.0 / diag
    z = r if inv_diag is None else r * inv_diag
    p = z
    rz = _dot(r, z)
    b_norm = _dot(b, b).sqrt()
    # A zero right-hand side has the exact solution 0: its threshold 0 is met at once.
    threshold = torch.clamp(tol * b_norm, min=atol)
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    res = _dot(r, r).sqrt()
    done = res <= threshold
    iterations = 0
    while iterations < max_iter and not bool(done.all()):
        ap = apply_a(p)
        p_ap = _dot(p, ap)
        # Frozen (converged) columns take zero steps; the guards keep 0/0 out of them.
        alpha = torch.where(done, zero, rz / torch.where(done, torch.ones_like(p_ap), p_ap))
        x = x + alpha * p
        r = r - alpha * ap
        z = r if inv_diag is None else r * inv_diag
        rz_new = _dot(r, z)
        beta = torch.where(done, zero, rz_new / torch.where(done, torch.ones_like(rz), rz))
        p = z + beta * p
        rz = torch.where(done, rz, rz_new)
        res = _dot(r, r).sqrt()
        done = done | (res <= threshold)
        iterations += 1
    rel = (res / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))).flatten(2)[..., 0]
    info = CGInfo(iterations=iterations, residual=rel.detach(), converged=bool(done.all()))
    return x, info


def _warn_unconverged(info: CGInfo, tol: float, max_iter: int, what: str) -> None:
    if not info.converged:
        warnings.warn(
            f"conjugate gradient ({what}) did not converge: relative residual "
            f"{float(info.residual.max()):.3g} > tol={tol:g} after max_iter={max_iter} "
            "iterations; the result is inaccurate (raise max_iter, loosen tol, or check that "
            "the operator is symmetric positive definite)",
            CGConvergenceWarning,
            stacklevel=3,
        )


class _CGSolve(torch.autograd.Function):
    """``x = A(params)⁻¹ b`` with the adjoint backward; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        matvec: Matvec,
        diag: torch.Tensor | None,
        tol: float,
        atol: float,
        max_iter: int,
        info_out: list[CGInfo],
        b: torch.Tensor,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        with torch.no_grad():
            x, info = _cg_loop(lambda v: matvec(v, *params), b, diag, tol, atol, max_iter)
        _warn_unconverged(info, tol, max_iter, "forward solve")
        info_out.append(info)
        ctx.matvec = matvec  # type: ignore[attr-defined]
        ctx.diag = diag  # type: ignore[attr-defined]
        ctx.settings = (tol, atol, max_iter)  # type: ignore[attr-defined]
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_x: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors  # type: ignore[attr-defined]
        matvec: Matvec = ctx.matvec  # type: ignore[attr-defined]
        tol, atol, max_iter = ctx.settings  # type: ignore[attr-defined]
        # A is symmetric, so the adjoint system uses the same operator and preconditioner.
        with torch.no_grad():
            adjoint, info = _cg_loop(
                lambda v: matvec(v, *params),
                grad_x.contiguous(),
                ctx.diag,  # type: ignore[attr-defined]
                tol,
                atol,
                max_iter,
            )
        _warn_unconverged(info, tol, max_iter, "adjoint solve in backward")
        needs = ctx.needs_input_grad[7:]  # type: ignore[attr-defined]
        grads: list[torch.Tensor | None] = [None] * len(params)
        wanted = [i for i, n in enumerate(needs) if n]
        if wanted:
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(i in wanted) for i, p in enumerate(params)]
                ax = matvec(x, *leaves)
                found = torch.autograd.grad(
                    ax, [leaves[i] for i in wanted], grad_outputs=-adjoint, allow_unused=True
                )
            for i, g in zip(wanted, found, strict=True):
                grads[i] = torch.zeros_like(params[i]) if g is None else g
        grad_b = adjoint if ctx.needs_input_grad[6] else None  # type: ignore[attr-defined]
        return (None, None, None, None, None, None, grad_b, *grads)


def conjugate_gradient(
    matvec: Matvec,
    b: torch.Tensor,
    *,
    params: Sequence[torch.Tensor] = (),
    preconditioner: torch.Tensor | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, CGInfo]:
    r"""Solve ``A(params) x = b`` by (Jacobi-preconditioned) conjugate gradient, differentiably.

    Implements CG for a symmetric positive definite ``A`` (Hestenes & Stiefel 1952), with the
    closed-form backward of Chandra & Kokkinos (2016, Sec. 3): ``b̄ = A⁻¹ x̄`` (one more solve
    with the same matrix) and ``θ̄ = ∂⟨−b̄, A(θ) x⟩/∂θ``.  No iteration is back-propagated
    through, so backward memory does not grow with the number of iterations.

    Every column stops when ``‖b − A x‖₂ ≤ max(tol·‖b‖₂, atol)``.  If a column has not met that
    after ``max_iter`` iterations a :class:`CGConvergenceWarning` is emitted (forward or
    backward); the last iterate is returned.

    Args:
        matvec: ``matvec(v, *params) -> A v`` for ``v`` shaped like ``b``; linear in ``v``,
            symmetric positive definite, acting independently on each of the ``B·K`` columns.
            It must be differentiable w.r.t. ``params`` (plain torch ops).
        b: right-hand sides.
        params: tensors the operator depends on; gradients flow to those that require them.
        preconditioner: the diagonal of ``A`` (Jacobi preconditioning), broadcastable to ``b``
            and strictly positive; ``None`` for plain CG.  It only changes the speed of
            convergence, never the solution, so no gradient flows through it.
        tol: relative residual tolerance (dimensionless, ``>= 0``).
        atol: absolute residual tolerance (units of ``b``, ``>= 0``); both 0 is not allowed.
        max_iter: iteration limit; ``None`` = ``max(prod(N), 100)``: exact-arithmetic CG
            terminates within ``prod(N)`` steps, and the floor leaves room for the loss of
            conjugacy in floating point on small problems.
        return_info: also return a :class:`CGInfo`.

    Returns:
        ``x``, or ``(x, info)`` with ``return_info=True``.

    Shape:
        b:              (B, K, *N)  B systems, K right-hand sides each, vectors of shape N
        preconditioner: broadcastable to (B, K, *N), e.g. (B, 1, *N)
        return:         (B, K, *N)

    Example:
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> b = torch.tensor([[[1.0, 2.0]]])
        >>> x = conjugate_gradient(lambda v: v @ a, b, tol=1e-8)
        >>> torch.allclose(x @ a, b, atol=1e-6)
        True
    """
    if not callable(matvec):
        raise TypeError(f"matvec must be callable (v, *params) -> A v; got {type(matvec).__name__}")
    check_tensor(b, "b", layout="(B, K, *N)", floating=True, finite=True)
    if b.dim() < 3:
        raise ValueError(f"b must be (B, K, *N) with at least 3 dimensions; got {tuple(b.shape)}")
    params = tuple(params)
    for i, p in enumerate(params):
        check_tensor(p, f"params[{i}]", nonempty=False)
    if not (tol >= 0.0 and atol >= 0.0) or (tol == 0.0 and atol == 0.0):
        raise ValueError(f"tol and atol must be >= 0 and not both 0; got tol={tol}, atol={atol}")
    n = 1
    for s in b.shape[2:]:
        n *= int(s)
    if max_iter is None:
        max_iter = max(n, 100)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    diag = None
    if preconditioner is not None:
        check_tensor(preconditioner, "preconditioner", layout="broadcastable to b", floating=True)
        try:
            torch.broadcast_shapes(preconditioner.shape, b.shape)
        except RuntimeError as err:
            raise ValueError(
                f"preconditioner must be broadcastable to b {tuple(b.shape)}; "
                f"got {tuple(preconditioner.shape)}"
            ) from err
        diag = preconditioner.detach()
        if not bool((diag > 0).all()):
            raise ValueError("preconditioner (the diagonal of A) must be strictly positive")
    info_out: list[CGInfo] = []
    x = _CGSolve.apply(
        matvec, diag, float(tol), float(atol), int(max_iter), info_out, b.contiguous(), *params
    )
    if return_info:
        return x, info_out[0]
    return x
