"""Training: the stages of the papers, SGD/Adam with the poly schedule, AMP, DDP and exact resume.

Stages (``stage=``):

* ``"unary"`` — the CNN alone (DeepLab's training; Schwing & Urtasun's stage 1): cross-entropy
  (ignore 255) on ``model(image, use_crf=False)``; a model's ``crf.*`` parameters are frozen.
* ``"joint"`` — CNN and CRF together (CRF-as-RNN; Schwing & Urtasun's stage 2): cross-entropy on
  ``model(image, use_crf=True)``, or the model's ``training_loss(image, labels)`` when it has one;
  ``crf.*`` parameters at ``crf_lr``; ``freeze_backbone=True`` (or any ``freeze`` prefixes)
  keeps those parameters and their BatchNorm statistics fixed.
* ``"piecewise"`` — Lin et al.'s piecewise training: the loss is ``model.piecewise_loss(image,
  labels)``.

The learning rate follows DeepLab's "poly" policy, lr_t = lr · (1 − t/T)^power for step t of T,
or DeepLab v1's "step" policy, lr_t = lr · γ^⌊t/s⌋.

Exact resume: the sample seen at position p of the (endless) training stream is a pure function
of ``(seed, p)``: epoch e = p // n visits the dataset in the order ``randperm(n)`` drawn from a
generator seeded with ``(seed, e)``, and the random augmentation of that sample runs with the
torch / numpy / python RNGs seeded with ``(seed, p)`` (and restored afterwards, so it never
disturbs the training RNG). Step t of a run on W processes reads positions ``t·B·W + rank·B + j``.
Together with the weights, the optimiser and GradScaler state and the global RNG states (saved in
every checkpoint and restored on resume), a run that is killed and resumed ends with bit-identical
weights to one that was not (on CPU with a fixed seed; cuDNN kernels can be nondeterministic).
The stream replaces ``DistributedSampler`` so that a resume can start in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..metrics import IGNORE_INDEX
from . import checkpoint as ckpt
from .config import TrainSettings
from .distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    is_main_process,
    rank_and_world,
    reduce_mean,
)
from .evaluation import has_crf

# Parameter-name prefixes of the classifier head, which DeepLab trains at 10x the base rate
# (the small model's head/classifier, DeepLab's fc8).
HEAD_PREFIXES = ("head.", "classifier.", "fc8.")


def _seed_from(*parts: int) -> int:
    """A 32-bit seed mixed from integers (accepted by torch, numpy and python alike)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def _isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch/numpy/python RNGs for a block, then put the previous states back."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)


class _Stream(Dataset):
    """Position p of the training stream -> (seeded) sample; see the module docstring."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.n = len(dataset)
        self._epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:  # the stream is endless; the sampler bounds it
        return self.n

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(_seed_from(self.seed, 0, epoch))
            self._order = torch.randperm(self.n, generator=gen).tolist()
            self._epoch = epoch
        return self._order

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(int(position), self.n)
        index = self.order(epoch)[k]
        with _isolated_rng(_seed_from(self.seed, 1, position)):
            image, labels = self.dataset[index]
        return torch.as_tensor(image), torch.as_tensor(labels)


class _StreamSampler(Sampler[int]):
    """The stream positions one process reads for steps ``start..steps-1``."""

    def __init__(self, start: int, steps: int, batch: int, rank: int, world: int) -> None:
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.steps):
            base = (step * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean pixel-wise cross-entropy, ignoring label 255; 0 (with a graph) if all are ignored.

    Shape:
        logits: (B, L, H, W)  unary scores
        labels: (B, H, W)     int64 in [0, L) or 255
        return: ()
    """
    valid = labels != IGNORE_INDEX
    count = int(valid.sum())
    if count == 0:
        return logits.sum() * 0.0
    top = int(labels[valid].max())
    if top >= logits.shape[1]:
        raise ValueError(
            f"labels contain class {top} but the model predicts {logits.shape[1]} classes "
            f"(labels must be in [0, {logits.shape[1]}) or {IGNORE_INDEX})"
        )
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / (
        count
    )


class _StageLoss(nn.Module):
    """The loss of one stage as a module, so that DDP sees every forward it must synchronise."""

    def __init__(self, model: nn.Module, stage: str) -> None:
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.stage == "piecewise":
            return model.piecewise_loss(image, labels)
        if self.stage == "joint":
            if hasattr(model, "training_loss"):
                return model.training_loss(image, labels)
            return cross_entropy(model(image, use_crf=True), labels)
        if has_crf(model):
            return cross_entropy(model(image, use_crf=False), labels)
        if hasattr(model, "training_loss"):
            return model.training_loss(image, labels)
        return cross_entropy(model(image), labels)


def _param_groups(
    model: nn.Module, settings: TrainSettings
) -> tuple[list[dict[str, Any]], list[nn.Parameter]]:
    """Split trainable parameters into backbone / head / crf groups; return frozen ones too."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": [], "crf": []}
    frozen: list[nn.Parameter] = []
    fixed = settings.frozen_prefixes
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A CNN+CRF wrapper names its network ``model``: classify by the network's own names.
        inner = name[len("model.") :] if name.startswith("model.") else name
        if name.startswith(fixed) or inner.startswith(fixed):
            frozen.append(param)
        elif name.startswith("crf."):
            if settings.stage == "unary":
                frozen.append(param)
            else:
                groups["crf"].append(param)
        elif inner.startswith(HEAD_PREFIXES):
            groups["head"].append(param)
        else:
            groups["backbone"].append(param)
    lr, decay = settings.lr, settings.weight_decay
    rates = {
        "backbone": (lr, decay),
        "head": (lr if settings.head_lr is None else settings.head_lr, decay),
        # Weight decay would pull log-bandwidths towards 0 (θ = 1) and compatibilities to 0,
        # which no paper intends: the CRF gets its own (default 0) decay.
        "crf": (lr if settings.crf_lr is None else settings.crf_lr, settings.crf_weight_decay),
    }
    out = [
        {"params": params, "name": name, "base_lr": rates[name][0], "lr": rates[name][0],
         "weight_decay": rates[name][1]}
        for name, params in groups.items()
        if params
    ]  # fmt: skip
    if not out:
        raise ValueError(f"stage {settings.stage!r} leaves no trainable parameter in the model")
    return out, frozen


def fit(
    model: nn.Module,
    dataset: Any,
    settings: TrainSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    num_workers: int = 0,
    run_dir: str | os.PathLike[str] | None = None,
    config: Mapping[str, Any] | None = None,
    checkpoint_every: int = 0,
    checkpoint_seconds: float | None = 600.0,
    resume: bool = False,
    val_dataset: Any = None,
    val_every: int = 0,
    val_kwargs: Mapping[str, Any] | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` for ``settings.steps`` optimiser steps (in place).

    The loss depends on ``settings.stage`` (see the module docstring); the learning rate follows
    ``settings.lr_factor``. Under ``torchrun`` (``torch.distributed`` initialised) the model is
    wrapped in ``DistributedDataParallel``, each process reads its own share of the stream,
    losses are averaged over processes and only rank 0 writes checkpoints.

    Args:
        model: a segmentation model, ``forward(image (B, 3, H, W) in 0-255) -> (B, L, H, W)``.
        dataset: yields ``(image (3, H, W) float 0-255, labels (H, W) int64, 255 = ignore)``;
            all images of a batch must share one size (use a cropping transform).
        settings: how to train (:class:`~deepcrf.engine.config.TrainSettings`), passed whole.
        device: where to train.
        progress: show a tqdm progress bar (on stderr, rank 0 only).
        num_workers: DataLoader worker processes.
        run_dir: write checkpoints here (``RUN/model.safetensors``, ``config.json``, resume
            state; ``RUN/best`` when validating). Requires ``config``.
        config: JSON-able description stored in ``config.json`` beside ``"fit"`` (the settings)
            and ``"step"``; must contain ``model = {"name", "num_classes", "kwargs"}`` for
            :func:`load_checkpoint`.
        checkpoint_every: also checkpoint every this many steps (0 = only at the end).
        checkpoint_seconds: also checkpoint when this much wall time has passed since the last
            checkpoint (default 10 minutes; None = off). With ``run_dir``, SIGINT (Ctrl-C) and
            SIGTERM also checkpoint, at the end of the current step, before the run stops with
            :class:`TrainingInterrupted`; a second signal stops at once (files stay whole).
        resume: continue from the checkpoint in ``run_dir`` (must exist, same settings).
        val_dataset: evaluate on it every ``val_every`` steps and at the end; the best mIoU is
            kept in ``RUN/best``.
        val_every: validation interval in steps (0 = only at the end).
        val_kwargs: keyword arguments of :func:`deepcrf.engine.evaluate` (``num_classes`` needed).
        callback: called as ``callback(step, loss)`` after each step (``step`` counts from 1).

    Returns:
        ``{"losses": [loss per step, all steps so far], "seconds": wall time of this call,
        "start_step", "steps", "lr": last rate, "val": [{"step", "miou", ...}], "best_miou"}``.

    Shape:
        image:  (B, 3, H, W)  colour in 0-255
        labels: (B, H, W)     int64, 255 = ignore

    Example:
        >>> out = fit(model, dataset, TrainSettings(steps=100, batch_size=4))  # doctest: +SKIP
    """
    if not isinstance(settings, TrainSettings):
        raise TypeError(
            f"settings must be a TrainSettings (deepcrf.engine.TrainSettings(steps=..., ...)); "
            f"got {type(settings).__name__}"
        )
    _check_run(model, dataset, settings, run_dir, config, resume, val_dataset, val_kwargs)
    trainer = _Trainer(model, settings, torch.device(device))
    state = trainer.restore(run_dir) if resume else trainer.seed_fresh()
    checkpoints = _Checkpoints(run_dir, config, settings, checkpoint_every, checkpoint_seconds)
    loader = DataLoader(
        _Stream(dataset, settings.seed),
        batch_size=settings.batch_size,
        sampler=_StreamSampler(
            state.step, settings.steps, settings.batch_size, trainer.rank, trainer.world
        ),
        num_workers=num_workers,
        # A private generator: the loader must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(settings.seed),
        pin_memory=trainer.device.type == "cuda",
    )
    t0 = time.perf_counter()
    start = state.step
    stop = _SignalCheckpoint(enabled=run_dir is not None)
    bar = tqdm(
        total=settings.steps, initial=start, desc=f"train ({settings.stage})", unit="step",
        disable=not progress or not is_main_process(), dynamic_ncols=True,
    )  # fmt: skip
    try:
        trainer.begin()
        stop.install()
        batches = iter(loader)
        for step in range(start, settings.steps):
            value = trainer.step(*_next_batch(batches), step)
            state.losses.append(value)
            state.step = done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{trainer.current_lr:.2e}")
            is_last = done == settings.steps
            validate = val_dataset is not None and (
                is_last or bool(val_every and done % val_every == 0)
            )
            save = checkpoints.due(done, stop.signal is not None, trainer.world)
            if validate or save or is_last:
                broadcast_buffers(model)  # every rank validates / rank 0 saves one model
            if validate:
                trainer.validate(val_dataset, val_kwargs, state, checkpoints)
            if save:
                checkpoints.save(trainer, state)
            if stop.signal is not None and not is_last:
                raise TrainingInterrupted(stop.signal, done, settings.steps, run_dir)
            if callback is not None:
                callback(done, value)
    finally:
        stop.uninstall()
        bar.close()
        trainer.end()
    return {
        "losses": state.losses,
        "seconds": time.perf_counter() - t0,
        "start_step": start,
        "steps": settings.steps,
        "lr": trainer.current_lr,
        "val": state.history,
        "best_miou": None if state.best == -math.inf else state.best,
    }


def _check_run(
    model: nn.Module,
    dataset: Any,
    settings: TrainSettings,
    run_dir: Any,
    config: Mapping[str, Any] | None,
    resume: bool,
    val_dataset: Any,
    val_kwargs: Mapping[str, Any] | None,
) -> None:
    """What only fit can check (the settings checked themselves): model, data, run files."""
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if settings.stage == "joint" and not has_crf(model):
        raise ValueError("stage 'joint' needs a model with a CRF (attribute `crf`)")
    if settings.stage == "piecewise" and not hasattr(model, "piecewise_loss"):
        raise ValueError("stage 'piecewise' needs a model with piecewise_loss(image, labels)")
    if run_dir is not None and config is None:
        raise ValueError("run_dir needs config (with the model's name/num_classes/kwargs)")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir")
    if config is not None:
        # Fail now rather than at the first checkpoint, after minutes of training.
        ckpt.check_config(config)
    if val_dataset is not None and "num_classes" not in (val_kwargs or {}):
        raise ValueError("val_dataset needs val_kwargs={'num_classes': L, ...} for evaluate()")


@dataclasses.dataclass
class _State:
    """What a checkpoint restores besides weights and optimiser: progress and validation."""

    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: float = -math.inf


class _Trainer:
    """Set-up and one optimiser step: parameter groups, optimiser, AMP scaler, DDP wrapper."""

    def __init__(self, model: nn.Module, settings: TrainSettings, device: torch.device) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.rank, self.world = rank_and_world()
        model.to(device)
        groups, self.frozen = _param_groups(model, settings)
        if settings.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=settings.lr, momentum=settings.momentum
            )
        else:
            self.opt = torch.optim.Adam(groups, lr=settings.lr)
        self.use_scaler = settings.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.current_lr = settings.lr
        self.loss_module: nn.Module = _StageLoss(model, settings.stage)
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._fixed_norms: list[nn.Module] = []

    def fit_record(self) -> dict[str, Any]:
        """The settings as stored in a checkpoint (with the number of processes)."""
        return {**self.settings.as_dict(), "world_size": self.world}

    def seed_fresh(self) -> _State:
        seed = self.settings.seed
        torch.manual_seed(_seed_from(seed, 2, self.rank))
        np.random.seed(_seed_from(seed, 3, self.rank))  # noqa: NPY002
        random.seed(_seed_from(seed, 4, self.rank))
        return _State()

    def begin(self) -> None:
        # Frozen parameters must not need grads: DDP would wait for them and autograd would
        # waste work. They get their flags back in end().
        self._saved_flags = [(p, p.requires_grad) for p in self.frozen]
        for p in self.frozen:
            p.requires_grad_(False)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.device
            self.loss_module = DistributedDataParallel(
                self.loss_module,
                device_ids=[dev.index if dev.index is not None else torch.cuda.current_device()]
                if dev.type == "cuda"
                else None,
                find_unused_parameters=True,
            )  # fmt: skip
        # A fixed layer keeps its statistics too: BatchNorm layers whose parameters are all
        # frozen stay in eval mode (their running mean/variance are part of what is fixed).
        self._fixed_norms = [
            module
            for module in self.model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (params := list(module.parameters(recurse=False)))
            and not any(p.requires_grad for p in params)
        ]
        self.train_mode()

    def train_mode(self) -> None:
        """The model in training mode, its fixed BatchNorm layers in eval mode."""
        self.model.train()
        for module in self._fixed_norms:
            module.eval()

    def end(self) -> None:
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self.model.eval()

    def step(self, image: torch.Tensor, labels: torch.Tensor, step: int) -> float:
        """One optimiser step at ``step`` (0-based); returns the loss averaged over processes."""
        s, opt, scaler = self.settings, self.opt, self.scaler
        image = image.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        factor = s.lr_factor(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.current_lr = s.lr * factor
        opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=s.amp):
            loss = self.loss_module(image, labels)
        if loss.dim() != 0:
            raise ValueError(f"the {s.stage} loss must be a scalar; got shape {loss.shape}")
        if not self.use_scaler and not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"the training loss became {loss.detach().item()} at step {step + 1}; "
                "try a smaller learning rate"
            )
        scaler.scale(loss).backward()
        if s.grad_clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(
                [p for g in opt.param_groups for p in g["params"]], s.grad_clip
            )
        scaler.step(opt)
        scaler.update()
        return reduce_mean(loss.detach().float())

    def validate(
        self,
        val_dataset: Any,
        val_kwargs: Mapping[str, Any] | None,
        state: _State,
        checkpoints: _Checkpoints,
    ) -> None:
        """Evaluate, record the result in ``state`` and keep ``RUN/best`` on a new best mIoU."""
        from .evaluation import evaluate

        kwargs = {"progress": False, "device": self.device, **dict(val_kwargs or {})}
        metrics = evaluate(self.model, val_dataset, **kwargs)
        entry = {
            "step": state.step, "miou": metrics["miou"],
            "pixel_accuracy": metrics["pixel_accuracy"],
        }  # fmt: skip
        state.history.append(entry)
        if metrics["miou"] > state.best:
            state.best = float(metrics["miou"])
            checkpoints.save_best(self, state.step, entry)
        self.train_mode()

    def restore(self, run_dir: str | os.PathLike[str] | None) -> _State:
        """Weights, optimiser, scaler, RNG states and progress from ``run_dir``'s checkpoint."""
        assert run_dir is not None
        weights, tensors, meta = ckpt.load_training_state(run_dir)
        saved = ckpt.read_config(run_dir).get("fit", {})
        now = self.fit_record()
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {run_dir} with different settings ({listed})")
        ckpt.assign_weights(self.model, weights, f"{run_dir}/{ckpt.STATE_FILE}")
        ckpt.restore_optimizer(self.opt, tensors, meta["optimizer"])
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        prefix = f"rng.rank{self.rank}"
        ckpt.restore_rng(
            {k.replace(prefix, "rng", 1): v for k, v in tensors.items()
             if k.startswith(prefix + ".")},
            meta["rng"][str(self.rank)],
            prefix="rng",
        )  # fmt: skip
        best = meta.get("best_miou")
        return _State(
            step=int(meta["step"]),
            losses=[float(x) for x in meta.get("losses", [])],
            history=list(meta.get("val", [])),
            best=-math.inf if best is None else float(best),
        )


class _Checkpoints:
    """When to checkpoint (end, every N steps, every M seconds, on a signal) and the writing."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        config: Mapping[str, Any] | None,
        settings: TrainSettings,
        every: int,
        seconds: float | None,
    ) -> None:
        self.run_dir, self.config, self.settings = run_dir, config, settings
        self.every, self.seconds = int(every), seconds
        self.last = time.monotonic()

    def due(self, done: int, signalled: bool, world: int) -> bool:
        """Whether to save after step ``done``; the same answer on every rank."""
        if self.run_dir is None:
            return False
        if done == self.settings.steps or bool(self.every and done % self.every == 0):
            return True
        late = self.seconds is not None and time.monotonic() - self.last >= self.seconds
        return _agreed(signalled or late, world)

    def _config(self, trainer: _Trainer, done: int, **extra: Any) -> dict[str, Any]:
        return {**dict(self.config or {}), "step": done, "fit": trainer.fit_record(), **extra}

    def save_best(self, trainer: _Trainer, done: int, entry: Mapping[str, Any]) -> None:
        """Rank 0 writes ``RUN/best`` (weights and config only)."""
        if self.run_dir is not None and is_main_process():
            config = self._config(trainer, done, metrics=dict(entry))
            ckpt.save_checkpoint(Path(self.run_dir) / "best", trainer.model, config)
        barrier()

    def save(self, trainer: _Trainer, state: _State) -> None:
        """Rank 0 writes the resumable checkpoint; every rank contributes its RNG states."""
        assert self.run_dir is not None
        rng_tensors, rng_meta = ckpt.rng_state(prefix="rng")
        gathered = all_gather_object((rng_tensors, rng_meta))
        if is_main_process():
            tensors, opt_meta = ckpt.optimizer_state(trainer.opt)
            rng_json = {}
            for r, (t, m) in enumerate(gathered):
                tensors.update({k.replace("rng.", f"rng.rank{r}.", 1): v for k, v in t.items()})
                rng_json[str(r)] = m
            meta = {
                "step": state.step,
                "losses": state.losses,
                "val": state.history,
                "best_miou": None if state.best == -math.inf else state.best,
                "optimizer": opt_meta,
                "scaler": trainer.scaler.state_dict(),
                "rng": rng_json,
            }
            ckpt.save_checkpoint(
                self.run_dir, trainer.model, self._config(trainer, state.step),
                state_tensors=tensors, state_meta=meta,
            )  # fmt: skip
        barrier()
        self.last = time.monotonic()


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint it can resume from."""

    def __init__(self, signum: int, step: int, steps: int, run_dir: Any) -> None:
        import signal as _signal

        name = _signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} after step {step} of {steps}; checkpoint saved in "
            f"{run_dir}: continue with `deepcrf train --out {run_dir} --resume`"
        )
        self.step = step


class _SignalCheckpoint:
    """SIGINT/SIGTERM set a flag: checkpoint at the end of the step, then stop.

    A second signal gets the previous handler (Ctrl-C twice stops at once). Main thread only;
    the handlers are restored after the run.
    """

    def __init__(self, enabled: bool) -> None:
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        import signal

        if not self.enabled:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.signal is not None:  # the second signal: do what the first would have done
            previous = self._previous.get(signum)
            self.uninstall()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signum)
            return
        self.signal = signum

    def uninstall(self) -> None:
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _agreed(flag: bool, world: int) -> bool:
    """``flag`` on any rank (time and signals differ per process; every rank must save)."""
    if world <= 1:
        return flag
    # One int64 all-reduce per step (not a pickled object gather).
    return int(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int64))) > 0


def _next_batch(batches: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        image, labels = next(batches)
    except RuntimeError as err:
        if "stack expects each tensor to be equal size" in str(err):
            raise ValueError(
                "training images of one batch differ in size; crop them to one size "
                "(e.g. deepcrf.data.transforms.train_transform(crop_size))"
            ) from err
        raise
    if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(
            f"dataset images must be float (3, H, W) in 0-255; got a batch of shape "
            f"{tuple(image.shape)} and dtype {image.dtype}"
        )
    if labels.shape != (image.shape[0], *image.shape[2:]) or labels.dtype != torch.int64:
        raise ValueError(
            f"dataset labels must be int64 (H, W) matching the image; got {tuple(labels.shape)} "
            f"{labels.dtype} for images {tuple(image.shape)}"
        )
    return image, labels
