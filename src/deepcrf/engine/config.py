"""Run configurations: TOML files in ``configs/``, checked against one schema, overridable.

A config has four tables (every key optional; a missing key takes the default below)::

    description = "free text"
    [model]   name, num_classes, crf, pretrained, [model.kwargs], [model.crf_kwargs]
    [data]    root, train_split, val_split, crop_size, scale_min, scale_max, flip, num_workers,
              sbd_root
    [train]   stage, steps, batch_size, lr, crf_lr, head_lr, optimizer, momentum, weight_decay,
              crf_weight_decay, lr_policy, poly_power, lr_step, lr_gamma, seed, amp,
              freeze_backbone, freeze, grad_clip, checkpoint_every, val_every, val_max_images, init,
              device
    [eval]    split, use_crf, crf, scales, flip, trimap_bands, max_images, [eval.crf_params]

Unknown tables or keys and values of the wrong type raise ``ValueError`` naming the key and
listing the valid ones, so a typo never silently falls back to a default. ``--set
table.key=value`` (TOML syntax for the value) and the dedicated CLI flags override a file.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepcrf._checks import check_choice, check_int, check_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_FREE = "table"  # a free-form table passed on as keyword arguments
_NONE = type(None)

STAGES = ("unary", "joint", "piecewise")
OPTIMIZERS = ("sgd", "adam")
LR_POLICIES = ("poly", "step")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run's trajectory, checked once, here.

    :func:`deepcrf.engine.fit` takes it whole, stores it in the checkpoint and refuses to resume
    with other settings.

    The learning rate at step t of T is ``lr · (1 − t/T)^poly_power`` (DeepLab's "poly"
    policy; CRF-as-RNN's constant rate is ``poly_power = 0``) or ``lr · lr_gamma^⌊t/lr_step⌋``
    (``lr_policy = "step"``, DeepLab v1: ×0.1 every 2000 steps).

    Attributes:
        stage: ``"unary"`` (the CNN alone), ``"joint"`` (CNN + CRF end to end) or
            ``"piecewise"`` (Lin et al.); see :mod:`deepcrf.engine.train`.
        steps: optimiser steps T, also the poly schedule's horizon.
        batch_size: images per step and process (the global batch is ``batch_size · world``).
        lr: base learning rate (backbone).
        crf_lr: rate of ``crf.*`` parameters (None: ``lr``).
        head_lr: rate of the classifier head (``head.*``, ``classifier.*``, ``fc8.*``; DeepLab
            uses 10 · lr); None: ``lr``.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum.
        weight_decay: L2 penalty of backbone and head.
        crf_weight_decay: L2 penalty of the CRF's parameters (decay would pull log-bandwidths
            to θ = 1 and compatibilities to 0, so it has its own, default 0).
        lr_policy: ``"poly"`` or ``"step"``.
        poly_power: exponent of the poly policy.
        lr_step: period of the step policy, in steps.
        lr_gamma: factor of the step policy.
        seed: seeds the RNGs, the data order and the augmentation.
        amp: mixed precision (float16 + GradScaler on CUDA, bfloat16 autocast on CPU).
        freeze_backbone: keep ``backbone.*`` fixed (joint / piecewise stages); the same as
            ``"backbone."`` in ``freeze``.
        freeze: parameter-name prefixes kept fixed, e.g. ``("backbone.", "crf.unary_net.")``
            (a CNN+CRF wrapper's ``model.`` is looked through).  Fixed means the weights and
            the running statistics of their BatchNorm layers.
        grad_clip: clip the global gradient norm to this (None: no clipping).

    Example:
        >>> TrainSettings(steps=100, lr=0.01).lr_factor(50) == 0.5**0.9
        True
    """

    stage: str = "unary"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 0.003
    crf_lr: float | None = None
    head_lr: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    crf_weight_decay: float = 0.0
    lr_policy: str = "poly"
    poly_power: float = 0.9
    lr_step: int = 2000
    lr_gamma: float = 0.1
    seed: int = 0
    amp: bool = False
    freeze_backbone: bool = False
    freeze: tuple[str, ...] = ()
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the values once, here
        check_choice(self.stage, "stage", STAGES)
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_choice(self.lr_policy, "lr_policy", LR_POLICIES)
        for name, minimum in (("steps", 1), ("batch_size", 1), ("lr_step", 1), ("seed", 0)):
            set_(self, name, check_int(getattr(self, name), name, minimum=minimum))
        set_(self, "lr", check_number(self.lr, "lr", positive=True))
        for name in ("crf_lr", "head_lr", "grad_clip"):
            if getattr(self, name) is not None:
                set_(self, name, check_number(getattr(self, name), name, positive=True))
        for name in ("momentum", "weight_decay", "crf_weight_decay", "poly_power", "lr_gamma"):
            set_(self, name, check_number(getattr(self, name), name, minimum=0.0))
        for name in ("amp", "freeze_backbone"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if isinstance(self.freeze, str) or not all(isinstance(p, str) and p for p in self.freeze):
            raise TypeError(
                f"freeze must be a list of parameter-name prefixes; got {self.freeze!r}"
            )
        set_(self, "freeze", tuple(self.freeze))

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """Every parameter-name prefix kept fixed (``freeze``, and ``"backbone."``)."""
        return (*self.freeze, *(("backbone.",) if self.freeze_backbone else ()))

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> TrainSettings:
        """The settings in a config's ``[train]`` table (its other keys belong to the run)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in train.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every setting (what a checkpoint stores)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def lr_factor(self, step: int) -> float:
        """The multiplier of every base rate at ``step`` (0-based) of ``steps``."""
        if self.lr_policy == "poly":
            return (1.0 - step / self.steps) ** self.poly_power
        return self.lr_gamma ** (step // self.lr_step)


_TRAIN_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "steps": (int,), "batch_size": (int,), "lr": (float,),
    "crf_lr": (float, _NONE), "head_lr": (float, _NONE), "optimizer": (str,),
    "momentum": (float,), "weight_decay": (float,), "crf_weight_decay": (float,),
    "lr_policy": (str,), "poly_power": (float,), "lr_step": (int,), "lr_gamma": (float,),
    "seed": (int,), "amp": (bool,), "freeze_backbone": (bool,), "freeze": (list,),
    "grad_clip": (float, _NONE),
}  # fmt: skip


# table -> key -> (accepted types, default). float keys accept ints too.
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...] | str, Any]]] = {
    "model": {
        "name": ((str,), "small"),
        "num_classes": ((int,), 21),
        "crf": ((str, _NONE), None),
        "pretrained": ((str, _NONE), None),
        "kwargs": (_FREE, {}),
        "crf_kwargs": (_FREE, {}),
    },
    "data": {
        "root": ((str, _NONE), None),
        "train_split": ((str,), "train"),
        "val_split": ((str, _NONE), None),
        "crop_size": ((int, list), 128),
        "scale_min": ((float,), 0.5),
        "scale_max": ((float,), 1.5),
        "flip": ((bool,), True),
        "num_workers": ((int,), 0),
        "sbd_root": ((str, _NONE), None),
    },
    # The settings of fit (TrainSettings: one place for their defaults), then the run's own.
    "train": {
        **{f.name: (_TRAIN_TYPES[f.name], f.default) for f in dataclasses.fields(TrainSettings)},
        "checkpoint_every": ((int,), 0),
        "checkpoint_minutes": ((float, _NONE), 10.0),
        "val_every": ((int,), 0),
        "val_max_images": ((int, _NONE), None),
        "init": ((str, _NONE), None),
        "device": ((str, _NONE), None),
    },
    "eval": {
        "split": ((str,), "val"),
        "use_crf": ((bool,), True),
        "crf": ((str,), "none"),
        "scales": ((list,), [1.0]),
        "flip": ((bool,), False),
        "trimap_bands": ((list,), [1, 2, 4, 8, 16, 32]),
        "max_images": ((int, _NONE), None),
        "crf_params": (_FREE, {}),
    },
}
TOP_LEVEL = {"description": (str,)}

#: DeepLab v1's first (coarse) grid for ``tune-crf``; w_spatial and θγ fixed at 3.
DEEPLAB_GRID: dict[str, list[float]] = {
    "w_bilateral": [5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
    "theta_alpha": [50.0, 60.0, 70.0, 80.0, 90.0, 100.0],
    "theta_beta": [3.0, 4.0, 5.0, 6.0],
    "w_spatial": [3.0],
    "theta_gamma": [3.0],
}
TUNABLE = ("w_bilateral", "theta_alpha", "theta_beta", "w_spatial", "theta_gamma")


def defaults() -> dict[str, Any]:
    """The full default config (a fresh deep copy)."""
    return {t: {k: copy.deepcopy(v[1]) for k, v in keys.items()} for t, keys in SCHEMA.items()}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array"}
    return " or ".join("absent/None" if t is _NONE else names.get(t, t.__name__) for t in types)


def _check_key(table: str, key: str, value: Any, where: str) -> Any:
    if table not in SCHEMA:
        raise ValueError(
            f"{where}: unknown config table [{table}]; valid tables: {', '.join(SCHEMA)}"
        )
    if key not in SCHEMA[table]:
        raise ValueError(
            f"{where}: unknown config key {table}.{key}; valid keys of [{table}]: "
            f"{', '.join(SCHEMA[table])}"
        )
    types, _ = SCHEMA[table][key]
    if types == _FREE:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: {table}.{key} must be a table; got {value!r}")
        return dict(value)
    assert isinstance(types, tuple)
    if not _type_ok(value, types):
        raise ValueError(
            f"{where}: {table}.{key} must be {_type_names(types)}; got {value!r} "
            f"({type(value).__name__})"
        )
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def merge(base: Mapping[str, Any], update: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check ``update`` against the schema and return ``base`` updated with it."""
    out = copy.deepcopy(dict(base))
    for table, body in update.items():
        if table in TOP_LEVEL:
            if not isinstance(body, TOP_LEVEL[table]):
                raise ValueError(f"{where}: {table} must be a string; got {body!r}")
            out[table] = body
            continue
        if not isinstance(body, Mapping):
            if table in SCHEMA:
                raise ValueError(f"{where}: [{table}] must be a table; got {body!r}")
            raise ValueError(
                f"{where}: unknown config key {table!r}; valid tables: {', '.join(SCHEMA)}"
            )
        for key, value in body.items():
            out.setdefault(table, {})[key] = _check_key(table, key, value, where)
    return out


def load(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The defaults updated with the TOML file ``path`` (just the defaults for ``None``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid TOML, unknown table/key, or a value of the wrong type.
    """
    config = defaults()
    if path is None:
        return config
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{p} is not valid TOML: {err}") from err
    return merge(config, data, str(p))


def apply_set(config: Mapping[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``--set table.key=value`` override.

    The value is parsed as TOML (``0.001``, ``true``, ``[0.5, 1.0]``); a bare word is a string.
    ``table.kwargs_table.name=value`` sets one entry of a free-form table (``model.kwargs``,
    ``model.crf_kwargs``, ``eval.crf_params``).

    Example:
        >>> apply_set(defaults(), "train.lr=0.001")["train"]["lr"]
        0.001
    """
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ValueError(f"--set expects table.key=value (e.g. train.lr=0.001); got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    table, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as sgd or dense is a string
    if "." in key:  # one entry of a free-form table: model.kwargs.width=16
        key, entry = key.split(".", 1)
        if SCHEMA.get(table, {}).get(key, (None,))[0] != _FREE:
            raise ValueError(
                f"--set {assignment}: {table}.{key} is not a table of keyword arguments"
            )
        value = {**config.get(table, {}).get(key, {}), entry: value}
    return merge(config, {table: {key: value}}, f"--set {assignment}")


def apply_flags(config: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``{"table.key": value}`` overrides from CLI flags; ``None`` values are skipped."""
    update: dict[str, dict[str, Any]] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        table, key = dotted.split(".", 1)
        update.setdefault(table, {})[key] = value
    return merge(config, update, "command line")
