"""What the CLI's train / evaluate / predict subcommands do, as plain functions.

Each takes a checked config (:mod:`deepcrf.engine.config`) or a checkpoint and returns a
JSON-able dict, so the CLI only parses flags and prints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._atomic import check_outputs
from . import checkpoint as ckpt
from .config import TrainSettings
from .distributed import (
    barrier,
    init_from_env,
    is_main_process,
    launched_by_torchrun,
    rank_and_world,
)
from .evaluation import evaluate, predict_logits
from .train import fit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Keyword arguments of deepcrf.crf.dense.dense_crf a post-processing CRF may set.
DENSE_CRF_PARAMS = (
    "iters", "theta_alpha", "theta_beta", "theta_gamma", "w_bilateral", "w_spatial",
    "normalization", "exclude_self", "method",
)  # fmt: skip


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def model_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name", "num_classes", "kwargs"}`` that rebuild the config's model via the registry.

    ``pretrained`` is left out: it only initialises a fresh model, and a checkpoint must load
    without the ImageNet file being present.
    """
    m = config["model"]
    kwargs = dict(m["kwargs"])
    if m["crf"] is not None:
        kwargs["crf"] = m["crf"]
        if m["crf_kwargs"]:
            kwargs["crf_kwargs"] = dict(m["crf_kwargs"])
    elif m["crf_kwargs"]:
        raise ValueError("model.crf_kwargs is set but model.crf is not")
    return {"name": m["name"], "num_classes": int(m["num_classes"]), "kwargs": kwargs}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """A fresh model from the config (ImageNet weights when ``model.pretrained`` is set)."""
    from .. import models

    spec = model_spec(config)
    kwargs = dict(spec["kwargs"])
    if config["model"]["pretrained"] is not None:
        kwargs["pretrained"] = config["model"]["pretrained"]
    return models.create(spec["name"], spec["num_classes"], **kwargs)


def init_weights(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Initialise ``model`` from a checkpoint (e.g. stage 1 before stage 2).

    The checkpoint's weights must cover the model's, except the ``crf.*`` parameters, which keep
    their initial values: so a CNN trained alone (stage 1, names ``backbone.*``) initialises the
    same CNN inside a CNN+CRF model (names ``model.backbone.*``).

    Returns:
        The names of the model's tensors that were not in the checkpoint (the CRF's).

    Raises:
        ValueError: a non-CRF tensor of the model is missing or has another shape.
    """
    p = Path(path)
    file = p / ckpt.MODEL_FILE if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"init checkpoint not found: {file}")
    tensors, _ = ckpt.read_safetensors(file)
    own = model.state_dict()
    wrapped = not any(k in tensors for k in own) and hasattr(model, "model")
    renamed = {f"model.{k}": v for k, v in tensors.items()} if wrapped else dict(tensors)
    skipped = [k for k in own if k not in renamed and k.startswith("crf.")]
    missing = [k for k in own if k not in renamed and not k.startswith("crf.")]
    if missing:
        raise ValueError(
            f"{file} cannot initialise this model: it lacks {len(missing)} tensors, e.g. "
            f"{missing[:5]}"
        )
    for k in own:
        if k in renamed and tuple(renamed[k].shape) != tuple(own[k].shape):
            raise ValueError(
                f"{file} cannot initialise this model: {k} has shape "
                f"{tuple(renamed[k].shape)}, the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict({k: renamed[k] for k in own if k in renamed}, strict=False)
    return skipped


def _train_transform(data: Mapping[str, Any]) -> Callable:
    from ..data.transforms import train_transform

    crop = data["crop_size"]
    scale = (data["scale_min"], data["scale_max"])
    return train_transform(
        tuple(crop) if isinstance(crop, list) else crop,
        scale_range=None if scale == (1.0, 1.0) else scale,
        flip=data["flip"],
    )


def dataset_for(config: Mapping[str, Any], split: str, transform: Callable | None) -> Any:
    """The dataset of ``split`` as a run config's ``[data]`` and ``[model]`` describe it."""
    from ..data import build_dataset

    root = config["data"]["root"]
    if root is None:
        raise ValueError("no data directory: pass --data DIR (a VOC-layout folder)")
    return build_dataset(
        root,
        split,
        num_classes=int(config["model"]["num_classes"]),
        transform=transform,
        sbd_root=config["data"]["sbd_root"],
    )


def class_names(num_classes: int, root: str | os.PathLike[str] | None = None) -> list[str] | None:
    """The class names reports use, else ``None`` (ids are used).

    A synthetic tree's own (its ``deepcrf_synthetic.json``), else VOC's for 21 classes.
    """
    from ..data import VOC_CLASSES
    from ..data.synthetic import META_FILE
    from ..data.voc import find_voc_root

    if root is not None:
        try:
            meta = json.loads((find_voc_root(root) / META_FILE).read_text())
        except (OSError, ValueError):
            meta = None
        names = meta.get("class_names") if isinstance(meta, dict) else None
        if (
            isinstance(names, list)
            and len(names) == num_classes
            and all(isinstance(n, str) for n in names)
        ):
            return list(names)
    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else None


class UntrainedBackboneWarning(UserWarning):
    """A VGG-16 model is about to be trained from random weights (no ImageNet file, no init)."""


def run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as a checkpoint stores it: ``[train]`` without fit's settings.

    Those are stored once, as the checkpoint's ``"fit"``; :func:`saved_run_config` puts them
    back.
    """
    fit_keys = {f.name for f in dataclasses.fields(TrainSettings)}
    run = copy.deepcopy(dict(config))
    run["train"] = {k: v for k, v in run.get("train", {}).items() if k not in fit_keys}
    return run


def saved_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The full run config of the checkpoint in ``run_dir`` (for ``deepcrf train --resume``)."""
    saved = ckpt.read_config(run_dir)
    run = saved.get("run")
    if not isinstance(run, dict):
        raise ValueError(f"cannot resume: {run_dir}'s config.json holds no run config")
    fit_keys = {f.name for f in dataclasses.fields(TrainSettings)}
    settings = {k: v for k, v in dict(saved.get("fit") or {}).items() if k in fit_keys}
    return {**run, "train": {**dict(run.get("train") or {}), **settings}}


def train_run(
    config: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    check_data: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train as ``config`` says, writing checkpoints to ``out``; the CLI's ``train``.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) this process joins the process group first.
    Before the first step: ``out`` must not hold another run (unless ``overwrite``; a resume
    verifies its files), every training and validation file is checked once
    (:meth:`deepcrf.data.voc.SegmentationFiles.check`, one report of every bad file; off
    with ``check_data=False``), and a VGG-16 model without ``model.pretrained`` or
    ``train.init`` warns (:class:`UntrainedBackboneWarning`).

    Returns:
        ``{"run_dir", "steps", "start_step", "final_loss", "losses", "seconds", "best_miou",
        "val", "world_size", "device"}``.
    """
    t = config["train"]
    device = init_from_env(t["device"]) if launched_by_torchrun() else resolve_device(t["device"])
    rank, world = rank_and_world()
    ckpt.prepare_run_dir(out, resume=resume, overwrite=overwrite, main_process=rank == 0)
    barrier()
    train_set = dataset_for(config, config["data"]["train_split"], _train_transform(config["data"]))
    val_split = config["data"]["val_split"]
    val_set = dataset_for(config, val_split, None) if val_split else None
    if check_data:
        problems = [p for ds in (train_set, val_set) if ds is not None for p in ds.check()]
        if problems:
            shown = "\n  ".join(problems[:50])
            more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
            raise ValueError(
                f"{len(problems)} bad file(s) in the dataset (checked before training; "
                f"--skip-data-check skips this):\n  {shown}{more}"
            )
    name = config["model"]["name"]
    if (
        not name.startswith("small")
        and config["model"]["pretrained"] is None
        and t["init"] is None
        and not resume
    ):
        warnings.warn(
            f"training {name} (VGG-16) from RANDOM weights: no --pretrained (local torchvision "
            "VGG-16 file) and no --init. The papers start from ImageNet weights; from scratch "
            "the results will be far below theirs",
            UntrainedBackboneWarning,
            stacklevel=2,
        )
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(t["seed"])
    model = build_model(config)
    if t["init"] is not None and not resume:
        init_weights(model, t["init"])
    num_classes = int(config["model"]["num_classes"])
    eval_cfg = config["eval"]
    settings = TrainSettings.from_config(t)
    result = fit(
        model,
        train_set,
        settings,
        device=device,
        progress=progress,
        num_workers=config["data"]["num_workers"],
        run_dir=out,
        config={"model": model_spec(config), "run": run_config(config)},
        checkpoint_every=t["checkpoint_every"],
        checkpoint_seconds=(
            None if t["checkpoint_minutes"] is None else 60.0 * float(t["checkpoint_minutes"])
        ),
        resume=resume,
        val_dataset=val_set,
        val_every=t["val_every"],
        val_kwargs={
            "num_classes": num_classes,
            "use_crf": eval_cfg["use_crf"],
            "max_images": t["val_max_images"],
            "trimap_bands": (),
            "class_names": class_names(num_classes, config["data"]["root"]),
        },
    )
    losses = result["losses"]
    return {
        "run_dir": str(out),
        "steps": result["steps"],
        "start_step": result["start_step"],
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "seconds": result["seconds"],
        "best_miou": result["best_miou"],
        "val": result["val"],
        "world_size": world,
        "device": str(device),
    }


def dense_postprocess(params: Mapping[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """``postprocess(logits, image)`` running :func:`deepcrf.crf.dense.dense_crf` with ``params``.

    Raises:
        ValueError: a key that ``dense_crf`` does not take.
    """
    from ..crf.dense import dense_crf

    unknown = sorted(set(params) - set(DENSE_CRF_PARAMS))
    if unknown:
        raise ValueError(
            f"unknown dense CRF parameters {unknown}; valid: {', '.join(DENSE_CRF_PARAMS)}"
        )
    kwargs = dict(params)

    def postprocess(logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return dense_crf(logits, image, **kwargs)

    return postprocess


def crf_params_for(config: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict:
    """Post-processing CRF parameters: the model's DeepLab defaults, the config's, the override.

    Missing values take ``dense_crf``'s defaults (Krähenbühl & Koltun's example values), so the
    result lists every parameter actually used.
    """
    import inspect

    from ..crf.dense import dense_crf

    signature = inspect.signature(dense_crf).parameters
    params: dict[str, Any] = {k: signature[k].default for k in DENSE_CRF_PARAMS if k in signature}
    name = config.get("model", {}).get("name")
    try:
        from ..models.deeplab import DEEPLAB_CRF_DEFAULTS

        params.update(DEEPLAB_CRF_DEFAULTS.get(name, {}))
    except ImportError:  # the DeepLab models are optional for this helper
        pass
    run = config.get("run", {})
    params.update(run.get("eval", {}).get("crf_params", {}))
    params.update(override or {})
    return params


def read_crf_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Dense-CRF parameters from a JSON file or an inline JSON object.

    A file holds ``tune-crf``'s output (its ``best`` is used) or a plain object; a string
    starting with ``{`` is parsed as the object itself.

    Example:
        >>> read_crf_params('{"w_bilateral": 4, "theta_alpha": 121}')
        {'w_bilateral': 4, 'theta_alpha': 121}
    """
    import json

    text = str(path).strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--crf-params is not a valid inline JSON object: {err}") from err
        source = "the inline --crf-params"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"CRF parameter file not found: {p} (give a JSON file or an inline object such "
                "as '{\"w_bilateral\": 4}')"
            )
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{p} is not valid JSON: {err}") from err
        source = str(p)
    if isinstance(data, dict) and isinstance(data.get("best"), dict):
        data = data["best"].get("params", data["best"])
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object of dense CRF parameters")
    return data


def eval_settings(config: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``[eval]`` settings (or the defaults) updated with CLI flags."""
    from . import config as cfg

    base = cfg.defaults()
    run = config.get("run")
    if isinstance(run, Mapping) and "eval" in run:
        base = cfg.merge(base, {"eval": run["eval"]}, "checkpoint config")
    return cfg.apply_flags(base, flags)["eval"]


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | None,
    flags: Mapping[str, Any],
    *,
    crf_params: Mapping[str, Any] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The CLI's ``evaluate``: metrics of a checkpoint on a VOC-layout split.

    Args:
        checkpoint: ``RUN`` or ``RUN/best``.
        data: VOC-layout folder (default: the one the run trained on).
        flags: ``{"eval.key": value}`` overrides of the checkpoint's ``[eval]`` settings.
        crf_params: dense-CRF parameters for ``eval.crf = "dense"``.
        device: device name, default CUDA when available.
        progress: progress bar on stderr.
    """
    dev = init_from_env(device) if launched_by_torchrun() else resolve_device(device)
    model, config = ckpt.load_checkpoint(checkpoint, device=dev)
    settings = eval_settings(config, flags)
    num_classes = int(config["model"]["num_classes"])
    run = dict(config.get("run") or {})
    data_cfg = {**dict(run.get("data") or {"sbd_root": None})}
    if data is not None:
        data_cfg["root"] = str(data)
    data_cfg.setdefault("root", None)
    data_cfg.setdefault("sbd_root", None)
    dataset = dataset_for({"data": data_cfg, "model": config["model"]}, settings["split"], None)
    postprocess = None
    params: dict[str, Any] = {}
    if settings["crf"] == "dense":
        params = crf_params_for(config, {**settings["crf_params"], **dict(crf_params or {})})
        postprocess = dense_postprocess(params)
    elif settings["crf"] != "none":
        raise ValueError(f"eval.crf must be 'none' or 'dense'; got {settings['crf']!r}")
    metrics = evaluate(
        model,
        dataset,
        num_classes=num_classes,
        use_crf=settings["use_crf"],
        postprocess=postprocess,
        scales=[float(s) for s in settings["scales"]],
        flip=settings["flip"],
        device=dev,
        trimap_bands=[int(b) for b in settings["trimap_bands"]],
        progress=progress,
        max_images=settings["max_images"],
        class_names=class_names(num_classes, data_cfg["root"]),
    )
    return {
        "checkpoint": str(checkpoint),
        "split": settings["split"],
        "step": config.get("step"),
        "crf": settings["crf"],
        "crf_params": params,
        "scales": settings["scales"],
        "flip": settings["flip"],
        **metrics,
    }


def list_images(path: str | os.PathLike[str]) -> list[Path]:
    """An image file, or the image files (by suffix) directly inside a folder, sorted."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"input not found: {p}")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {p}")
    return files


def predict_files(
    model: nn.Module,
    inputs: Sequence[Path],
    out_dir: str | os.PathLike[str],
    *,
    use_crf: bool = True,
    postprocess: Callable | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device,
    progress: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Segment each image and write ``OUT/<stem>.png`` (VOC palette PNG, written atomically).

    Before anything runs: ``OUT`` must be a folder (or not exist), no output may be one of the
    inputs, and outputs that exist already need ``overwrite``.

    Returns:
        ``[{"input", "output", "height", "width", "labels": sorted label ids present}]``.
    """
    from ..data.palette import read_image, write_label_png

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; predictions go into a folder")
    stems = [p.stem for p in inputs]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"several inputs would write the same output name: {dup}")
    check_outputs([out / f"{p.stem}.png" for p in inputs], inputs, overwrite=overwrite)
    model.to(device).eval()
    written = []
    for path in tqdm(inputs, desc="predict", unit="img", disable=not progress):
        rgb = read_image(path)
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
        logits = predict_logits(
            model, image.to(device), use_crf=use_crf, scales=scales, flip=flip,
            postprocess=postprocess,
        )  # fmt: skip
        if logits.shape[1] > 255:
            raise ValueError(
                f"the model has {logits.shape[1]} classes: a PNG label map holds 0-254 (255 = "
                "ignore)"
            )
        labels = logits.argmax(1)[0].to("cpu", torch.int64).numpy().astype(np.uint8)
        target = out / f"{path.stem}.png"
        if is_main_process():
            write_label_png(target, labels)
        written.append({
            "input": str(path),
            "output": str(target),
            "height": int(labels.shape[0]),
            "width": int(labels.shape[1]),
            "labels": sorted(int(v) for v in np.unique(labels)),
        })  # fmt: skip
    return written
