"""Deep Gaussian CRF against a dense reference: the N×N system built pixel pair by pixel pair and
solved with torch.linalg.solve (forward), autograd through that solve (backward)."""

import pytest
import torch

import deepcrf
from deepcrf.crf.gaussian import (
    GaussianCRF,
    MultiScaleGaussianCRF,
    gaussian_crf,
    gaussian_crf_energy,
    multiscale_gaussian_crf,
    multiscale_gaussian_crf_energy,
)
from deepcrf.ops.cg import CGConvergenceWarning

GRAPHS = [(4, 1), (8, 1), (4, 2), (8, 2), ("dense", 1)]


def _affinity_matrix(e, connectivity, radius, beta):
    """Dense (B, N, N) affinities w_ij (zero diagonal) from the definitions in the docs."""
    _, _, h, w = e.shape
    n = h * w
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    f = e.flatten(2)
    if connectivity == "dense":
        phi = torch.softmax(f, dim=1)
        wm = beta / n * torch.einsum("bdi,bdj->bij", phi, phi)
    else:
        near = (dy + dx <= radius) if connectivity == 4 else (torch.maximum(dy, dx) <= radius)
        dist2 = (f[:, :, :, None] - f[:, :, None, :]).pow(2).sum(1)
        wm = beta * torch.exp(-dist2) * near.to(e.dtype)
    return wm * (1 - torch.eye(n, dtype=e.dtype))


def _laplacian(wm):
    return torch.diag_embed(wm.sum(-1)) - wm


def _dense_system(e, connectivity, radius, lam, beta):
    n = e.shape[2] * e.shape[3]
    wm = _affinity_matrix(e, connectivity, radius, beta)
    return lam * torch.eye(n, dtype=e.dtype) + _laplacian(wm)


def _dense_solve(u, e, connectivity, radius, lam=1.0, beta=1.0):
    a = _dense_system(e, connectivity, radius, lam, beta)
    x = torch.linalg.solve(a.unsqueeze(1), u.flatten(2).unsqueeze(-1)).squeeze(-1)
    return x.view_as(u)


def _inputs(b=2, labels=3, dim=4, h=5, w=6, dtype=torch.float64, scale=1.0):
    u = torch.randn(b, labels, h, w, dtype=dtype)
    e = scale * torch.randn(b, dim, h, w, dtype=dtype)
    return u, e


# ----------------------------------------------------------------------------------------------
# Forward: exact solution, SPD system, energy minimiser
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity,radius", GRAPHS)
def test_matches_dense_solve_float64(connectivity, radius):
    u, e = _inputs()
    kw = {"connectivity": connectivity, "radius": radius, "lam": 0.7, "pairwise_weight": 1.9}
    x, info = gaussian_crf(u, e, tol=1e-12, return_info=True, **kw)
    ref = _dense_solve(u, e, connectivity, radius, 0.7, 1.9)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    assert info.converged and info.iterations < 30


@pytest.mark.parametrize("connectivity,radius", GRAPHS)
def test_matches_dense_solve_float32_to_1e5(connectivity, radius):
    u, e = _inputs(dtype=torch.float32, h=7, w=9)
    x = gaussian_crf(u, e, connectivity=connectivity, radius=radius, tol=1e-6)
    ref = _dense_solve(u.double(), e.double(), connectivity, radius).float()
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    assert x.dtype == torch.float32


@pytest.mark.parametrize("connectivity,radius", GRAPHS)
def test_system_is_spd_by_construction(connectivity, radius):
    # Large, arbitrary embeddings (affinities from ~0 to β): the system stays SPD, λ_min >= λ.
    lam = 0.05
    _, e = _inputs(b=3, scale=3.0)
    a = _dense_system(e, connectivity, radius, lam, 25.0)
    torch.testing.assert_close(a, a.transpose(1, 2))
    torch.linalg.cholesky(a)  # raises if not positive definite
    assert float(torch.linalg.eigvalsh(a).min()) >= lam * (1 - 1e-9)


@pytest.mark.parametrize("connectivity,radius", GRAPHS)
def test_energy_gradient_vanishes_at_solution(connectivity, radius):
    u, e = _inputs()
    kw = {"connectivity": connectivity, "radius": radius, "lam": 0.5, "pairwise_weight": 2.0}
    x = gaussian_crf(u, e, tol=1e-12, **kw).requires_grad_(True)
    energy = gaussian_crf_energy(x, u, e, **kw)
    assert energy.shape == (2,)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    assert float(grad.abs().max()) < 1e-9
    # The solution is the minimiser: any perturbation raises the (strictly convex) energy.
    bumped = gaussian_crf_energy(x.detach() + 1e-2 * torch.randn_like(u), u, e, **kw)
    assert bool((bumped > energy.detach()).all())


def test_energy_matches_dense_quadratic_form():
    u, e = _inputs()
    x = torch.randn_like(u)
    a = _dense_system(e, 8, 2, 0.3, 1.5)
    xf, uf = x.flatten(2), u.flatten(2)
    ref = 0.5 * torch.einsum("bln,bnm,blm->b", xf, a, xf) - (uf * xf).sum((1, 2))
    got = gaussian_crf_energy(x, u, e, connectivity=8, radius=2, lam=0.3, pairwise_weight=1.5)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)


def test_no_pairwise_term_returns_unary_over_lambda():
    # Embeddings far apart: every local affinity underflows to 0, so x = u / λ.
    u = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    e = 1e3 * torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    x = gaussian_crf(u, e, connectivity=8, lam=2.0, tol=1e-12)
    torch.testing.assert_close(x, u / 2.0)


def test_identical_embeddings_smooth_towards_the_mean():
    # Strong uniform affinities pull every pixel's scores to the image mean of u / λ.
    u = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    e = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    x = gaussian_crf(u, e, connectivity=4, lam=1.0, pairwise_weight=1e4, tol=1e-12)
    mean = u.mean((2, 3), keepdim=True).expand_as(u)
    torch.testing.assert_close(x, mean, rtol=0, atol=1e-2)
    assert float((x - mean).abs().max()) < float((u - mean).abs().max()) / 100


# ----------------------------------------------------------------------------------------------
# Backward: closed form vs autograd through the dense solve, gradcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity,radius", GRAPHS)
def test_gradients_match_autograd_through_dense_solve(connectivity, radius):
    u, e = _inputs()
    u.requires_grad_(True)
    e.requires_grad_(True)
    lam = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn_like(u)
    x = gaussian_crf(
        u, e, connectivity=connectivity, radius=radius, lam=lam, pairwise_weight=beta, tol=1e-13
    )
    got = torch.autograd.grad((x * weights).sum(), (u, e, lam, beta))
    ref = _dense_solve(u, e, connectivity, radius, lam, beta)
    want = torch.autograd.grad((ref * weights).sum(), (u, e, lam, beta))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("connectivity,radius", [(4, 1), (8, 2), ("dense", 1)])
def test_gradcheck(connectivity, radius):
    u, e = _inputs(b=2, labels=2, dim=3, h=3, w=4)
    u.requires_grad_(True)
    e.requires_grad_(True)
    beta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def fn(u, e, beta):
        return gaussian_crf(
            u, e, connectivity=connectivity, radius=radius, pairwise_weight=beta, tol=1e-13
        )

    assert torch.autograd.gradcheck(fn, (u, e, beta), eps=1e-6, atol=1e-7)


def test_backward_memory_independent_of_iterations():
    u, e = _inputs(b=1, h=12, w=12)
    e.requires_grad_(True)
    u.requires_grad_(True)
    sizes = []
    iterations = []
    for tol in (0.3, 1e-12):
        saved = 0

        def pack(t):
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x, info = gaussian_crf(u, e, connectivity=8, tol=tol, return_info=True)
        sizes.append(saved)
        iterations.append(info.iterations)
        x.sum().backward()
    assert iterations[1] > 3 * iterations[0]
    assert sizes[0] == sizes[1]


def test_dense_never_materialises_n_by_n():
    # N = 300·300: an N×N float32 matrix would take 32 GB; the low-rank product needs O(N·D).
    u = torch.randn(1, 2, 300, 300)
    e = torch.randn(1, 4, 300, 300, requires_grad=True)
    x, info = gaussian_crf(u, e, connectivity="dense", pairwise_weight=5.0, return_info=True)
    assert info.converged
    # The dense graph is rank D: λ·x + d⊙x − ΦᵀΦx = u is checked through the energy's gradient.
    xd = x.detach().requires_grad_(True)
    energy = gaussian_crf_energy(xd, u, e.detach(), connectivity="dense", pairwise_weight=5.0)
    (grad,) = torch.autograd.grad(energy.sum(), xd)
    assert float(grad.norm()) <= 1e-4 * float(u.norm())
    x.sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all()


def test_non_convergence_warns():
    u, e = _inputs(h=8, w=8)
    with pytest.warns(CGConvergenceWarning, match="did not converge"):
        x, info = gaussian_crf(
            u, e, lam=1e-3, pairwise_weight=50.0, tol=1e-10, max_iter=2, return_info=True
        )
    assert not info.converged
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------
# Module, batching, layouts, validation
# ----------------------------------------------------------------------------------------------


def test_module_matches_functional_and_learns():
    crf = GaussianCRF(
        3,
        4,
        connectivity=4,
        radius=2,
        lam=0.5,
        pairwise_weight=2.0,
        learnable=("lam", "pairwise_weight"),
        tol=1e-10,
    ).double()
    u, e = _inputs()
    x = crf(u, e)
    ref = gaussian_crf(u, e, connectivity=4, radius=2, lam=0.5, pairwise_weight=2.0, tol=1e-10)
    torch.testing.assert_close(x, ref)
    assert crf.last_info is not None and crf.last_info.converged
    x.pow(2).sum().backward()
    names = {n for n, p in crf.named_parameters() if p.grad is not None and p.grad.abs() > 0}
    assert names == {"log_lam", "log_pairwise_weight"}
    torch.testing.assert_close(
        crf.energy(x.detach(), u, e),
        gaussian_crf_energy(
            x.detach(), u, e, connectivity=4, radius=2, lam=0.5, pairwise_weight=2.0
        ),
    )
    assert deepcrf.GaussianCRF is GaussianCRF
    assert "connectivity=4" in repr(crf)


def test_default_learns_pairwise_weight_only():
    crf = GaussianCRF(2, 3)
    assert [n for n, _ in crf.named_parameters()] == ["log_pairwise_weight"]
    torch.testing.assert_close(crf.lam, torch.tensor(1.0))


def test_batch_equals_each_alone():
    u, e = _inputs(b=3)
    together = gaussian_crf(u, e, connectivity=8, tol=1e-12)
    for i in range(3):
        alone = gaussian_crf(u[i : i + 1], e[i : i + 1], connectivity=8, tol=1e-12)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-12)


def test_non_contiguous_inputs_not_mutated():
    u, e = _inputs()
    u_nc = u.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    e_nc = e[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)
    assert not u_nc.is_contiguous() and not e_nc.is_contiguous()
    before = (u_nc.clone(), e_nc.clone())
    for conn in (8, "dense"):
        got = gaussian_crf(u_nc, e_nc, connectivity=conn, tol=1e-12)
        torch.testing.assert_close(got, gaussian_crf(u, e, connectivity=conn, tol=1e-12))
    assert torch.equal(u_nc, before[0]) and torch.equal(e_nc, before[1])


def test_half_precision_solved_in_float32():
    u, e = _inputs(dtype=torch.float32)
    x = gaussian_crf(u.half(), e.half(), tol=1e-4)
    assert x.dtype == torch.float16
    ref = gaussian_crf(u.half().float(), e.half().float(), tol=1e-4)
    torch.testing.assert_close(x.float(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (2, 3), (5, 1)])
@pytest.mark.parametrize("connectivity,radius", [(4, 3), (8, 3), ("dense", 1)])
def test_images_smaller_than_the_window(size, connectivity, radius):
    u, e = _inputs(h=size[0], w=size[1])
    x = gaussian_crf(u, e, connectivity=connectivity, radius=radius, tol=1e-12)
    ref = _dense_solve(u, e, connectivity, radius)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)


def test_under_cpu_autocast():
    conv = torch.nn.Conv2d(4, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = conv(torch.randn(2, 4, 6, 7))
        assert feats.dtype == torch.bfloat16
        x = gaussian_crf(feats[:, :3], feats, tol=1e-4)
    assert x.dtype == torch.bfloat16
    ref = gaussian_crf(feats[:, :3].float(), feats.float(), tol=1e-4)
    torch.testing.assert_close(x.float(), ref, rtol=2e-2, atol=2e-2)
    x.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_bad_inputs():
    u, e = _inputs()
    with pytest.raises(ValueError, match=r"logits must have 4 dimensions \(B, L, H, W\)"):
        gaussian_crf(u[0], e)
    with pytest.raises(ValueError, match=r"embeddings must be \(B, D, H, W\) matching logits"):
        gaussian_crf(u, e[:, :, :4])
    with pytest.raises(ValueError, match="embeddings must have logits' dtype"):
        gaussian_crf(u, e.float())
    with pytest.raises(ValueError, match="logits must be finite"):
        gaussian_crf(u * float("inf"), e)
    with pytest.raises(ValueError, match="connectivity must be 4, 8 or 'dense'"):
        gaussian_crf(u, e, connectivity=6)
    with pytest.raises(ValueError, match="radius must be >= 1"):
        gaussian_crf(u, e, radius=0)
    with pytest.raises(ValueError, match="lam must be a finite positive number"):
        gaussian_crf(u, e, lam=0.0)
    with pytest.raises(ValueError, match="pairwise_weight must be a finite positive number"):
        gaussian_crf(u, e, pairwise_weight=torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="x must have logits' shape"):
        gaussian_crf_energy(u[:, :2], u, e)
    crf = GaussianCRF(3, 4)
    with pytest.raises(ValueError, match="logits must have num_classes=3"):
        crf(u[:, :2], e)
    with pytest.raises(ValueError, match="embeddings must have embedding_dim=4"):
        crf(u, e[:, :2])
    with pytest.raises(TypeError, match="learnable must be a sequence of names"):
        GaussianCRF(3, 4, learnable="lam")
    with pytest.raises(ValueError, match="learnable must be among"):
        GaussianCRF(3, 4, learnable=("bandwidth",))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        GaussianCRF(1, 4)  # one label: nothing to infer (DenseCRF's rule too)
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        GaussianCRF(3.0, 4)
    with pytest.raises(ValueError, match="embedding_dim must be >= 1"):
        GaussianCRF(3, 0)


# ----------------------------------------------------------------------------------------------
# Multi-scale: one joint SPD system
# ----------------------------------------------------------------------------------------------


def _joint_dense_system(es, connectivity, radius, lam, beta, gamma):
    """Block-diagonal per-scale systems plus the inter-scale (child, parent) Laplacian."""
    counts = [e.shape[2] * e.shape[3] for e in es]
    total = sum(counts)
    starts = [sum(counts[:s]) for s in range(len(es))]
    b = es[0].shape[0]
    a = torch.zeros(b, total, total, dtype=es[0].dtype)
    for s, e in enumerate(es):
        sl = slice(starts[s], starts[s] + counts[s])
        a[:, sl, sl] = _dense_system(e, connectivity, radius, lam, beta)
    for s in range(len(es) - 1):
        (hf, wf), (hc, wc) = es[s].shape[2:], es[s + 1].shape[2:]
        for y in range(hf):
            for x in range(wf):
                i = starts[s] + y * wf + x
                py, px = (y * hc) // hf, (x * wc) // wf
                j = starts[s + 1] + py * wc + px
                c = gamma * torch.exp(-(es[s][:, :, y, x] - es[s + 1][:, :, py, px]).pow(2).sum(1))
                a[:, i, i] += c
                a[:, j, j] += c
                a[:, i, j] -= c
                a[:, j, i] -= c
    return a


def _multiscale_inputs(sizes, b=2, labels=3, dim=4):
    us = [torch.randn(b, labels, h, w, dtype=torch.float64) for h, w in sizes]
    es = [torch.randn(b, dim, h, w, dtype=torch.float64) for h, w in sizes]
    return us, es


@pytest.mark.parametrize("sizes", [[(6, 8), (3, 4)], [(7, 9), (4, 5), (2, 3)]])
@pytest.mark.parametrize("connectivity", [8, "dense"])
def test_multiscale_matches_joint_dense_solve(sizes, connectivity):
    us, es = _multiscale_inputs(sizes)
    kw = {"lam": 0.6, "pairwise_weight": 1.4, "coupling_weight": 2.5}
    xs, info = multiscale_gaussian_crf(
        us, es, connectivity=connectivity, tol=1e-12, return_info=True, **kw
    )
    a = _joint_dense_system(es, connectivity, 1, 0.6, 1.4, 2.5)
    torch.linalg.cholesky(a)
    rhs = torch.cat([u.flatten(2) for u in us], -1)
    ref = torch.linalg.solve(a.unsqueeze(1), rhs.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.cat([x.flatten(2) for x in xs], -1), ref, rtol=0, atol=1e-10)
    assert [x.shape for x in xs] == [u.shape for u in us]
    assert info.converged
    # The coupling changes the answer: solving each scale alone differs.
    alone = gaussian_crf(
        us[0], es[0], connectivity=connectivity, tol=1e-12, lam=0.6, pairwise_weight=1.4
    )
    assert float((alone - xs[0]).abs().max()) > 1e-3


def test_multiscale_energy_and_gradients():
    us, es = _multiscale_inputs([(3, 4), (2, 2)], b=1, labels=2, dim=2)
    for t in (*us, *es):
        t.requires_grad_(True)
    gamma = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    xs = multiscale_gaussian_crf(us, es, coupling_weight=gamma, tol=1e-13)
    xs_d = [x.detach().requires_grad_(True) for x in xs]
    energy = multiscale_gaussian_crf_energy(xs_d, us, es, coupling_weight=gamma)
    grads = torch.autograd.grad(energy.sum(), xs_d)
    assert max(float(g.abs().max()) for g in grads) < 1e-9

    def fn(u0, u1, e0, e1, gamma):
        return tuple(multiscale_gaussian_crf([u0, u1], [e0, e1], coupling_weight=gamma, tol=1e-13))

    assert torch.autograd.gradcheck(fn, (*us, *es, gamma), eps=1e-6, atol=1e-7)


def test_multiscale_module():
    crf = MultiScaleGaussianCRF(3, 4, num_scales=2, connectivity=4, tol=1e-10).double()
    us, es = _multiscale_inputs([(6, 8), (3, 4)])
    xs = crf(us, es)
    ref = multiscale_gaussian_crf(us, es, connectivity=4, tol=1e-10)
    for x, r in zip(xs, ref, strict=True):
        torch.testing.assert_close(x, r)
    sum(x.sum() for x in xs).backward()
    learned = {n for n, p in crf.named_parameters() if p.grad is not None}
    assert learned == {"log_pairwise_weight", "log_coupling_weight"}
    assert crf.energy(xs, us, es).shape == (2,)
    torch.testing.assert_close(crf.coupling_weight, torch.tensor(1.0, dtype=torch.float64))
    assert float(crf.lam) == 1.0 and float(crf.pairwise_weight.detach()) == 1.0
    assert deepcrf.MultiScaleGaussianCRF is MultiScaleGaussianCRF


def test_multiscale_bad_inputs():
    us, es = _multiscale_inputs([(6, 8), (3, 4)])
    with pytest.raises(ValueError, match="lists of 2 or 3 scales"):
        multiscale_gaussian_crf(us[:1], es[:1])
    with pytest.raises(TypeError, match="must be lists of tensors"):
        multiscale_gaussian_crf(us[0], es[0])
    with pytest.raises(ValueError, match="scales must go from fine to coarse"):
        multiscale_gaussian_crf(us[::-1], es[::-1])
    with pytest.raises(ValueError, match=r"must share B, L, D with scale 0"):
        multiscale_gaussian_crf([us[0], us[1][:, :2]], es)
    with pytest.raises(ValueError, match="num_scales must be 2 or 3"):
        MultiScaleGaussianCRF(3, 4, num_scales=4)
    with pytest.raises(ValueError, match="logits must have num_scales=3 entries"):
        MultiScaleGaussianCRF(3, 4, num_scales=3)(us, es)


@pytest.mark.gpu
@pytest.mark.parametrize("connectivity", [8, "dense"])
def test_cpu_and_cuda_agree(connectivity):
    u, e = _inputs()
    u.requires_grad_(True)
    e.requires_grad_(True)
    cpu = gaussian_crf(u, e, connectivity=connectivity, tol=1e-12)
    g_cpu = torch.autograd.grad(cpu.pow(2).sum(), (u, e))
    uc, ec = u.detach().cuda().requires_grad_(True), e.detach().cuda().requires_grad_(True)
    gpu = gaussian_crf(uc, ec, connectivity=connectivity, tol=1e-12)
    g_gpu = torch.autograd.grad(gpu.pow(2).sum(), (uc, ec))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-10)
    for a, b in zip(g_cpu, g_gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-9)
