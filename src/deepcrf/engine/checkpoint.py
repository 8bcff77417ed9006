"""Checkpoints: safetensors weights + JSON config, written atomically, loaded without pickle.

A run directory ``RUN`` holds the latest checkpoint and, when a validation set is given, the
best one in ``RUN/best``::

    RUN/config.json          model name / num_classes / kwargs, the run config, the step
    RUN/model.safetensors    the weights (``state_dict`` incl. buffers)
    RUN/state.safetensors    everything a resume needs, in ONE file: a copy of the weights
                             (``model.*``), optimiser tensors (``optimizer.*``: momentum buffers,
                             Adam moments), RNG states (``rng.*``), and as JSON in the file's
                             metadata the step, losses, param groups, GradScaler and
                             python/numpy RNG state
    RUN/best/config.json, RUN/best/model.safetensors

Every file is written through :func:`deepcrf._atomic.atomic_path` (temp file + rename), so a
killed process never leaves a half-written file. Each ``.safetensors`` file carries a SHA-256
of its tensors (names, dtypes, shapes and bytes, in name order) in its own metadata
(``sha256``), so the check does not depend on another file written at another moment; every
load verifies it and a damaged, truncated or altered file raises :class:`CheckpointError`
naming the file (files from before the hash load unverified). Because the resume state is a
single file, a kill between two renames cannot pair weights of one step with an optimiser of
another: resume reads only ``state.safetensors``, which is always self-consistent. Loading
never unpickles: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._atomic import atomic_path

FORMAT = "deepcrf-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is damaged, truncated or altered (the message names the file)."""


def content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint's ``.safetensors`` file and verify its content hash.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CheckpointError: the file cannot be parsed (truncated, overwritten) or its tensors do
            not match the hash written with them (bit flips, partial copies).
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint file {p} is damaged or truncated ({err}); restore it from a copy "
            "or retrain"
        ) from err
    expected = meta.get("sha256")
    if expected is not None and content_hash(tensors) != expected:
        raise CheckpointError(
            f"checkpoint file {p} is damaged: its tensors do not match the SHA-256 written with "
            "them (changed bytes); restore it from a copy or retrain"
        )
    return tensors, meta


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    meta = {**meta, "sha256": content_hash(tensors)}
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata={k: str(v) for k, v in meta.items()})


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    return getattr(model, "module", model)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(_dumps(obj))


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage and non-contiguous views: save private copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    state_tensors: Mapping[str, torch.Tensor] | None = None,
    state_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint (weights + config, optionally the resume state) into ``path``.

    Args:
        path: the checkpoint directory (created if missing).
        model: the model (a DDP wrapper is unwrapped).
        config: JSON-serialisable; must contain ``model = {"name", "num_classes", "kwargs"}`` so
            that :func:`load_checkpoint` can rebuild the model through the registry; ``step``
            (if present) is also stored in the weights' metadata.
        state_tensors: optimiser / RNG tensors for ``state.safetensors`` (resume only); the
            weights are added to them under ``model.<name>``.
        state_meta: the JSON part of the resume state; must contain ``step``.

    Returns:
        The directory.
    """
    out = Path(path)
    check_config(config)
    if (state_tensors is None) != (state_meta is None):
        raise ValueError("state_tensors and state_meta must be given together")
    out.mkdir(parents=True, exist_ok=True)
    step = str(config.get("step", ""))
    header = {"format": FORMAT, "format_version": FORMAT_VERSION}
    weights = _state_tensors(unwrap(model))
    if state_meta is not None:
        if str(state_meta.get("step")) != step:
            raise ValueError(f"state step {state_meta.get('step')} != config step {step}")
        tensors = {**dict(state_tensors or {}), **{f"model.{k}": v for k, v in weights.items()}}
        meta = {**header, "step": step, "state": json.dumps({**header, **state_meta})}
        _write_safetensors(out / STATE_FILE, tensors, meta)
    _write_safetensors(out / MODEL_FILE, weights, {"format": FORMAT, "step": step})
    write_json(out / CONFIG_FILE, {**header, **config})
    return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def check_config(config: Mapping[str, Any]) -> None:
    """A checkpoint config: JSON-able, with ``model = {"name", "num_classes", "kwargs"}``."""
    if not isinstance(config, Mapping):
        raise TypeError(f"checkpoint config must be a mapping; got {type(config).__name__}")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config must be JSON-serialisable: {err}") from err
    spec = config.get("model")
    if not isinstance(spec, Mapping) or "name" not in spec or "num_classes" not in spec:
        raise ValueError(
            "checkpoint config must contain model = {'name': ..., 'num_classes': ..., "
            f"'kwargs': {{...}}}} to rebuild the model through the registry; got {spec!r}"
        )


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (MODEL_FILE, CONFIG_FILE):
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    missing = [n for n in (MODEL_FILE, CONFIG_FILE) if not (p / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{p} is not a deepcrf checkpoint: missing {', '.join(missing)} "
            f"(expected a run directory or its best/ subdirectory)"
        )
    return p


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``config.json`` of the checkpoint directory ``path``."""
    p = _resolve(path)
    try:
        config = json.loads((p / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{p / CONFIG_FILE} is damaged (not valid JSON): {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{p / CONFIG_FILE} is not a deepcrf checkpoint config")
    check_config(config)
    return config


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from ``config.json`` through the registry and load its weights.

    Args:
        path: a checkpoint directory (``RUN`` or ``RUN/best``) or a file inside it.
        device: where to put the model.

    Returns:
        ``(model, config)`` with the model in eval mode.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the config is not a deepcrf checkpoint, or the weights do not match the model
            the config describes (the message lists missing / unexpected keys).

    Example:
        >>> model, config = load_checkpoint("runs/voc/best")  # doctest: +SKIP
    """
    from .. import models

    p = _resolve(path)
    config = read_config(p)
    spec = config["model"]
    model = models.create(spec["name"], int(spec["num_classes"]), **dict(spec.get("kwargs", {})))
    load_weights(model, p)
    return model.to(device).eval(), config


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> int | None:
    """Load ``model.safetensors`` from the checkpoint directory ``path`` into ``model`` (strict).

    Returns:
        The step stored in the file's metadata, or ``None``.
    """
    p = _resolve(path)
    tensors, meta = read_safetensors(p / MODEL_FILE)
    assign_weights(model, tensors, str(p / MODEL_FILE))
    step = meta.get("step", "")
    return int(step) if step.isdigit() else None


def assign_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``'s state; every key and shape must match exactly.

    Raises:
        ValueError: missing / unexpected keys or a shape mismatch (named in the message).
    """
    target = unwrap(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"weights in {source} do not match the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"weights in {source} do not match the model: {k} has shape "
            f"{tuple(tensors[k].shape)}, the model expects {tuple(own[k].shape)}"
        )
    target.load_state_dict(dict(tensors), strict=True)


# --------------------------------------------------------------------------------------------
# Training state: optimiser, GradScaler and RNG states, as safetensors + JSON (never pickle).
# --------------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        meta: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                name = f"optimizer.{pid}.{key}"
                tensors[name] = value.detach().to("cpu").contiguous().clone()
                meta[key] = {"tensor": name}
            else:
                meta[key] = value
        state_meta[str(pid)] = meta
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping
) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
            for k, v in entry.items()
        }
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:  # JSON turned Adam's tuple into a list
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(prefix: str = "rng") -> tuple[dict[str, torch.Tensor], dict]:
    """Capture torch (CPU and CUDA), numpy and python RNG states as tensors + JSON."""
    tensors = {f"{prefix}.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}.cuda.{i}"] = s.clone()
    # The legacy global numpy RNG is what user code and transforms draw from: save it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    tensors[f"{prefix}.numpy"] = torch.from_numpy(
        np.asarray(keys, dtype=np.uint32).astype(np.int64)
    )
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping, prefix: str = "rng") -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors[f"{prefix}.torch"])
    cuda = sorted(k for k in tensors if k.startswith(f"{prefix}.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    nm = meta["numpy"]
    keys = tensors[f"{prefix}.numpy"].numpy().astype(np.uint32)
    np.random.set_state((nm["kind"], keys, nm["pos"], nm["has_gauss"], nm["cached"]))  # noqa: NPY002
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def has_training_state(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a resumable checkpoint (``state.safetensors``)."""
    return (Path(path) / STATE_FILE).is_file()


def load_training_state(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``state.safetensors``: ``(weights, other tensors, JSON state)``.

    Raises:
        FileNotFoundError: no resume state in ``path``.
        ValueError: the file is not a deepcrf resume state.
    """
    p = Path(path) / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint with training state in {p.parent}")
    tensors, meta = read_safetensors(p)
    if meta.get("format") != FORMAT or "state" not in meta:
        raise ValueError(f"{p} is not a deepcrf resume state")
    try:
        state = json.loads(meta["state"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file {p} is damaged: its state is not JSON") from err
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    others = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return weights, others, state


# --------------------------------------------------------------------------------------------
# Run directories: never overwritten by accident, verified before a resume.
# --------------------------------------------------------------------------------------------

#: What a run writes into its directory (and an --overwrite removes): nothing else is touched.
RUN_FILES = (CONFIG_FILE, MODEL_FILE, STATE_FILE, "best")


def prepare_run_dir(
    path: str | os.PathLike[str], *, resume: bool, overwrite: bool, main_process: bool = True
) -> Path:
    """Check (and for ``overwrite`` clear) the run directory before training starts.

    * a path that is a file is refused;
    * a fresh run (no ``resume``) into a directory that holds a run already is refused unless
      ``overwrite``, which first deletes that run's files (:data:`RUN_FILES`: its checkpoints
      and ``best/``, so that ``best/`` always belongs to the run beside it) and nothing else;
    * a resume verifies every checkpoint file of the run (content hashes) first, so that a
      damaged file fails now and by name instead of being kept or trained over.

    Raises:
        ValueError: the cases above (:class:`CheckpointError` for a damaged file).
    """
    import shutil

    run = Path(path)
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run} is a file; a run directory is a folder")
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out; --overwrite replaces it: pick one")
    present = [n for n in RUN_FILES if (run / n).exists()]
    if resume:
        for sub in (run, run / "best"):
            for name in (MODEL_FILE, STATE_FILE):
                if (sub / name).is_file():
                    read_safetensors(sub / name)
        return run
    if present and not overwrite:
        step = ""
        try:
            step = f" (step {json.loads((run / CONFIG_FILE).read_text()).get('step')})"
        except (OSError, ValueError):
            pass
        raise ValueError(
            f"--out {run} holds a run already{step}: continue it with --resume, or pass "
            "--overwrite to replace it (deletes its checkpoints and best/)"
        )
    if present and main_process:
        for name in present:
            target = run / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    return run
