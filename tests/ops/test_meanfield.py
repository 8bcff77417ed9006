"""The mean-field engine: both modes, every term shape, against brute-force references."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from deepcrf.ops import native
from deepcrf.ops.filters import exact_gaussian_filter
from deepcrf.ops.meanfield import (
    KernelOp,
    PairwiseTerm,
    _reduce_coef,
    build_term,
    mean_field,
    row_sum_error,
    sweep,
)

DT = torch.float64
needs_kernel = pytest.mark.skipif(not native.available(), reason=native.status())


def _features(b, n, d, spread, seed, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, d, generator=g, dtype=dtype) * spread


def _coef(shape, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    if shape == "potts":  # αI + β𝟙𝟙ᵀ: the forward reduces it, the backward's shortcut applies
        alpha, beta = torch.rand(2, generator=g, dtype=DT) * 2 - 0.5
        return alpha * torch.eye(num_classes, dtype=DT) + beta
    size = {"scalar": (), "vector": (num_classes,), "matrix": (num_classes, num_classes)}[shape]
    return torch.rand(size, generator=g, dtype=DT) * 2 - 0.5


def _brute_force(base, feats, coefs, normalization, exclude_self, iters):
    """Equation (1) with the explicit N×N kernel matrices, batch item by batch item."""
    b = feats[0].shape[0]
    n = feats[0].shape[1]
    out = []
    for i in range(b):
        u = base[i * n : (i + 1) * n]
        mats = []
        for f in feats:
            diff = f[i][:, None, :] - f[i][None, :, :]
            k = torch.exp(-0.5 * diff.square().sum(-1))
            if exclude_self:
                k = k - torch.eye(n, dtype=k.dtype)
            s = k.sum(1).clamp_min(1e-10)
            if normalization == "symmetric":
                k = k / s.sqrt()[:, None] / s.sqrt()[None, :]
            elif normalization == "before":
                k = k / s[None, :]
            elif normalization == "after":
                k = k / s[:, None]
            mats.append(k)
        q = u.softmax(-1)
        z = u
        for _ in range(iters):
            z = u.clone()
            for k, a in zip(mats, coefs, strict=True):
                msg = k @ q
                z = z + (msg @ a if a.dim() == 2 else msg * a)
            q = z.softmax(-1)
        out.append(z.log_softmax(-1))
    return torch.cat(out)


@pytest.mark.parametrize(
    "normalization, exclude_self",
    [("symmetric", False), ("before", True), ("after", False), ("none", True)],
)
@pytest.mark.parametrize("shape", ["scalar", "vector", "matrix", "potts"])
def test_exact_terms_match_brute_force(normalization, exclude_self, shape):
    b, n, num = 2, 30, 4
    feats = [_features(b, n, 3, 3.0, seed=1), _features(b, n, 2, 2.0, seed=2)]
    coefs = [_coef(shape, num, 3), _coef(shape, num, 4)]
    base = torch.randn(b * n, num, dtype=DT, generator=torch.Generator().manual_seed(5))
    terms = [
        build_term(f, c, normalization=normalization, exclude_self=exclude_self, method="exact")
        for f, c in zip(feats, coefs, strict=True)
    ]
    got = mean_field(base, terms, 4)
    ref = _brute_force(base, feats, coefs, normalization, exclude_self, 4)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "normalization, shape",
    list(
        itertools.product(
            ["symmetric", "before", "after", "none"], ["scalar", "vector", "matrix", "potts"]
        )
    ),
)
def test_training_mode_gradcheck_exact(normalization, shape):
    # base, every label map and the features (hence bandwidths) at once, float64, exact filter
    b, n, num = 2, 12, 3
    f1 = _features(b, n, 3, 2.5, seed=6).requires_grad_()
    f2 = _features(b, n, 2, 2.0, seed=7).requires_grad_()
    c1 = _coef(shape, num, 8).requires_grad_()
    c2 = _coef(shape, num, 9).requires_grad_()
    base = torch.randn(b * n, num, dtype=DT, generator=torch.Generator().manual_seed(10))
    base.requires_grad_()

    def run(base, f1, f2, c1, c2):
        terms = [
            build_term(
                f,
                c,
                normalization=normalization,
                exclude_self=normalization == "none",
                method="exact",
            )
            for f, c in ((f1, c1), (f2, c2))
        ]
        return mean_field(base, terms, 3)

    assert torch.autograd.gradcheck(run, (base, f1, f2, c1, c2), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", ["potts", "matrix", "vector"])
def test_gradcheck_logits_and_label_maps_only(shape):
    # the backward's one-filtering path (no factor or feature gradients)
    b, n, num = 2, 12, 3
    f1, f2 = _features(b, n, 3, 2.5, seed=31), _features(b, n, 2, 2.0, seed=32)
    c1 = _coef(shape, num, 33).requires_grad_()
    c2 = _coef(shape, num, 34).requires_grad_()
    base = torch.randn(b * n, num, dtype=DT, generator=torch.Generator().manual_seed(35))
    base.requires_grad_()
    t1, t2 = build_term(f1, c1, method="exact"), build_term(f2, c2, method="exact")

    def run(base, c1, c2):
        return mean_field(base, [replace(t1, coef=c1), replace(t2, coef=c2)], 3)

    assert torch.autograd.gradcheck(run, (base, c1, c2), eps=1e-6, atol=1e-7)


def test_checkpoint_gives_the_same_gradients():
    b, n, num = 1, 40, 3
    f = _features(b, n, 3, 3.0, seed=11).requires_grad_()
    c = _coef("matrix", num, 12).requires_grad_()
    base = torch.randn(b * n, num, dtype=DT, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        term = build_term(f, c, method="exact")
        out = mean_field(base, [term], 7, checkpoint=ckpt)
        grads.append(torch.autograd.grad((out * out.detach().exp()).sum(), (base, f, c)))
    for a, b_ in zip(*grads, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", ["scalar", "vector", "matrix"])
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_inference_mode_equals_training_mode(shape, dtype):
    b, n, num = 2, 500, 5
    feats = [
        _features(b, n, 5, 6.0, seed=13, dtype=dtype),
        _features(b, n, 2, 5.0, seed=14, dtype=dtype),
    ]
    coefs = [_coef(shape, num, 15).to(dtype), _coef(shape, num, 16).to(dtype)]
    base = torch.randn(b * n, num, dtype=dtype, generator=torch.Generator().manual_seed(17))
    terms = [build_term(f, c) for f, c in zip(feats, coefs, strict=True)]
    with torch.no_grad():
        fast = mean_field(base, terms, 5)
    slow = mean_field(base.clone().requires_grad_(), terms, 5)
    assert slow.requires_grad
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(fast.exp(), slow.detach().exp(), rtol=0, atol=tol)


@pytest.mark.parametrize("learn", ["coef", "features"])
@pytest.mark.parametrize("d_bil, d_sp", [(5, 2), (4, 3), (8, 3), (9, 1)])
def test_native_gradients_equal_pytorch_lattice_gradients(learn, d_bil, d_sp):
    # d = 5, 2: an RGB image; 4, 3: a one-modality volume; 8: a volume with 5 channels.
    if not native.available():
        pytest.skip(native.status())
    b, n, num = 2, 3000, 6
    f_bil = _features(b, n, d_bil, 8.0, seed=18)
    f_sp = _features(b, n, d_sp, 12.0, seed=19)
    base = torch.randn(b * n, num, dtype=DT, generator=torch.Generator().manual_seed(20))
    grads = {}
    for backend in ("torch", "native"):
        fb = f_bil.clone().requires_grad_(learn == "features")
        fs = f_sp.clone().requires_grad_(learn == "features")
        c1 = _coef("matrix", num, 21).requires_grad_()
        c2 = torch.tensor(0.7, dtype=DT, requires_grad=True)
        x = base.clone().requires_grad_()
        terms = []
        for f, c in ((fb, c1), (fs, c2)):
            op = KernelOp(f, backend=backend)
            sums = op.row_sums(DT) if learn == "coef" else None
            if learn == "coef":
                pre = post = sums.rsqrt()
                terms.append(PairwiseTerm(op, pre, post, c))
            else:
                terms.append(replace(build_term(f, c), op=op))
        assert all(t.op.native == (backend == "native") for t in terms)
        out = mean_field(x, terms, 4)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=DT).reshape(out.shape)).sum()
        wrt = (x, c1, c2) + ((fb, fs) if learn == "features" else ())
        grads[backend] = torch.autograd.grad(loss, wrt)
    for a, b_ in zip(grads["torch"], grads["native"], strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-5, atol=1e-9)


def test_batch_equals_each_image_alone():
    b, n, num = 4, 400, 5
    f = _features(b, n, 5, 7.0, seed=22, dtype=torch.float32)
    base = torch.randn(b * n, num, generator=torch.Generator().manual_seed(23))
    c = torch.tensor(2.0)
    together = mean_field(base, [build_term(f, c)], 5)
    for i in range(b):
        alone = mean_field(base[i * n : (i + 1) * n], [build_term(f[i : i + 1], c)], 5)
        torch.testing.assert_close(together[i * n : (i + 1) * n], alone, rtol=1e-5, atol=1e-5)


def test_reduce_coef_is_exact_and_only_when_it_may():
    torch.manual_seed(0)
    num = 5
    a = torch.randn(num)
    c = torch.randn(num)
    # diag(a) + c 1ᵀ off the diagonal: reduces to a vector
    mat = c[:, None].expand(num, num).clone()
    mat.diagonal().copy_(a + c)
    red = _reduce_coef(mat)
    assert red.dim() == 1
    torch.testing.assert_close(red, a)
    x = torch.randn(50, num)
    torch.testing.assert_close((x @ mat).softmax(-1), (x * red).softmax(-1))
    # Potts with a scalar weight becomes a scalar
    potts = -2.0 * (1 - torch.eye(num))
    assert _reduce_coef(potts).dim() == 0 and float(_reduce_coef(potts)) == pytest.approx(2.0)
    # a general matrix stays a matrix
    assert _reduce_coef(torch.randn(num, num)).dim() == 2


def test_row_sum_error_is_zero_for_exact_and_large_for_narrow_lattice():
    wide = KernelOp(_features(1, 2000, 2, 10.0, seed=24, dtype=torch.float32))
    narrow = KernelOp(_features(1, 2000, 5, 60.0, seed=25, dtype=torch.float32))
    exact = KernelOp(_features(1, 200, 2, 3.0, seed=26), method="exact")
    assert row_sum_error(exact) == 0.0
    assert row_sum_error(wide) < 0.1
    assert row_sum_error(narrow) > row_sum_error(wide)
    # the sampled estimate against the full exact row sums
    f = narrow.features
    full = exact_gaussian_filter(torch.ones(1, 2000, 1), f)[0, :, 0]
    approx = narrow.row_sums(torch.float32)[:, 0]
    true_err = float(((approx - full).abs() / full).mean())
    assert row_sum_error(narrow, samples=2000) == pytest.approx(true_err, rel=1e-3)


def test_bad_arguments():
    f = _features(1, 20, 2, 2.0, seed=27)
    term = build_term(f, torch.tensor(1.0, dtype=DT), method="exact")
    base = torch.randn(20, 3, dtype=DT)
    with pytest.raises(ValueError, match="iters"):
        mean_field(base, [term], -1)
    with pytest.raises(ValueError, match="normalization"):
        build_term(f, torch.tensor(1.0), normalization="row")
    with pytest.raises(ValueError, match="method"):
        KernelOp(f, method="fft")
    with pytest.raises(ValueError, match="P = 19"):
        mean_field(base[:19], [term], 2)
    with pytest.raises(ValueError, match="coef"):
        mean_field(base, [replace(term, coef=torch.ones(4, dtype=DT))], 2)
    with pytest.raises(ValueError, match="pre"):
        mean_field(base, [replace(term, pre=torch.ones(20, dtype=DT))], 2)
    with pytest.raises(ValueError, match="base"):
        mean_field(base[0], [term], 2)
    with pytest.raises(TypeError, match="PairwiseTerm"):
        mean_field(base, [object()], 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_in_both_modes():
    b, n, num = 2, 2000, 6
    f = _features(b, n, 5, 8.0, seed=28, dtype=torch.float32).requires_grad_()
    c = _coef("matrix", num, 29).float().requires_grad_()
    base = torch.randn(b * n, num, generator=torch.Generator().manual_seed(30))
    results = []
    for dev in ("cpu", "cuda"):
        fd = f.detach().to(dev).requires_grad_()
        cd = c.detach().to(dev).requires_grad_()
        term = build_term(fd, cd)
        with torch.no_grad():
            fast = mean_field(base.to(dev), [term], 5)
        out = mean_field(base.to(dev), [build_term(fd, cd)], 5)
        gf, gc = torch.autograd.grad(out.exp().square().sum(), (fd, cd))
        results.append([fast.cpu(), out.detach().cpu(), gf.cpu(), gc.cpu()])
    for a, b_ in zip(*results, strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-3, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_native_moments_match_the_stacked_filterings(transpose, exclude_self):
    # the compiled moment pass (blocks never stored) against filtering [v, f_1 v, ...] blocks
    n, c, d = 5000, 7, 5
    f = _features(1, n, d, 8.0, seed=40, dtype=torch.float32)
    g = torch.Generator().manual_seed(41)
    v = torch.rand(n, c, generator=g)
    r = torch.randn(n, c, generator=g)
    fc = torch.randn(n, d, generator=g)
    ref = KernelOp(f, backend="torch", exclude_self=exclude_self)
    nat = KernelOp(f, backend="native", exclude_self=exclude_self)
    plain_ref, s_ref = ref.moments(v, fc, r, transpose, plain=True)
    plain_nat, s_nat = nat.moments(v, fc, r, transpose, plain=True)
    torch.testing.assert_close(plain_nat, plain_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_nat, s_ref, rtol=1e-4, atol=1e-4)
    manual = torch.stack(
        [(r * ref.apply(fc[:, k : k + 1] * v, transpose)).sum(-1) for k in range(d)], 1
    )
    torch.testing.assert_close(s_ref[:, 1:], manual, rtol=1e-5, atol=1e-5)
    _, no_plain = nat.moments(v, fc[:, :0], r, transpose)
    torch.testing.assert_close(no_plain[:, 0], s_nat[:, 0], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_native_feature_gradients_float32_equal_pytorch_lattice():
    b, n, num = 2, 3000, 6
    feats = [
        _features(b, n, 5, 8.0, seed=42, dtype=torch.float32),
        _features(b, n, 2, 12.0, seed=43, dtype=torch.float32),
    ]
    base = torch.randn(b * n, num, generator=torch.Generator().manual_seed(44))
    grads = {}
    for backend in ("torch", "native"):
        fs = [f.clone().requires_grad_() for f in feats]
        c1 = _coef("matrix", num, 45).float().requires_grad_()
        terms = []
        for f, c in zip(fs, (c1, torch.tensor(0.7)), strict=True):
            op = KernelOp(f, backend=backend)
            terms.append(replace(build_term(f, c), op=op))
        out = mean_field(base, terms, 4)
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        grads[backend] = torch.autograd.grad(loss, (*fs, c1))
    for a, b_ in zip(grads["torch"], grads["native"], strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-3, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("c", [3, 21, 48])
def test_fused_gram_and_softmax_backward_match_torch(c):
    # lattice_filter_f32 accumulates leftᵀ·out in its slice pass; softmax_backward in one pass
    n = 6000
    f = _features(1, n, 5, 8.0, seed=50, dtype=torch.float32)
    g = torch.Generator().manual_seed(51)
    v, left = torch.rand(n, c, generator=g), torch.rand(n, c, generator=g)
    pre, post = torch.rand(n, 1, generator=g) + 0.5, torch.rand(n, 1, generator=g) + 0.5
    op = KernelOp(f, backend="native")
    for transpose in (False, True):
        acc = torch.zeros(c, c, dtype=torch.float64)
        out = op.apply(v, transpose, pre, post, gram=(left, acc))
        torch.testing.assert_close(out, op.apply(v, transpose, pre, post), rtol=0, atol=0)
        torch.testing.assert_close(acc, left.double().T @ out.double(), rtol=1e-5, atol=1e-4)
    q = torch.rand(n, c, generator=g).softmax(-1)
    dq = torch.randn(n, c, generator=g)
    total = torch.randn(n, c, generator=g)
    expected_total = total + q * (dq - (q * dq).sum(-1, keepdim=True))
    gq = torch.empty_like(q)
    assert native.softmax_backward(q, dq, gq, total)
    torch.testing.assert_close(gq, q * (dq - (q * dq).sum(-1, keepdim=True)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-6)
    assert not native.softmax_backward(q.double(), dq.double(), gq.double(), total.double())


@needs_kernel
def test_native_coef_gradients_float32_equal_pytorch_lattice():
    # the backward's one-filtering path with the fused Gram and softmax backward (float32)
    b, n, num = 2, 3000, 6
    f_bil = _features(b, n, 5, 8.0, seed=52, dtype=torch.float32)
    f_sp = _features(b, n, 2, 12.0, seed=53, dtype=torch.float32)
    base = torch.randn(b * n, num, generator=torch.Generator().manual_seed(54))
    grads = {}
    for backend in ("torch", "native"):
        coefs = [
            _coef("matrix", num, 55).float().requires_grad_(),
            _coef("potts", num, 56).float().requires_grad_(),
        ]
        x = base.clone().requires_grad_()
        terms = []
        for f, c in zip((f_bil, f_sp), coefs, strict=True):
            op = KernelOp(f, backend=backend)
            s = op.row_sums(torch.float32).rsqrt()
            terms.append(PairwiseTerm(op, s, s, c))
        out = mean_field(x, terms, 4)
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        grads[backend] = torch.autograd.grad(loss, (x, *coefs))
    # The label-map gradients sum over 6000 points and 4 iterations: both float32 paths are
    # 2-3e-4 from a float64 run here, so that is the tolerance.
    torch.testing.assert_close(grads["native"][0], grads["torch"][0], rtol=1e-3, atol=1e-5)
    for a, b_ in zip(grads["torch"][1:], grads["native"][1:], strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-3, atol=5e-4)


def _separate_runs(base, terms, weights, iters, probabilities):
    """The reference for sweep: one mean_field call per weight row."""
    runs = []
    for row in weights.tolist():
        ts = [
            replace(t, coef=torch.tensor(w, dtype=base.dtype))
            for t, w in zip(terms, row, strict=True)
        ]
        runs.append(mean_field(base, ts, iters, probabilities=probabilities))
    return torch.stack(runs)


@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize(
    "backend, dtype, num",
    [
        ("native", torch.float32, 6),  # 6 runs of 6 labels: one fused call (grouped softmax)
        ("native", torch.float32, 12),  # 4 runs per call: chunks of 4 and 1 (the last alone)
        ("native", torch.float32, 20),  # wide runs: one fused call each
        ("native", torch.float32, 3),  # 3 labels in 8-lane vectors: blocks straddle vectors
        ("native", DT, 5),  # float64: the PyTorch loop over blocks on the compiled filter
        ("torch", torch.float32, 6),  # the pure-PyTorch lattice
    ],
)
def test_sweep_equals_separate_mean_fields(backend, dtype, num, probabilities):
    if backend == "native" and not native.available():
        pytest.skip(native.status())
    b, n = 2, 900
    g = torch.Generator().manual_seed(40)
    f_bil = _features(b, n, 5, 6.0, seed=41, dtype=dtype)
    f_sp = _features(b, n, 2, 10.0, seed=42, dtype=dtype)
    terms = []
    for f in (f_bil, f_sp):
        t = build_term(f, torch.tensor(1.0, dtype=dtype))
        terms.append(replace(t, op=KernelOp(f, backend=backend)) if backend == "torch" else t)
        if backend == "torch":  # the normalisation from the same lattice as the filter
            sums = terms[-1].op.row_sums(dtype)
            terms[-1] = replace(terms[-1], pre=sums.rsqrt(), post=sums.rsqrt())
    base = torch.randn(b * n, num, generator=g, dtype=dtype) * 3
    weights = torch.tensor([[5.0, 3.0], [0.5, 8.0], [10.0, 0.0], [-2.0, 1.0], [3.0, 3.0]])
    if num == 6:
        weights = torch.cat([weights, torch.tensor([[7.0, 2.0]])])
    got = sweep(base, terms, weights, 6, probabilities=probabilities)
    want = _separate_runs(base, terms, weights, 6, probabilities)
    assert got.shape == (weights.shape[0], b * n, num)
    if probabilities:
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]))
        tol = 1e-11 if dtype == DT else 2e-5
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
    else:  # log Q: compare where Q is not vanishingly small (the log amplifies rounding there)
        tol = 1e-10 if dtype == DT else 1e-4
        keep = want > -12
        torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=tol)
        torch.testing.assert_close(got.exp(), want.exp(), rtol=0, atol=tol)


def test_sweep_exact_filter_matches_brute_force():
    b, n, num = 1, 40, 3
    feats = [_features(b, n, 3, 3.0, seed=43), _features(b, n, 2, 2.0, seed=44)]
    base = torch.randn(b * n, num, dtype=DT, generator=torch.Generator().manual_seed(45))
    terms = [build_term(f, torch.tensor(1.0, dtype=DT), method="exact") for f in feats]
    weights = torch.tensor([[1.5, -0.5], [0.2, 2.0], [3.0, 1.0]], dtype=DT)
    got = sweep(base, terms, weights, 4)
    for g_, row in zip(got, weights, strict=True):
        want = _brute_force(base, feats, list(row), "symmetric", False, 4)
        torch.testing.assert_close(g_, want, rtol=0, atol=1e-10)


def test_sweep_zero_iterations_and_bad_weights():
    f = _features(1, 50, 2, 3.0, seed=46, dtype=torch.float32)
    terms = [build_term(f, torch.tensor(1.0))]
    base = torch.randn(50, 4)
    out = sweep(base, terms, torch.tensor([[1.0], [2.0]]), 0)
    torch.testing.assert_close(out, base.log_softmax(-1).expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"weights must be a \(G, M\) tensor"):
        sweep(base, terms, torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="M = 1 terms"):
        sweep(base, terms, torch.ones(2, 2), 3)
    with pytest.raises(ValueError, match="finite"):
        sweep(base, terms, torch.tensor([[float("nan")]]), 3)
    with pytest.raises(ValueError, match="iters"):
        sweep(base, terms, torch.ones(1, 1), -1)


def test_sweep_blocks_far_apart_take_their_own_maximum():
    """Runs whose logits differ by hundreds: the blocked softmax falls back to per-block shifts."""
    if not native.available():
        pytest.skip(native.status())
    b, n, num = 1, 900, 6
    f_bil = _features(b, n, 5, 6.0, seed=47, dtype=torch.float32)
    f_sp = _features(b, n, 2, 10.0, seed=48, dtype=torch.float32)
    terms = [build_term(f, torch.tensor(1.0)) for f in (f_bil, f_sp)]
    base = torch.randn(b * n, num, generator=torch.Generator().manual_seed(49)) * 3
    weights = torch.tensor([[300.0, 0.0], [1.0, 1.0], [-300.0, 50.0], [0.0, 0.0]])
    got = sweep(base, terms, weights, 5, probabilities=True)
    assert bool(torch.isfinite(got).all())
    want = _separate_runs(base, terms, weights, 5, True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # logits of ~300 in float32
