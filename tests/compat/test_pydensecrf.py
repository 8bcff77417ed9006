import numpy as np
import pytest

import deepcrf.compat.pydensecrf.densecrf as dcrf
from deepcrf.compat.pydensecrf import eigen
from deepcrf.compat.pydensecrf.utils import (
    create_pairwise_bilateral,
    create_pairwise_gaussian,
    unary_from_labels,
    unary_from_softmax,
)
from tests.conftest import REFERENCE_CASE


def _small_case(w=23, h=17, labels=4, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    image[: h // 2, : w // 2] = (200, 30, 40)  # a flat region so the bilateral kernel matters
    logits = rng.normal(size=(labels, h, w)).astype(np.float32) * 2
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return image, unary_from_softmax(probs)


def _deeplab_crf(module, image, unary, labels):
    h, w = image.shape[:2]
    crf = module.DenseCRF2D(w, h, labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4)
    return crf


# ----------------------------------------------------------------------------- golden case
@pytest.fixture(scope="module")
def reference():
    if not REFERENCE_CASE.exists():
        pytest.skip("shared/reference/densecrf_voc_case.npz not available")
    return np.load(REFERENCE_CASE)


@pytest.mark.parametrize("lattice", ["auto", "0"], ids=["kernel-if-available", "pytorch"])
def test_matches_pydensecrf_golden_output(reference, lattice, monkeypatch):
    """Golden q5/q10: pydensecrf2 1.1, DeepLab v1 parameters (shared/reference/README.md).

    Run with the compiled lattice kernel (when it builds here) and with the PyTorch lattice.
    """
    monkeypatch.setenv("DEEPCRF_NATIVE", lattice)
    image, unary = reference["image"], reference["unary"]
    labels, h, w = unary.shape
    crf = _deeplab_crf(dcrf, image, unary.reshape(labels, -1), labels)
    for n in (5, 10):
        q = np.array(crf.inference(n)).reshape(labels, h, w)
        ref = reference[f"q{n}"].astype(np.float32)
        agreement = (q.argmax(0) == ref.argmax(0)).mean()
        assert agreement >= 0.999, (n, agreement)
        assert np.abs(q - ref).mean() <= 1e-3, n
        # float16 storage limits |ΔQ| to ~5e-4 per entry; allow for near-ties.
        assert np.quantile(np.abs(q - ref), 0.999) < 5e-3


# ----------------------------------------------------------------------------- API behaviour
def test_shapes_dtypes_and_layout():
    image, unary = _small_case()
    crf = _deeplab_crf(dcrf, image, unary, 4)
    q = crf.inference(3)
    assert isinstance(q, np.ndarray) and q.dtype == np.float32 and q.shape == (4, 23 * 17)
    assert q.flags.f_contiguous  # like pydensecrf's column-major Eigen matrix
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    q0 = crf.inference(0)
    expected = np.exp(-unary) / np.exp(-unary).sum(0)
    np.testing.assert_allclose(q0, expected, rtol=1e-5, atol=1e-6)


def test_step_inference_equals_inference():
    image, unary = _small_case(seed=1)
    crf = _deeplab_crf(dcrf, image, unary, 4)
    q, tmp1, tmp2 = crf.startInference()
    for _ in range(4):
        crf.stepInference(q, tmp1, tmp2)
    np.testing.assert_allclose(q, crf.inference(4), rtol=1e-5, atol=1e-6)
    # tmp1 holds the logits of the last step and tmp2 the last pairwise message.
    np.testing.assert_allclose(np.exp(tmp1) / np.exp(tmp1).sum(0), q, rtol=1e-5, atol=1e-6)
    assert np.abs(tmp2).max() > 0


def test_kl_divergence_decreases_along_mean_field():
    image, unary = _small_case(seed=2)
    crf = _deeplab_crf(dcrf, image, unary, 4)
    kls = [crf.klDivergence(crf.inference(n)) for n in (0, 1, 5)]
    assert all(isinstance(k, float) for k in kls)
    assert kls[2] < kls[0]


def test_no_unary_gives_uniform_start():
    crf = dcrf.DenseCRF(6, 3)
    np.testing.assert_allclose(crf.inference(0), np.full((3, 6), 1 / 3, np.float32))


def test_package_import_forms():
    from deepcrf.compat import pydensecrf

    assert pydensecrf.densecrf.DenseCRF2D is dcrf.DenseCRF2D
    assert pydensecrf.utils.unary_from_softmax is unary_from_softmax
    assert int(dcrf.NORMALIZE_SYMMETRIC) == 3 and int(dcrf.DIAG_KERNEL) == 1
    assert eigen.matrixXf(np.ones((2, 3), np.float32)).dtype == np.float32


def test_non_contiguous_inputs_accepted():
    image, unary = _small_case(seed=4)
    ref = _deeplab_crf(dcrf, image, unary, 4).inference(2)
    image_nc = np.asfortranarray(image)
    unary_nc = np.asfortranarray(unary)
    assert not image_nc.flags.c_contiguous and not unary_nc.flags.c_contiguous
    np.testing.assert_array_equal(_deeplab_crf(dcrf, image_nc, unary_nc, 4).inference(2), ref)


def test_compat_does_not_mutate_inputs():
    image, unary = _small_case(seed=3)
    image0, unary0 = image.copy(), unary.copy()
    crf = _deeplab_crf(dcrf, image, unary, 4)
    crf.inference(2)
    assert np.array_equal(image, image0) and np.array_equal(unary, unary0)


def test_bad_inputs_raise_clear_errors():
    image, unary = _small_case()
    crf = dcrf.DenseCRF2D(23, 17, 4)
    with pytest.raises(
        ValueError, match=r"unary energy has 5 labels but the CRF was created with 4"
    ):
        crf.setUnaryEnergy(np.zeros((5, 23 * 17), np.float32))
    with pytest.raises(ValueError, match=r"float32"):
        crf.setUnaryEnergy(unary.astype(np.float64))
    with pytest.raises(ValueError, match=r"unary energy must be finite"):
        bad = unary.copy()
        bad[0, 3] = np.nan
        crf.setUnaryEnergy(bad)
    with pytest.raises(ValueError, match=r"reshape it"):
        crf.setUnaryEnergy(unary.reshape(4, 17, 23))
    with pytest.raises(ValueError, match=r"looks transposed"):
        crf.setUnaryEnergy(np.ascontiguousarray(unary.T))
    with pytest.raises(ValueError, match=r"looks like \(W, H, 3\)"):
        crf.addPairwiseBilateral(10, 5, np.ascontiguousarray(image.transpose(1, 0, 2)), 4)
    with pytest.raises(ValueError, match=r"rgbim must be uint8"):
        crf.addPairwiseBilateral(10, 5, image.astype(np.float32), 4)
    with pytest.raises(ValueError, match=r"rgbim must have shape \(H, W, 3\) = \(17, 23, 3\)"):
        crf.addPairwiseBilateral(10, 5, image[:5], 4)
    with pytest.raises(ValueError, match=r"rgbim must have 3 colour channels"):
        crf.addPairwiseBilateral(10, 5, np.zeros((17, 23, 4), np.uint8), 4)
    with pytest.raises(ValueError, match=r"rgbim must not be empty"):
        dcrf.DenseCRF2D(23, 17, 4).addPairwiseBilateral(10, 5, np.zeros((0, 23, 3), np.uint8), 4)
    with pytest.raises(ValueError, match=r"one entry per label \(4\)"):
        crf.addPairwiseGaussian(3, np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"compat as a matrix must be \(labels, labels\)"):
        crf.addPairwiseGaussian(3, np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"dimension >2 not meaningful"):
        crf.addPairwiseGaussian(3, np.ones((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"kernel must be CONST_KERNEL"):
        crf.addPairwiseGaussian(3, 3, kernel=7)
    with pytest.raises(ValueError, match=r"normalization must be NO_NORMALIZATION"):
        crf.addPairwiseGaussian(3, 3, normalization=9)
    with pytest.raises(ValueError, match=r"sxy must be finite and positive"):
        crf.addPairwiseGaussian(0, 3)
    with pytest.raises(ValueError, match=r"features must be \(D, variables\)"):
        crf.addPairwiseEnergy(np.zeros((23 * 17, 2), np.float32), 3)
    with pytest.raises(ValueError, match=r"w must be a positive integer"):
        dcrf.DenseCRF2D(0, 17, 4)
    with pytest.raises(ValueError, match=r"niter must be a non-negative integer"):
        crf.inference(-1)
    with pytest.raises(ValueError, match=r"Q must be a float32 array of shape"):
        crf.klDivergence(np.zeros((3, 23 * 17), np.float32))


# ----------------------------------------------------------------------------- utils
def test_unary_from_softmax_checks_and_values():
    probs = np.full((3, 4, 5), 1 / 3, dtype=np.float32)
    u = unary_from_softmax(probs)
    assert u.shape == (3, 20) and u.dtype == np.float32
    np.testing.assert_allclose(u, -np.log(1 / 3), rtol=1e-6)
    with pytest.raises(ValueError, match=r"summing to 1 along axis 0"):
        unary_from_softmax(np.random.default_rng(0).normal(size=(3, 4, 5)) ** 2)
    with pytest.raises(ValueError, match=r"summing to 1 along axis 0"):
        unary_from_softmax(np.moveaxis(probs, 0, -1)[..., :2] * 0 + 0.2)
    with pytest.raises(ValueError, match=r"scale must be in \(0, 1\]"):
        unary_from_softmax(probs, scale=1.5)


def test_unary_from_labels_values_and_checks():
    labels = np.array([[0, 1], [2, 3]])
    u = unary_from_labels(labels, 3, 0.7)
    assert u.shape == (3, 4) and u.dtype == np.float32
    np.testing.assert_allclose(u[:, 0], -np.log(1 / 3), rtol=1e-6)
    np.testing.assert_allclose(u[0, 1], -np.log(0.7), rtol=1e-6)
    np.testing.assert_allclose(u[1, 1], -np.log(0.15), rtol=1e-6)
    with pytest.raises(ValueError, match=r"gt_prob must be in \(0, 1\)"):
        unary_from_labels(labels, 3, 1.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        unary_from_labels(labels, 3, 0.5, zero_unsure=False)


def test_pairwise_feature_helpers():
    g = create_pairwise_gaussian((2.0, 4.0), (3, 5))
    assert g.shape == (2, 15) and g.dtype == np.float32
    np.testing.assert_allclose(g[:, 7], [1 / 2, 2 / 4])  # pixel (row 1, col 2)
    img = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    b = create_pairwise_bilateral((2.0, 4.0), (1.0, 2.0, 4.0), img, chdim=2)
    assert b.shape == (5, 15)
    np.testing.assert_allclose(b[2:, 7], img[1, 2] / np.array([1.0, 2.0, 4.0]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"sdims must give one scale per grid axis"):
        create_pairwise_gaussian((2.0,), (3, 5))
    with pytest.raises(ValueError, match=r"schan must be one number or one per channel"):
        create_pairwise_bilateral((2.0, 4.0), (1.0, 2.0), img, chdim=2)


# ----------------------------------------------------------------------------- vs pydensecrf
@pytest.fixture(scope="module")
def pyd():
    return pytest.importorskip("pydensecrf.densecrf")


def _matrix_compat(labels, seed):
    m = np.random.default_rng(seed).normal(size=(labels, labels)).astype(np.float32)
    return m  # deliberately not symmetric: both libraries symmetrise it


COMPATS = {
    "potts": lambda labels: 3.0,
    "potts_int": lambda labels: 2,
    "diag": lambda labels: np.linspace(-2, 1, labels).astype(np.float32),
    "matrix": lambda labels: _matrix_compat(labels, 5),
}


@pytest.mark.parametrize("normalization", [0, 1, 2, 3])
@pytest.mark.parametrize("compat", sorted(COMPATS))
@pytest.mark.parametrize("kernel", [0, 1, 2])
def test_variants_match_installed_pydensecrf(pyd, normalization, compat, kernel):
    image, unary = _small_case(w=21, h=13, labels=4, seed=normalization + 7 * kernel)
    results = []
    for module in (pyd, dcrf):
        crf = module.DenseCRF2D(21, 13, 4)
        crf.setUnaryEnergy(unary)
        c = COMPATS[compat](4)
        crf.addPairwiseGaussian(
            sxy=(2.0, 3.0),
            compat=c,
            kernel=module.KernelType(kernel) if module is pyd else kernel,
            normalization=normalization
            if module is dcrf
            else module.NormalizationType(normalization),
        )
        crf.addPairwiseBilateral(
            sxy=15,
            srgb=(10, 13, 20),
            rgbim=image,
            compat=c,
            kernel=kernel if module is dcrf else module.KernelType(kernel),
            normalization=normalization
            if module is dcrf
            else module.NormalizationType(normalization),
        )
        results.append((np.array(crf.inference(3)), crf.klDivergence(crf.inference(2))))
    (q_ref, kl_ref), (q, kl) = results
    np.testing.assert_allclose(q, q_ref, atol=2e-4)
    assert kl == pytest.approx(kl_ref, rel=1e-4, abs=1e-2)


def test_pairwise_energy_and_step_inference_match_installed_pydensecrf(pyd):
    image, unary = _small_case(w=19, h=11, labels=3, seed=11)
    feats_b = create_pairwise_bilateral((7.0, 9.0), (13.0,), image[..., 0], chdim=-1)
    feats_g = create_pairwise_gaussian((2.0, 2.0), (11, 19))
    outs = []
    for module in (pyd, dcrf):
        crf = module.DenseCRF(19 * 11, 3)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseEnergy(feats_g, compat=2.0)
        crf.addPairwiseEnergy(feats_b, compat=np.array([1.0, 2.0, 3.0], np.float32))
        q, t1, t2 = crf.startInference()
        for _ in range(3):
            crf.stepInference(q, t1, t2)
        outs.append(np.array(q))
    # (pydensecrf's tmp1/tmp2 wrappers do not expose the resized Eigen buffers, so only Q is
    # compared; tmp1/tmp2 are checked against Q in test_step_inference_equals_inference.)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=2e-4)


def test_utils_match_installed_pydensecrf():
    utils = pytest.importorskip("pydensecrf.utils")
    rng = np.random.default_rng(0)
    p = rng.random((5, 6, 7)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    for kw in ({}, {"scale": 0.8}, {"clip": None}):
        np.testing.assert_array_equal(
            unary_from_softmax(p, **kw), utils.unary_from_softmax(p, **kw)
        )
    labels = rng.integers(0, 4, size=(6, 7))
    for zero_unsure in (True, False):
        np.testing.assert_array_equal(
            unary_from_labels(labels, 4, 0.6, zero_unsure),
            utils.unary_from_labels(labels, 4, 0.6, zero_unsure),
        )
    np.testing.assert_array_equal(
        create_pairwise_gaussian((3, 5), (6, 7)), utils.create_pairwise_gaussian((3, 5), (6, 7))
    )
    img = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        create_pairwise_bilateral((3, 5), (10, 20, 30), img, chdim=2),
        utils.create_pairwise_bilateral((3, 5), (10, 20, 30), img, chdim=2),
    )


# ------------------------------------------------------- pydensecrf's argument checks, exactly
# (name, compat, what happens): None = accepted; pydensecrf's typed buffers raise ValueError for
# another dtype or dimension and TypeError for what is not a buffer.
COMPAT_CASES = [
    ("python int", 3, None),
    ("python float", 3.5, None),
    ("numpy float64 scalar", np.float64(2.0), None),
    ("numpy int64 scalar", np.int64(2), None),
    ("bool", True, None),
    ("float32 vector", np.array([1.0, 2.0], np.float32), None),
    ("float32 matrix", np.eye(2, dtype=np.float32), None),
    ("float64 vector", np.array([1.0, 2.0]), ValueError),
    ("int64 vector", np.array([1, 2]), ValueError),
    ("float64 matrix", np.eye(2), ValueError),
    ("0-d float32 array", np.array(2.0, np.float32), ValueError),
    ("0-d float64 array", np.array(2.0), ValueError),
    ("list", [1.0, 2.0], TypeError),
    ("string", "potts", TypeError),
    ("None", None, TypeError),
]


def _outcome(fn):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return type(exc)
    return None


def _add_bilateral(module, compat):
    d = module.DenseCRF2D(5, 4, 2)
    img = np.zeros((4, 5, 3), np.uint8)
    return lambda: d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=img, compat=compat)


@pytest.mark.parametrize("name, compat, expected", COMPAT_CASES, ids=[c[0] for c in COMPAT_CASES])
def test_compat_argument_checks_are_pydensecrfs(name, compat, expected):
    assert _outcome(_add_bilateral(dcrf, compat)) is expected


@pytest.mark.parametrize("name, compat, expected", COMPAT_CASES, ids=[c[0] for c in COMPAT_CASES])
def test_compat_argument_checks_match_pydensecrf(pyd, name, compat, expected):
    assert _outcome(_add_bilateral(pyd, compat)) is expected


EIGEN_CASES = [  # (name, value, matrixXf outcome, vectorXf outcome)
    ("float32 matrix", np.zeros((2, 3), np.float32), None, ValueError),
    ("float32 vector", np.zeros(3, np.float32), ValueError, None),
    ("float64 matrix", np.zeros((2, 3)), ValueError, ValueError),
    ("float64 vector", np.zeros(3), ValueError, ValueError),
    ("int32 matrix", np.zeros((2, 2), np.int32), ValueError, ValueError),
    ("list", [[1.0]], TypeError, TypeError),
    ("None", None, TypeError, TypeError),
]


@pytest.mark.parametrize("name, value, as_matrix, as_vector", EIGEN_CASES,
                         ids=[c[0] for c in EIGEN_CASES])  # fmt: skip
def test_eigen_argument_checks_are_pydensecrfs(name, value, as_matrix, as_vector):
    assert _outcome(lambda: eigen.matrixXf(value)) is as_matrix
    assert _outcome(lambda: eigen.vectorXf(value)) is as_vector
    if as_matrix is None:
        out = eigen.matrixXf(value)
        assert out.dtype == np.float32 and out.flags.f_contiguous and out is not value


@pytest.mark.parametrize("name, value, as_matrix, as_vector", EIGEN_CASES,
                         ids=[c[0] for c in EIGEN_CASES])  # fmt: skip
def test_eigen_argument_checks_match_pydensecrf(name, value, as_matrix, as_vector):
    peer = pytest.importorskip("pydensecrf.eigen")
    assert _outcome(lambda: peer.matrixXf(value)) is as_matrix
    assert _outcome(lambda: peer.vectorXf(value)) is as_vector


def _logistic_case(seed=0, labels=3, dim=4, n=20):
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((labels, dim)).astype(np.float32)
    feats = rng.standard_normal((dim, n)).astype(np.float32)
    return weights, feats


def test_logistic_unary_is_the_energy_L_f():
    weights, feats = _logistic_case()
    d = dcrf.DenseCRF(20, 3)
    d.setUnary(dcrf.LogisticUnary(weights, feats))
    q = np.array(d.inference(0))
    energy = weights @ feats  # lower energy, higher probability
    expected = np.exp(-energy - (-energy).max(0)) / np.exp(-energy - (-energy).max(0)).sum(0)
    np.testing.assert_allclose(q, expected, rtol=1e-5, atol=1e-6)
    assert (q.argmax(0) == energy.argmin(0)).all()


def test_logistic_unary_matches_pydensecrf(pyd):
    weights, feats = _logistic_case(seed=1)
    qs = []
    for module in (pyd, dcrf):
        d = module.DenseCRF(20, 3)
        d.setUnary(module.LogisticUnary(weights, feats))
        qs.append(np.array(d.inference(0)))
    np.testing.assert_allclose(qs[1], qs[0], rtol=1e-5, atol=1e-6)


def test_set_unary_energy_with_features_checks_u_as_pydensecrf():
    weights, feats = _logistic_case()  # u (3, 4): a classifier, not (labels, variables)
    d = dcrf.DenseCRF(20, 3)
    with pytest.raises(ValueError, match=r"Bad shape for unary energy \(Need \(3, 20\)"):
        d.setUnaryEnergy(weights, feats)
    u = np.random.default_rng(2).standard_normal((3, 20)).astype(np.float32)
    f = np.random.default_rng(3).standard_normal((20, 20)).astype(np.float32)
    d.setUnaryEnergy(u, f)  # (L, N) with (N, N) features: the logistic energy u·f
    energy = u @ f
    assert (np.array(d.inference(0)).argmax(0) == energy.argmin(0)).all()
    with pytest.raises(TypeError, match="must not be None"):
        d.setUnaryEnergy(None)


def test_set_unary_energy_with_features_matches_pydensecrf(pyd):
    weights, feats = _logistic_case()
    with pytest.raises(ValueError, match="Bad shape for unary energy"):
        pyd.DenseCRF(20, 3).setUnaryEnergy(weights, feats)
    u = np.random.default_rng(2).standard_normal((3, 20)).astype(np.float32)
    f = np.random.default_rng(3).standard_normal((20, 20)).astype(np.float32)
    qs = []
    for module in (pyd, dcrf):
        d = module.DenseCRF(20, 3)
        d.setUnaryEnergy(u, f)
        qs.append(np.array(d.inference(0)))
    np.testing.assert_allclose(qs[1], qs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 2])
def test_volume_features_match_installed_pydensecrf(pyd, channels):
    # A 3-D volume through pydensecrf's generic N-d path (d = 3 + C): same Q.
    rng = np.random.default_rng(5)
    shape = (7, 9, 11)
    vol = rng.uniform(0, 100, (*shape, channels)).astype(np.float32)
    unary = rng.uniform(0, 3, (3, int(np.prod(shape)))).astype(np.float32)
    feats_b = create_pairwise_bilateral((2.0, 4.0, 4.0), (30.0,) * channels, vol, chdim=3)
    feats_g = create_pairwise_gaussian((1.0, 2.0, 2.0), shape)
    assert feats_b.shape == (3 + channels, unary.shape[1])
    outs = []
    for module in (pyd, dcrf):
        crf = module.DenseCRF(unary.shape[1], 3)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseEnergy(feats_g, compat=3.0)
        crf.addPairwiseEnergy(feats_b, compat=5.0)
        outs.append(np.array(crf.inference(5)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=2e-4)
