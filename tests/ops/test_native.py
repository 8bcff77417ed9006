"""The optional compiled lattice kernel against the PyTorch lattice (the reference)."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

from deepcrf.ops import native
from deepcrf.ops.meanfield import KernelOp, PairwiseTerm, mean_field, step
from deepcrf.ops.permutohedral import PermutohedralLattice

needs_kernel = pytest.mark.skipif(not native.available(), reason=native.status())


def _cloud(batch, n, d, spread, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, n, d, generator=g, dtype=dtype) * spread).to(dtype)


def _pair(features, **kw):
    return (
        PermutohedralLattice(features, backend="torch", **kw),
        PermutohedralLattice(features, backend="native", **kw),
    )


def test_kernel_builds_where_a_compiler_exists():
    # CI and the dev machines have cc: a silent fallback there would leave the kernel untested.
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    if os.environ.get("DEEPCRF_NATIVE", "auto") == "0":
        pytest.skip("DEEPCRF_NATIVE=0: the kernel is switched off for this run")
    assert native.available(), native.status()
    assert "compiled kernel" in native.status()


@needs_kernel
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12])
@pytest.mark.parametrize("compatible", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_lattice_as_pytorch_build(d, compatible, dtype):
    # 2 images, 1 001 points each (not a multiple of 4: densecrf's padding points are hashed).
    f = _cloud(2, 1001, d, 7.0, seed=d, dtype=dtype)
    ref, nat = _pair(f, pydensecrf_compatible=compatible)
    assert nat.backend == "native" and ref.backend == "torch"
    assert nat.num_vertices == ref.num_vertices
    # Same float arithmetic step by step: identical barycentric weights, entry by entry.
    assert torch.equal(nat._slice_idx[1], ref._slice_idx[1])
    # Vertex numbering differs (insertion order vs sorted codes) but must be one relabelling.
    # Vertices touched only by densecrf's padding points have no slice entry: left unmapped.
    m = ref.num_vertices
    va, vb = ref._slice_idx[0].long(), nat._slice_idx[0].long()
    relabel = torch.full((m + 1,), -1, dtype=torch.long)
    relabel[va] = vb
    assert torch.equal(relabel[va], vb)
    mapped = relabel[:m] >= 0
    assert torch.unique(relabel[:m][mapped]).numel() == int(mapped.sum())
    if not compatible:
        assert bool(mapped.all())
    relabel[m] = m  # the always-zero vertex ("missing neighbour")
    image = torch.zeros(m + 1, dtype=torch.bool)
    image[relabel[:m][mapped]] = True
    for (_, col_a), (_, col_b) in zip(ref._blur_idx, nat._blur_idx, strict=True):
        rows_a = col_a.long().reshape(-1, 3)[mapped]
        rows_b = col_b.long().reshape(-1, 3)[relabel[rows_a[:, 0]]]
        nbr_a, nbr_b = rows_a[:, 1:], rows_b[:, 1:]
        known = relabel[nbr_a] >= 0
        assert torch.equal(relabel[nbr_a][known], nbr_b[known])
        assert not bool(image[nbr_b[~known]].any()) and not bool((nbr_b[~known] == m).any())


@needs_kernel
@pytest.mark.parametrize("compatible", [False, True])
def test_striped_build_is_the_one_pass_build(compatible):
    # 70 001 points: large enough to be hashed in one stripe per thread (>= 16 384 points per
    # stripe) and merged; the merge must give exactly the numbering of a single pass, so the
    # index arrays are identical whatever the thread count, and agree with the PyTorch build.
    f = _cloud(1, 70001, 5, 14.0, seed=3, dtype=torch.float32)
    threads = torch.get_num_threads()
    built = []
    try:
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            built.append(
                PermutohedralLattice(f, backend="native", pydensecrf_compatible=compatible)
            )
    finally:
        torch.set_num_threads(threads)
    one = built[0]
    for lat in built[1:]:
        assert lat.num_vertices == one.num_vertices
        assert torch.equal(lat._slice_idx[0], one._slice_idx[0])
        assert torch.equal(lat._slice_idx[1], one._slice_idx[1])
        assert torch.equal(lat._blur_cols, one._blur_cols)
    ref = PermutohedralLattice(f, backend="torch", pydensecrf_compatible=compatible)
    assert ref.num_vertices == one.num_vertices
    v = torch.rand(1, 70001, 3)
    torch.testing.assert_close(built[-1].filter(v), ref.filter(v), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("channels", [1, 7, 21])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("compatible", [False, True])
def test_filter_matches_pytorch_filter(d, channels, transpose, compatible):
    f = _cloud(3, 701, d, 5.0, seed=10 + d)
    v = torch.randn(3, 701, channels, dtype=torch.float64)
    ref, nat = _pair(f, pydensecrf_compatible=compatible)
    expected = ref.filter(v, transpose=transpose)
    torch.testing.assert_close(nat.filter(v, transpose=transpose), expected, rtol=1e-12, atol=1e-12)
    out32 = nat.filter(v.float(), transpose=transpose)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, expected.float(), rtol=2e-5, atol=2e-5)


@needs_kernel
def test_native_lattice_through_pytorch_sparse_path():
    # The splat CSR is derived lazily from the kernel's slice arrays; filtering a native-built
    # lattice with the PyTorch sparse products must give the kernel's answer.
    f = _cloud(2, 500, 3, 4.0, seed=3)
    v = torch.randn(2, 500, 4, dtype=torch.float64)
    lat = PermutohedralLattice(f, backend="native")
    fast = lat.filter(v)
    lat._native = False  # what the PyTorch path would do with these index arrays
    assert lat.backend == "torch"
    torch.testing.assert_close(lat.filter(v), fast, rtol=1e-12, atol=1e-12)


@needs_kernel
def test_gradcheck_through_kernel():
    f = _cloud(1, 40, 3, 3.0, seed=4)
    lat = PermutohedralLattice(f, backend="native")
    v = torch.randn(1, 40, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lat.filter(x), (v,))


def _op_pair(features, **kw):
    return KernelOp(features, backend="torch", **kw), KernelOp(features, backend="native", **kw)


@needs_kernel
@pytest.mark.parametrize("with_pre", [False, True])
@pytest.mark.parametrize("with_post", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_kernel_ops_and_fused_step_match_pytorch(with_pre, with_post, exclude_self):
    g = torch.Generator().manual_seed(5)
    n, c = 2000, 6
    feats = [_cloud(1, n, 5, 6.0, seed=20), _cloud(1, n, 2, 9.0, seed=21)]
    values = torch.rand(n, c, generator=g, dtype=torch.float64)
    base = torch.randn(n, c, generator=g, dtype=torch.float64)
    terms_ref, terms_nat = [], []
    coefs = [torch.tensor(-1.5, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64)]
    for feat, coef in zip(feats, coefs, strict=True):
        pre = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5 if with_pre else None
        post = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5 if with_post else None
        ref, nat = _op_pair(feat, exclude_self=exclude_self)
        assert not ref.native and nat.native
        for transpose in (False, True):
            torch.testing.assert_close(
                nat.apply(values, transpose, pre, post),
                ref.apply(values, transpose, pre, post),
                rtol=1e-12,
                atol=1e-12,
            )
        terms_ref.append(PairwiseTerm(ref, pre, post, coef))
        terms_nat.append(PairwiseTerm(nat, pre, post, coef))
    # one step of the update: the native terms are summed in one kernel pass
    expected = step(base, values, terms_ref, coefs)
    torch.testing.assert_close(
        step(base, values, terms_nat, coefs), expected, rtol=1e-12, atol=1e-12
    )
    manual = base.clone()
    for t, coef in zip(terms_ref, coefs, strict=True):
        manual += coef * t.op.apply(values, False, t.pre, t.post)
    torch.testing.assert_close(expected, manual, rtol=1e-12, atol=1e-12)


def _mean_field_case(n, c, with_pre, with_post, seed=7):
    g = torch.Generator().manual_seed(seed)
    feats = [
        _cloud(1, n, 5, 6.0, seed=seed + 1, dtype=torch.float32),
        _cloud(1, n, 2, 9.0, seed=seed + 2, dtype=torch.float32),
    ]
    base = torch.randn(n, c, generator=g) * 2
    terms_ref, terms_nat = [], []
    for k, feat in enumerate(feats):
        pre = torch.rand(n, 1, generator=g) + 0.5 if with_pre else None
        post = torch.rand(n, 1, generator=g) + 0.5 if with_post else None
        ref, nat = _op_pair(feat, pydensecrf_compatible=True)
        # moderate weights: strong coupling amplifies float32 rounding from step to step
        coef = torch.tensor(-0.8 if k == 0 else -0.4)
        terms_ref.append(PairwiseTerm(ref, pre, post, coef))
        terms_nat.append(PairwiseTerm(nat, pre, post, coef))
    return base, terms_ref, terms_nat


def _mean_field_loop(terms, base, iters):
    """The definition, step by step in PyTorch: Q0 = softmax(base), Q <- softmax(base + Σ)."""
    q = torch.softmax(base, dim=1)
    for _ in range(iters):
        acc = base.clone()
        for t in terms:
            acc += t.coef * t.op.apply(q, False, t.pre, t.post)
        q = torch.softmax(acc, dim=1)
    return q


def _mf(terms, base, iters):
    return mean_field(base, terms, iters, probabilities=True)


@needs_kernel
@pytest.mark.parametrize("c", [1, 5, 8, 21, 32, 33, 48, 49])
@pytest.mark.parametrize("with_pre,with_post", [(False, False), (True, True), (True, False)])
def test_fused_mean_field_matches_the_definition(c, with_pre, with_post):
    # 49 labels exceed the fused kernel's widths: that case runs the step-by-step loop.
    base, terms_ref, terms_nat = _mean_field_case(3000, c, with_pre, with_post)
    for iters in (0, 1, 4):
        expected = _mean_field_loop(terms_ref, base, iters)
        got = _mf(terms_nat, base, iters)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=3e-6)
        # log Q from the kernel's log-softmax output: finite where Q underflows
        log_q = mean_field(base, terms_nat, iters)
        assert torch.isfinite(log_q).all()
        big = expected > 1e-6
        torch.testing.assert_close(log_q[big], expected.log()[big], rtol=1e-4, atol=3e-5)
        # the PyTorch-lattice terms take the step-by-step loop: same numbers
        torch.testing.assert_close(_mf(terms_ref, base, iters), expected, rtol=1e-4, atol=3e-6)
    assert torch.allclose(got.sum(1), torch.ones(3000), atol=1e-5)


@needs_kernel
def test_fused_mean_field_threads_blocks_and_extremes():
    # Point counts that do not fill the blocks of 8 or split evenly between threads, and
    # logits far apart (exp underflows to 0 for all but one label).
    base, _, terms_nat = _mean_field_case(4099, 21, True, True, seed=11)
    base[::7] *= 60.0
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(_mf(terms_nat, base, 5))
    finally:
        torch.set_num_threads(threads)
    expected = _mean_field_loop(terms_nat, base, 5)
    for got in results:
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=3e-6)


@needs_kernel
def test_fused_mean_field_workspace_is_kept_released_and_not_shared():
    # The vertex buffers outlive the call (kept for the next one) until released; calls that
    # overlap in time (ctypes lets other Python threads run) do not share them.
    base, _, terms_nat = _mean_field_case(5000, 21, True, True, seed=12)
    expected = _mf(terms_nat, base, 4)
    assert native.release_workspace() > 0
    assert native.release_workspace() == 0
    torch.testing.assert_close(_mf(terms_nat, base, 4), expected, rtol=0, atol=0)
    other_base = base.flip(0).contiguous()
    other_expected = _mf(terms_nat, other_base, 4)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(k: int) -> None:
        for _ in range(6):
            results[k].append(_mf(terms_nat, base if k == 0 else other_base, 4))

    workers = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got in results[0]:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for got in results[1]:
        torch.testing.assert_close(got, other_expected, rtol=0, atol=0)
    native.release_workspace()


@needs_kernel
def test_mean_field_rejects_bad_arguments():
    base, terms_ref, _ = _mean_field_case(200, 4, False, False)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        mean_field(base, terms_ref, -1)
    with pytest.raises(TypeError, match="iters must be an integer"):
        mean_field(base, terms_ref, 2.0)


@needs_kernel
def test_fused_history_is_the_step_by_step_sequence():
    # The training mode's forward keeps Q_0 … Q_{T−1} from the fused kernel's passes.
    from deepcrf.ops.meanfield import _fused

    base, terms_ref, terms_nat = _mean_field_case(3000, 7, True, True, seed=13)
    coefs = [float(t.coef) for t in terms_nat]
    log_q, kept = _fused(base, terms_nat, coefs, 5, range(5))
    q = torch.softmax(base, dim=1)
    for t in range(5):
        torch.testing.assert_close(kept[t], q, rtol=1e-4, atol=3e-6)
        q = _mean_field_loop(terms_ref, base, t + 1)
    torch.testing.assert_close(log_q.exp(), q, rtol=1e-4, atol=3e-6)
    # a subset is kept, the others go to scratch
    _, some = _fused(base, terms_nat, coefs, 5, [0, 3])
    assert sorted(some) == [0, 3]
    torch.testing.assert_close(some[3], kept[3], rtol=0, atol=0)


@needs_kernel
def test_results_do_not_depend_much_on_thread_count():
    f = _cloud(1, 30000, 5, 20.0, seed=6, dtype=torch.float32)
    v = torch.rand(1, 30000, 5)
    lat = PermutohedralLattice(f, backend="native")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lat.filter(v)
        torch.set_num_threads(max(threads, 2))
        many = lat.filter(v)
    finally:
        torch.set_num_threads(threads)
    # Only the order of the per-thread partial splats differs.
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_rows(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1000, 21, generator=g, dtype=dtype) * 10
    x[0] = torch.tensor([-1e4] * 20 + [0.0], dtype=dtype)  # far below the row maximum
    x[1, :] = 3.0  # ties
    expected = torch.softmax(x.double(), dim=-1)
    got = native.softmax_rows(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    y = x.clone()
    assert native.softmax_rows(y, out=y) is y
    torch.testing.assert_close(y, got)
    # Shapes the kernel does not take go to torch.softmax.
    z = torch.randn(4, 3, 5, dtype=dtype)
    torch.testing.assert_close(native.softmax_rows(z), torch.softmax(z, dim=-1))


def test_env_switch_and_backend_argument(monkeypatch):
    f = _cloud(1, 50, 3, 3.0, seed=8)
    monkeypatch.setenv("DEEPCRF_NATIVE", "0")
    assert not native.available()
    assert "DEEPCRF_NATIVE=0" in native.status()
    assert PermutohedralLattice(f).backend == "torch"
    with pytest.raises(RuntimeError, match="backend='native' unavailable"):
        PermutohedralLattice(f, backend="native")
    monkeypatch.setenv("DEEPCRF_NATIVE", "maybe")
    with pytest.raises(ValueError, match="DEEPCRF_NATIVE must be auto, 0 or 1"):
        native.available()
    monkeypatch.delenv("DEEPCRF_NATIVE")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'native'"):
        PermutohedralLattice(f, backend="cuda")


def test_missing_compiler_falls_back_or_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPCRF_NATIVE", "auto")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("DEEPCRF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-deepcrf")
    assert native.library() is None
    assert "no C compiler" in native.status()
    f = _cloud(1, 50, 2, 3.0, seed=9)
    assert PermutohedralLattice(f).backend == "torch"
    monkeypatch.setenv("DEEPCRF_NATIVE", "1")
    with pytest.raises(RuntimeError, match="DEEPCRF_NATIVE=1 but no C compiler"):
        native.library()


def test_broken_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPCRF_NATIVE", "auto")
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("DEEPCRF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    assert native.library() is None
    assert "compiling the lattice kernel failed" in native.status()
    assert "fakecc: cannot compile" in native.status()
    # Nothing half-written is left in the cache.
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_compiles_into_cache_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPCRF_NATIVE", "auto")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("DEEPCRF_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert native.library() is not None, native.status()
    files = [p.name for p in tmp_path.iterdir()]
    assert len(files) == 1 and files[0].startswith("lattice_kernel_") and files[0].endswith(".so")
    # A second process-level load reuses the cached library instead of compiling again.
    monkeypatch.setattr(native, "_loaded", {})
    assert native.library() is not None
    assert [p.name for p in tmp_path.iterdir()] == files


@pytest.mark.parametrize("n, c", [(1, 1), (7, 9), (1000, 21), (5001, 48), (300, 16)])
def test_label_matmul_equals_torch(n, c):
    if not native.available():
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(n + c)
    x = torch.randn(n, c, generator=g)
    a = torch.randn(c, c, generator=g)
    out = torch.full((n, c), float("nan"))
    assert native.label_matmul(x, a, out)
    torch.testing.assert_close(out, x @ a, rtol=1e-5, atol=1e-5)
    acc = torch.randn(n, c, generator=g)  # accumulate: every row read before any is written
    want = acc + x @ a
    assert native.label_matmul(x, a, acc, accumulate=True)
    torch.testing.assert_close(acc, want, rtol=1e-5, atol=1e-5)
    # what the kernel does not take is left to the caller
    assert not native.label_matmul(x.double(), a.double(), out.double())
    assert not native.label_matmul(x, torch.randn(c, c + 1), out)
    wide = torch.randn(4, 49)
    assert not native.label_matmul(wide, torch.randn(49, 49), torch.empty(4, 49))


@needs_kernel
def test_argument_structs_match_the_kernel():
    # The loader refuses a library whose argument structs differ from the ctypes mirrors
    # (a field added on one side only would shift every later argument).
    lib = native.library()
    assert native._declare(lib) is None
    wide = type("_Wide", (native._Terms,), {"_fields_": [("extra", native._I64)]})
    saved = native._STRUCTS
    try:
        native._STRUCTS = (wide, *saved[1:])
        assert "_Wide" in native._declare(lib)
    finally:
        native._STRUCTS = saved
        native._declare(lib)


@needs_kernel
def test_every_kernel_call_goes_through_the_typed_wrappers():
    # One module talks to the library: no other module names a kernel entry point.
    import pathlib

    src = pathlib.Path(native.__file__).resolve().parents[1]
    names = [n for n in native._PROTOTYPES if not n.startswith("deepcrf_kernel")]
    offenders = [
        f"{path.relative_to(src)}: {name}"
        for path in src.rglob("*.py")
        if path.name != "native.py"
        for name in names
        if name in path.read_text()
    ]
    assert offenders == []
