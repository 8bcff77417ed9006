"""Fuzz the public entry points with seeded malformed inputs.

Every case starts from a valid call and breaks one argument (shape, rank, dtype, values, type,
emptiness). Each must end in a correct result (finite, the right shape) or a ValueError /
TypeError whose message names the broken argument; nothing may crash, hang or return NaN.
"""

import time

import numpy as np
import pytest
import torch

import deepcrf.compat.pydensecrf.densecrf as dcrf
from deepcrf.crf.contextual import ContextualCRF
from deepcrf.crf.dense import DenseCRF, dense_crf, refine
from deepcrf.crf.gaussian import GaussianCRF

CASES_PER_TARGET = 200  # 6 targets: 1 200 cases


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _mutate_tensor(rng, x):
    """A broken version of tensor ``x`` and what was done."""
    kind = _pick(
        rng,
        ["rank-", "rank+", "dim", "empty", "nan", "inf", "int", "bool", "complex", "list",
         "none", "string", "transpose", "huge", "negative", "f16", "f64", "noncontig"]
    )  # fmt: skip
    if kind == "rank-":
        return x[0], kind
    if kind == "rank+":
        return x[None], kind
    if kind == "dim":
        d = int(rng.integers(0, x.dim()))
        size = list(x.shape)
        size[d] = max(1, size[d] + int(_pick(rng, [-2, -1, 1, 3])))
        return torch.rand(size, dtype=x.dtype) * (x.max() if x.numel() else 1), kind
    if kind == "empty":
        d = int(rng.integers(0, x.dim()))
        return x.narrow(d, 0, 0), kind
    if kind in ("nan", "inf"):
        y = x.clone().float() if not x.is_floating_point() else x.clone()
        y.view(-1)[int(rng.integers(0, y.numel()))] = float(kind)
        return y, kind
    if kind == "int":
        return x.long(), kind
    if kind == "bool":
        return x > x.mean(), kind
    if kind == "complex":
        return x.to(torch.complex64), kind
    if kind == "list":
        return x.tolist(), kind
    if kind == "none":
        return None, kind
    if kind == "string":
        return "image.png", kind
    if kind == "transpose":
        return x.transpose(-1, -2), kind
    if kind == "huge":
        return x * 1e30, kind
    if kind == "negative":
        return -x - 1, kind
    if kind == "f16":
        return x.half(), kind
    if kind == "f64":
        return x.double(), kind
    return x.transpose(-1, -2).contiguous().transpose(-1, -2), kind  # noncontig


def _mutate_scalar(rng):
    return _pick(rng, [0.0, -1.0, float("nan"), float("inf"), -1e-9, 1e30, "3", None, True,
                       (1.0, 2.0, 3.0, 4.0, 5.0), [], 1e-30])  # fmt: skip


def _outcome(fn, names):
    """Run ``fn``: "ok" (a finite result), "error" (a Value/TypeError naming one of ``names``)
    or a description of what went wrong (anything else)."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except (ValueError, TypeError) as err:
        msg = str(err)
        if not any(n in msg for n in names):
            return f"error does not name {names}: {msg!r}"
        return "error" if time.perf_counter() - t0 < 20 else "a single call took over 20 s"
    if time.perf_counter() - t0 >= 20:
        return "a single call took over 20 s"
    arrays = out if isinstance(out, (list, tuple)) else [out]
    for a in arrays:
        a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
        if not bool(torch.isfinite(a.float()).all()):
            return "a result with NaN/inf"
    return "ok"


def _dense_case(rng):
    b, num, h, w = 1, 3, 6, 7
    args = {
        "logits": torch.randn(b, num, h, w),
        "image": torch.rand(b, 3, h, w) * 255,
        "iters": 2,
        "theta_alpha": 20.0,
        "theta_beta": 13.0,
        "theta_gamma": 3.0,
        "w_bilateral": 4.0,
        "w_spatial": 3.0,
        "compat": None,
        "spacing": None,
    }
    name = _pick(rng, list(args))
    if isinstance(args[name], torch.Tensor):
        args[name], _ = _mutate_tensor(rng, args[name])
    elif name == "compat":
        args[name], _ = _mutate_tensor(rng, torch.rand(num, num))
    elif name == "iters":
        args[name] = _pick(rng, [-1, 1.5, "2", None, True, 0])
    else:
        args[name] = _mutate_scalar(rng)
    return name, args


@pytest.mark.parametrize("seed", range(CASES_PER_TARGET))
def test_fuzz_dense_crf(seed):
    rng = np.random.default_rng(seed)
    name, args = _dense_case(rng)
    names = [name, "logits", "image"] if name in ("logits", "image") else [name]
    outcome = _outcome(lambda: dense_crf(**args), names)
    assert outcome in ("ok", "error"), outcome


@pytest.mark.parametrize("seed", range(CASES_PER_TARGET))
def test_fuzz_dense_crf_module(seed):
    rng = np.random.default_rng(10_000 + seed)
    name, args = _dense_case(rng)
    keys = ("theta_alpha", "theta_beta", "theta_gamma", "w_bilateral", "w_spatial", "iters")
    init = {k: args[k] for k in keys if not isinstance(args[k], torch.Tensor)}

    def call():
        crf = DenseCRF(3, learnable=("compat", "weights", "bandwidths"), **init)
        return crf(args["logits"], args["image"], spacing=args["spacing"])

    outcome = _outcome(call, [name, "logits", "image", "num_classes"])
    assert outcome in ("ok", "error"), outcome


@pytest.mark.parametrize("seed", range(CASES_PER_TARGET))
def test_fuzz_refine(seed):
    rng = np.random.default_rng(20_000 + seed)
    image = rng.integers(0, 255, (6, 7, 3)).astype(np.uint8)
    probs = rng.random((3, 6, 7)).astype(np.float32)
    probs /= probs.sum(0)
    args = {"image": image, "probs": probs}
    name = _pick(rng, ["image", "probs", "theta_alpha", "iters"])
    if name in ("image", "probs"):
        broken, _ = _mutate_tensor(rng, torch.from_numpy(args[name].astype(np.float32)))
        args[name] = broken.numpy() if isinstance(broken, torch.Tensor) else broken
        if name == "image" and isinstance(args[name], np.ndarray) and args[name].dtype.kind == "c":
            args[name] = args[name].astype(np.complex64)
    params = {}
    if name == "theta_alpha":
        params["theta_alpha"] = _mutate_scalar(rng)
    if name == "iters":
        params["iters"] = _pick(rng, [-1, 1.5, "2", None])
    outcome = _outcome(lambda: refine(args["probs"], args["image"], **params),
                       [name, "image", "probs"])  # fmt: skip
    assert outcome in ("ok", "error"), outcome


@pytest.mark.parametrize("seed", range(CASES_PER_TARGET))
def test_fuzz_gaussian_crf(seed):
    rng = np.random.default_rng(30_000 + seed)
    args = {"logits": torch.randn(1, 3, 6, 7), "embeddings": torch.randn(1, 4, 6, 7)}
    name = _pick(rng, list(args))
    args[name], _ = _mutate_tensor(rng, args[name])
    crf = GaussianCRF(3, 4)
    outcome = _outcome(lambda: crf(args["logits"], args["embeddings"]),
                       [name, "logits", "embeddings"])  # fmt: skip
    assert outcome in ("ok", "error"), outcome


@pytest.mark.parametrize("seed", range(CASES_PER_TARGET))
def test_fuzz_contextual_crf(seed):
    rng = np.random.default_rng(40_000 + seed)
    feats, _ = _mutate_tensor(rng, torch.randn(1, 4, 6, 6))
    crf = ContextualCRF(4, 3, hidden_channels=8)
    outcome = _outcome(lambda: crf(feats), ["features"])
    assert outcome in ("ok", "error"), outcome


@pytest.mark.parametrize("seed", range(CASES_PER_TARGET))
def test_fuzz_compat_pydensecrf(seed):
    rng = np.random.default_rng(50_000 + seed)
    w, h, num = 7, 6, 3
    unary = rng.random((num, w * h)).astype(np.float32)
    image = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
    name = _pick(rng, ["U", "rgbim", "sxy", "compat", "niter"])
    values = {"U": unary, "rgbim": image, "sxy": 20.0, "compat": 4.0, "niter": 3}
    if name in ("U", "rgbim"):
        broken, _ = _mutate_tensor(rng, torch.from_numpy(values[name].astype(np.float32)))
        values[name] = broken.numpy() if isinstance(broken, torch.Tensor) else broken
    elif name == "niter":
        values[name] = _pick(rng, [-1, 1.5, "2", None])
    else:
        values[name] = _mutate_scalar(rng)

    def call():
        crf = dcrf.DenseCRF2D(w, h, num)
        crf.setUnaryEnergy(values["U"])
        crf.addPairwiseGaussian(sxy=3, compat=values["compat"])
        crf.addPairwiseBilateral(sxy=values["sxy"], srgb=13, rgbim=values["rgbim"], compat=4)
        return np.array(crf.inference(values["niter"]))

    aliases = {"U": ["U", "unary", "u ", "buffer", "Buffer"], "rgbim": ["rgbim", "image"],
               "niter": ["niter", "iterations"]}  # fmt: skip
    outcome = _outcome(call, aliases.get(name, [name]))
    assert outcome in ("ok", "error"), outcome


def test_the_checker_catches_what_it_must():
    # The fuzz tests above can fail: a wrong answer, an unnamed error or a crash is reported.
    assert _outcome(lambda: torch.tensor([1.0, float("nan")]), ["x"]) == "a result with NaN/inf"
    assert _outcome(lambda: torch.ones(2), ["x"]) == "ok"

    def unnamed():
        raise ValueError("something went wrong")

    def named():
        raise TypeError("x must be a tensor")

    assert _outcome(unnamed, ["x"]).startswith("error does not name")
    assert _outcome(named, ["x"]) == "error"
    with pytest.raises(RuntimeError):
        _outcome(lambda: torch.ones(2) @ torch.ones(3), ["x"])  # a crash is not swallowed
