"""Conjugate gradient with the implicit backward, against torch.linalg.solve (dense, exact)."""

import pytest
import torch

import deepcrf
from deepcrf.ops.cg import CGConvergenceWarning, CGInfo, _cg_loop, conjugate_gradient


def _spd(batch, n, *, dtype=torch.float64, cond=10.0):
    """Random SPD matrices with eigenvalues in [1, cond]."""
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=dtype))
    eig = torch.linspace(1.0, cond, n, dtype=dtype).expand(batch, n)
    return q @ torch.diag_embed(eig) @ q.transpose(1, 2)


def _matvec(v, a):
    # v: (B, K, N); a: (B, N, N) -> A v per column.
    return torch.einsum("bij,bkj->bki", a, v)


def _sym_matvec(v, m):
    # Symmetrise inside so that gradcheck's perturbations of m keep the operator symmetric.
    return _matvec(v, 0.5 * (m + m.transpose(1, 2)))


def _reference(a, b):
    return torch.linalg.solve(a.unsqueeze(1), b.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(
    "dtype,tol,err", [(torch.float64, 1e-12, 1e-10), (torch.float32, 1e-7, 1e-5)]
)
@pytest.mark.parametrize("precondition", [False, True])
def test_matches_dense_solve(dtype, tol, err, precondition):
    a = _spd(3, 12, dtype=dtype)
    b = torch.randn(3, 4, 12, dtype=dtype)
    diag = a.diagonal(dim1=1, dim2=2).unsqueeze(1) if precondition else None
    x, info = conjugate_gradient(
        _matvec, b, params=(a,), preconditioner=diag, tol=tol, return_info=True
    )
    torch.testing.assert_close(x, _reference(a, b), rtol=0, atol=err)
    assert isinstance(info, CGInfo) and info.converged
    assert info.residual.shape == (3, 4)
    assert 1 <= info.iterations <= 30


def test_exported_from_package():
    assert deepcrf.conjugate_gradient is conjugate_gradient


def test_jacobi_preconditioning_helps_badly_scaled_system():
    # A = D^{1/2} S D^{1/2} with widely spread D: Jacobi undoes most of the bad scaling.
    s = _spd(1, 40, cond=4.0)
    d = torch.logspace(0, 4, 40, dtype=torch.float64)
    a = d.sqrt()[None, :, None] * s * d.sqrt()[None, None, :]
    b = torch.randn(1, 1, 40, dtype=torch.float64)
    diag = a.diagonal(dim1=1, dim2=2).unsqueeze(1)
    _, plain = conjugate_gradient(
        _matvec, b, params=(a,), tol=1e-10, max_iter=2000, return_info=True
    )
    x, pre = conjugate_gradient(
        _matvec, b, params=(a,), preconditioner=diag, tol=1e-10, return_info=True
    )
    torch.testing.assert_close(x, _reference(a, b), rtol=1e-8, atol=1e-12)
    assert pre.iterations < plain.iterations


def test_vector_shape_and_per_column_stopping():
    # (B, K, H, W) vectors: inner products reduce over H, W.  A zero column stays exactly 0.
    a = _spd(2, 6)
    b = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    b[1, 2] = 0.0

    def mv(v, a):
        return _matvec(v.flatten(2), a).view_as(v)

    x, info = conjugate_gradient(mv, b, params=(a,), tol=1e-12, return_info=True)
    torch.testing.assert_close(x.flatten(2), _reference(a, b.flatten(2)), rtol=0, atol=1e-10)
    assert bool((x[1, 2] == 0).all())
    assert float(info.residual[1, 2]) == 0.0


def test_batch_equals_each_alone():
    a = _spd(3, 10)
    b = torch.randn(3, 2, 10, dtype=torch.float64)
    together = conjugate_gradient(_matvec, b, params=(a,), tol=1e-12)
    for i in range(3):
        alone = conjugate_gradient(_matvec, b[i : i + 1], params=(a[i : i + 1],), tol=1e-12)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-12)


def test_non_contiguous_input_and_no_mutation():
    a = _spd(2, 8)
    b_t = torch.randn(2, 8, 3, dtype=torch.float64)
    b = b_t.transpose(1, 2)
    assert not b.is_contiguous()
    before = b.clone()
    x = conjugate_gradient(_matvec, b, params=(a,), tol=1e-12)
    torch.testing.assert_close(x, _reference(a, b.contiguous()), rtol=0, atol=1e-10)
    assert torch.equal(b, before)


def test_gradients_match_autograd_through_dense_solve():
    m = _spd(2, 7).requires_grad_(True)
    b = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 7, dtype=torch.float64)
    x = conjugate_gradient(_sym_matvec, b, params=(m,), tol=1e-13)
    gb, gm = torch.autograd.grad((x * w).sum(), (b, m))
    ref = _reference(0.5 * (m + m.transpose(1, 2)), b)
    rb, rm = torch.autograd.grad((ref * w).sum(), (b, m))
    torch.testing.assert_close(gb, rb, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gm, rm, rtol=1e-9, atol=1e-10)


def test_gradcheck():
    m = _spd(2, 5).requires_grad_(True)
    b = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    diag = m.detach().diagonal(dim1=1, dim2=2).unsqueeze(1)

    def fn(b, m):
        return conjugate_gradient(_sym_matvec, b, params=(m,), preconditioner=diag, tol=1e-13)

    assert torch.autograd.gradcheck(fn, (b, m), eps=1e-6, atol=1e-7)


def test_only_some_params_need_grad():
    m = _spd(1, 5)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 1, 5, dtype=torch.float64)

    def mv(v, m, s):
        return s * _matvec(v, m)

    x = conjugate_gradient(mv, b, params=(m, scale), tol=1e-13)
    (g,) = torch.autograd.grad(x.sum(), scale)
    # x = A⁻¹b / s  ⇒  d(sum x)/ds = −sum(x)/s.
    torch.testing.assert_close(g, -x.sum().detach() / scale.detach(), rtol=1e-9, atol=0)


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_backward_memory_independent_of_iterations():
    # Saved-for-backward bytes are those of x and the params, whatever the iteration count;
    # unrolling the same iterations through autograd saves more and more.
    a = _spd(1, 60, cond=1e3).requires_grad_(True)
    b = torch.randn(1, 2, 60, dtype=torch.float64, requires_grad=True)
    (_, lo), bytes_lo = _saved_bytes(
        lambda: conjugate_gradient(_matvec, b, params=(a,), tol=0.3, return_info=True)
    )
    (x_hi, hi), bytes_hi = _saved_bytes(
        lambda: conjugate_gradient(
            _matvec, b, params=(a,), tol=1e-12, max_iter=500, return_info=True
        )
    )
    assert hi.iterations > 3 * lo.iterations, (hi.iterations, lo.iterations)
    assert bytes_lo == bytes_hi
    # x and A (plus one transient copy of b packed by the input's finiteness check).
    assert bytes_hi <= (a.numel() + 2 * b.numel()) * 8
    # The graph has a single solve node: no per-iteration nodes.
    assert type(x_hi.grad_fn).__name__ == "_CGSolveBackward"
    assert x_hi.grad_fn.next_functions[-1][0] is not None
    _, unrolled_bytes_lo = _saved_bytes(
        lambda: _cg_loop(lambda v: _matvec(v, a), b, None, 0.3, 0.0, 500)
    )
    (_, unrolled_hi), unrolled_bytes_hi = _saved_bytes(
        lambda: _cg_loop(lambda v: _matvec(v, a), b, None, 1e-12, 0.0, 500)
    )
    assert unrolled_hi.iterations == hi.iterations
    assert unrolled_bytes_hi > 3 * unrolled_bytes_lo > 0


def test_non_convergence_warns_forward_and_backward():
    a = _spd(1, 50, cond=1e4).requires_grad_(True)
    b = torch.randn(1, 1, 50, dtype=torch.float64, requires_grad=True)
    with pytest.warns(CGConvergenceWarning, match="did not converge.*max_iter=3"):
        x, info = conjugate_gradient(
            _matvec, b, params=(a,), tol=1e-10, max_iter=3, return_info=True
        )
    assert not info.converged and info.iterations == 3
    assert float(info.residual.max()) > 1e-10
    with pytest.warns(CGConvergenceWarning, match="adjoint solve in backward"):
        x.sum().backward()


def test_indefinite_operator_warns_not_silent():
    # CG on a symmetric indefinite matrix: must not return a "converged" wrong answer quietly.
    a = torch.diag(torch.tensor([1.0, -1.0, 2.0, -3.0], dtype=torch.float64))[None]
    b = torch.ones(1, 1, 4, dtype=torch.float64)
    with pytest.warns(CGConvergenceWarning):
        conjugate_gradient(_matvec, b, params=(a,), tol=1e-12, max_iter=3)


def test_bad_inputs():
    a = _spd(1, 4)
    b = torch.randn(1, 1, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="matvec must be callable"):
        conjugate_gradient(a, b)
    with pytest.raises(ValueError, match=r"b must be \(B, K, \*N\)"):
        conjugate_gradient(_matvec, b[0], params=(a,))
    with pytest.raises(TypeError, match="b must have a floating-point dtype"):
        conjugate_gradient(_matvec, torch.ones(1, 1, 4, dtype=torch.int64), params=(a,))
    with pytest.raises(ValueError, match="b must be finite"):
        conjugate_gradient(_matvec, b * float("nan"), params=(a,))
    with pytest.raises(ValueError, match="tol and atol"):
        conjugate_gradient(_matvec, b, params=(a,), tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        conjugate_gradient(_matvec, b, params=(a,), max_iter=0)
    with pytest.raises(ValueError, match="preconditioner must be broadcastable"):
        conjugate_gradient(_matvec, b, params=(a,), preconditioner=torch.ones(1, 1, 5))
    with pytest.raises(ValueError, match="strictly positive"):
        conjugate_gradient(_matvec, b, params=(a,), preconditioner=-torch.ones(1, 1, 4))
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        conjugate_gradient(_matvec, b, params=([1.0],))


@pytest.mark.gpu
def test_cpu_and_cuda_agree():
    a = _spd(2, 16)
    b = torch.randn(2, 3, 16, dtype=torch.float64)
    cpu = conjugate_gradient(_matvec, b, params=(a,), tol=1e-12)
    gpu = conjugate_gradient(_matvec, b.cuda(), params=(a.cuda(),), tol=1e-12)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-10)
