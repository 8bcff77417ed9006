"""Training: the stages of the papers, SGD/Adam with the poly schedule, AMP, DDP and exact resume.

Stages (``stage=``):

* ``"unary"`` — the CNN alone (DeepLab's training; Schwing & Urtasun's stage 1): cross-entropy
  (ignore 255) on ``model(image, use_crf=False)``; a model's ``crf.*`` parameters are frozen.
* ``"joint"`` — CNN and CRF together (CRF-as-RNN; Schwing & Urtasun's stage 2): cross-entropy on
  ``model(image, use_crf=True)``, or the model's ``training_loss(image, labels)`` when it has one;
  ``crf.*`` parameters at ``crf_lr``; ``freeze_backbone=True`` trains only head and CRF.
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
import json
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

from . import checkpoint as ckpt
from .distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    is_main_process,
    rank_and_world,
    reduce_mean,
)

IGNORE_INDEX = 255
STAGES = ("unary", "joint", "piecewise")
OPTIMIZERS = ("sgd", "adam")
LR_POLICIES = ("poly", "step")
# Parameter-name prefixes of the classifier head, which DeepLab trains at 10x the base rate
# (the small model's head/classifier, DeepLab's fc8).
HEAD_PREFIXES = ("head.", "classifier.", "fc8.")
BACKBONE_PREFIXES = ("backbone.",)
# Hyper-parameters that define the training trajectory: a resume must use the same values.
_TRAJECTORY_KEYS = (
    "stage", "steps", "batch_size", "lr", "crf_lr", "head_lr", "optimizer", "momentum",
    "weight_decay", "crf_weight_decay", "lr_policy", "poly_power", "lr_step", "lr_gamma", "seed",
    "amp", "freeze_backbone",
    "grad_clip", "world_size",
)  # fmt: skip


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


def _has_crf(model: nn.Module) -> bool:
    return isinstance(getattr(model, "crf", None), nn.Module)


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
        if _has_crf(model):
            return cross_entropy(model(image, use_crf=False), labels)
        if hasattr(model, "training_loss"):
            return model.training_loss(image, labels)
        return cross_entropy(model(image), labels)


def _param_groups(
    model: nn.Module,
    *,
    stage: str,
    lr: float,
    crf_lr: float | None,
    head_lr: float | None,
    weight_decay: float,
    crf_weight_decay: float,
    freeze_backbone: bool,
) -> tuple[list[dict[str, Any]], list[nn.Parameter]]:
    """Split trainable parameters into backbone / head / crf groups; return frozen ones too."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": [], "crf": []}
    frozen: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A CNN+CRF wrapper names its network ``model``: classify by the network's own names.
        inner = name[len("model.") :] if name.startswith("model.") else name
        if name.startswith("crf."):
            if stage == "unary":
                frozen.append(param)
            else:
                groups["crf"].append(param)
        elif inner.startswith(HEAD_PREFIXES):
            groups["head"].append(param)
        elif freeze_backbone and inner.startswith(BACKBONE_PREFIXES):
            frozen.append(param)
        else:
            groups["backbone"].append(param)
    rates = {
        "backbone": (lr, weight_decay),
        "head": (lr if head_lr is None else head_lr, weight_decay),
        # Weight decay would pull log-bandwidths towards 0 (θ = 1) and compatibilities to 0,
        # which no paper intends: the CRF gets its own (default 0) decay.
        "crf": (lr if crf_lr is None else crf_lr, crf_weight_decay),
    }
    out = [
        {"params": params, "name": name, "base_lr": rates[name][0], "lr": rates[name][0],
         "weight_decay": rates[name][1]}
        for name, params in groups.items()
        if params
    ]  # fmt: skip
    if not out:
        raise ValueError(f"stage {stage!r} leaves no trainable parameter in the model")
    return out, frozen


def poly_lr(base_lr: float, step: int, steps: int, power: float) -> float:
    """DeepLab's poly learning rate: base_lr · (1 − step/steps)^power."""
    return base_lr * (1.0 - step / steps) ** power


def lr_factor(
    step: int, steps: int, policy: str, power: float, step_size: int, gamma: float
) -> float:
    """Multiplier of the base rates at ``step`` (0-based) of ``steps``: poly or step policy."""
    if policy == "poly":
        return (1.0 - step / steps) ** power
    return gamma ** (step // step_size)


def fit(
    model: nn.Module,
    dataset: Any,
    *,
    stage: str = "unary",
    steps: int,
    batch_size: int = 8,
    lr: float = 0.01,
    crf_lr: float | None = None,
    head_lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    crf_weight_decay: float = 0.0,
    poly_power: float = 0.9,
    lr_policy: str = "poly",
    lr_step: int = 2000,
    lr_gamma: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    freeze_backbone: bool = False,
    grad_clip: float | None = None,
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
    """Train ``model`` on ``dataset`` for ``steps`` optimiser steps (in place).

    The loss depends on ``stage`` (see the module docstring); the learning rate follows the poly
    schedule lr_t = lr · (1 − t/T)^power. Under ``torchrun`` (``torch.distributed`` initialised)
    the model is wrapped in ``DistributedDataParallel``, each process reads its own share of the
    stream, losses are averaged over processes and only rank 0 writes checkpoints.

    Args:
        model: a segmentation model, ``forward(image (B, 3, H, W) in 0-255) -> (B, L, H, W)``.
        dataset: yields ``(image (3, H, W) float 0-255, labels (H, W) int64, 255 = ignore)``;
            all images of a batch must share one size (use a cropping transform).
        stage: ``"unary"``, ``"joint"`` or ``"piecewise"``.
        steps: total number of optimiser steps T (also the poly schedule's horizon).
        batch_size: images per step per process (the global batch is ``batch_size · world``).
        lr: base learning rate of the backbone.
        crf_lr: learning rate of ``crf.*`` parameters (default ``lr``).
        head_lr: learning rate of the classifier head (parameters named ``head.*`` /
            ``classifier.*``; DeepLab uses 10 · lr); default ``lr``.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty of backbone and head.
        crf_weight_decay: L2 penalty of the CRF parameters.
        poly_power: exponent of the poly schedule (0 = constant rate).
        lr_policy: ``"poly"`` (DeepLab v2 onwards, CRF-as-RNN uses a constant rate = poly with
            power 0) or ``"step"``: lr · gamma^⌊t / lr_step⌋ (DeepLab v1: ×0.1 every 2000).
        lr_step: step size of the ``"step"`` policy, in steps.
        lr_gamma: factor of the ``"step"`` policy.
        seed: seeds the RNGs, the data order and the augmentation.
        device: where to train.
        amp: mixed precision (float16 + GradScaler on CUDA, bfloat16 autocast on CPU).
        progress: show a tqdm progress bar (on stderr, rank 0 only).
        freeze_backbone: keep ``backbone.*`` parameters fixed (joint / piecewise stages).
        grad_clip: clip the global gradient norm to this value.
        num_workers: DataLoader worker processes.
        run_dir: write checkpoints here (``RUN/model.safetensors``, ``config.json``, resume
            state; ``RUN/best`` when validating). Requires ``config``.
        config: JSON-able run config stored in ``config.json``; must contain
            ``model = {"name", "num_classes", "kwargs"}`` for :func:`load_checkpoint`.
        checkpoint_every: also checkpoint every this many steps (0 = only at the end).
        checkpoint_seconds: also checkpoint when this much wall time has passed since the last
            checkpoint (default 10 minutes; None = off). With ``run_dir``, SIGINT (Ctrl-C) and
            SIGTERM also checkpoint, at the end of the current step, before the run stops with
            :class:`TrainingInterrupted`; a second signal stops at once (files stay whole).
        resume: continue from the checkpoint in ``run_dir`` (must exist, same hyper-parameters).
        val_dataset: evaluate on it every ``val_every`` steps and at the end; the best mIoU is
            kept in ``RUN/best``.
        val_every: validation interval in steps (0 = only at the end).
        val_kwargs: extra keyword arguments for :func:`deepcrf.engine.evaluate`.
        callback: called as ``callback(step, loss)`` after each step (``step`` counts from 1).

    Returns:
        ``{"losses": [loss per step, all steps so far], "seconds": wall time of this call,
        "start_step", "steps", "lr": last rate, "val": [{"step", "miou", ...}], "best_miou"}``.

    Shape:
        image:  (B, 3, H, W)  colour in 0-255
        labels: (B, H, W)     int64, 255 = ignore

    Example:
        >>> out = fit(model, dataset, steps=100, batch_size=4)  # doctest: +SKIP
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if lr_policy not in LR_POLICIES:
        raise ValueError(f"lr_policy must be one of {LR_POLICIES}; got {lr_policy!r}")
    if lr_policy == "step" and int(lr_step) < 1:
        raise ValueError(f"lr_step must be >= 1; got {lr_step}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if stage == "joint" and not _has_crf(model):
        raise ValueError("stage 'joint' needs a model with a CRF (attribute `crf`)")
    if stage == "piecewise" and not hasattr(model, "piecewise_loss"):
        raise ValueError("stage 'piecewise' needs a model with piecewise_loss(image, labels)")
    if run_dir is not None and config is None:
        raise ValueError("run_dir needs config (with the model's name/num_classes/kwargs)")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir")
    if config is not None:
        # Fail now rather than at the first checkpoint, after minutes of training.
        ckpt._check_model_config(config)
        try:
            json.dumps(config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config must be JSON-serialisable: {err}") from err
    if val_dataset is not None and "num_classes" not in (val_kwargs or {}):
        raise ValueError("val_dataset needs val_kwargs={'num_classes': L, ...} for evaluate()")
    steps, batch_size = int(steps), int(batch_size)
    dev = torch.device(device)
    rank, world = rank_and_world()
    hyper = {
        "stage": stage, "steps": steps, "batch_size": batch_size, "lr": lr, "crf_lr": crf_lr,
        "head_lr": head_lr, "optimizer": optimizer, "momentum": momentum,
        "weight_decay": weight_decay, "crf_weight_decay": crf_weight_decay,
        "lr_policy": lr_policy, "poly_power": poly_power, "lr_step": lr_step,
        "lr_gamma": lr_gamma, "seed": seed, "amp": amp, "freeze_backbone": freeze_backbone,
        "grad_clip": grad_clip, "world_size": world,
    }  # fmt: skip

    model.to(dev)
    groups, frozen = _param_groups(
        model, stage=stage, lr=lr, crf_lr=crf_lr, head_lr=head_lr, weight_decay=weight_decay,
        crf_weight_decay=crf_weight_decay, freeze_backbone=freeze_backbone,
    )  # fmt: skip
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    use_scaler = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16

    start, losses, history, best = 0, [], [], -math.inf
    if resume:
        start, losses, history, best = _restore(run_dir, model, opt, scaler, hyper, rank)
    else:
        torch.manual_seed(_seed_from(seed, 2, rank))
        np.random.seed(_seed_from(seed, 3, rank))  # noqa: NPY002
        random.seed(_seed_from(seed, 4, rank))

    # Frozen parameters must not need grads: DDP would wait for them and autograd would waste work.
    saved_flags = [(p, p.requires_grad) for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    loss_module: nn.Module = _StageLoss(model, stage)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(
            loss_module,
            device_ids=[dev.index if dev.index is not None else torch.cuda.current_device()]
            if dev.type == "cuda"
            else None,
            find_unused_parameters=True,
        )  # fmt: skip

    loader = DataLoader(
        _Stream(dataset, seed),
        batch_size=batch_size,
        sampler=_StreamSampler(start, steps, batch_size, rank, world),
        num_workers=num_workers,
        # A private generator: the loader must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
        pin_memory=dev.type == "cuda",
    )
    t0 = time.perf_counter()
    last_save = time.monotonic()
    current_lr = lr
    stop = _SignalCheckpoint(enabled=run_dir is not None)
    bar = tqdm(
        total=steps, initial=start, desc=f"train ({stage})", unit="step",
        disable=not progress or not is_main_process(), dynamic_ncols=True,
    )  # fmt: skip
    model.train()
    try:
        stop.install()
        batches = iter(loader)
        for step in range(start, steps):
            image, labels = _next_batch(batches)
            image = image.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True)
            factor = lr_factor(step, steps, lr_policy, poly_power, lr_step, lr_gamma)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            current_lr = lr * factor
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                loss = loss_module(image, labels)
            if loss.dim() != 0:
                raise ValueError(f"the {stage} loss must be a scalar; got shape {loss.shape}")
            if not use_scaler and not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"the training loss became {loss.detach().item()} at step {step + 1}; "
                    "try a smaller learning rate"
                )
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], grad_clip
                )
            scaler.step(opt)
            scaler.update()
            value = reduce_mean(loss.detach().float())
            losses.append(value)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{current_lr:.2e}")
            is_last = done == steps
            save_now = run_dir is not None and (
                is_last
                or bool(checkpoint_every and done % checkpoint_every == 0)
                or _agreed(
                    stop.signal is not None
                    or (checkpoint_seconds is not None
                        and time.monotonic() - last_save >= checkpoint_seconds),
                    world,
                )
            )  # fmt: skip
            if is_last or (val_every and done % val_every == 0) or save_now:
                broadcast_buffers(model)  # every rank validates / rank 0 saves one model
            if val_dataset is not None and (is_last or (val_every and done % val_every == 0)):
                best = _validate(
                    model,
                    val_dataset,
                    val_kwargs,
                    dev,
                    done,
                    history,
                    best,
                    run_dir,
                    config,
                    hyper,
                )
                model.train()
            if save_now:
                _save(run_dir, model, opt, scaler, config, hyper, done, losses, history, best)
                last_save = time.monotonic()
            if stop.signal is not None and not is_last:
                raise TrainingInterrupted(stop.signal, done, steps, run_dir)
            if callback is not None:
                callback(done, value)
    finally:
        stop.uninstall()
        bar.close()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.eval()
    return {
        "losses": losses,
        "seconds": time.perf_counter() - t0,
        "start_step": start,
        "steps": steps,
        "lr": current_lr,
        "val": history,
        "best_miou": None if best == -math.inf else best,
    }


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


def _validate(
    model: nn.Module,
    val_dataset: Any,
    val_kwargs: Mapping[str, Any] | None,
    dev: torch.device,
    done: int,
    history: list[dict[str, Any]],
    best: float,
    run_dir: str | os.PathLike[str] | None,
    config: Mapping[str, Any] | None,
    hyper: Mapping[str, Any],
) -> float:
    from .evaluation import evaluate

    kwargs = {"progress": False, "device": dev, **dict(val_kwargs or {})}
    if "num_classes" not in kwargs:
        raise ValueError("val_kwargs must give num_classes for validation")
    metrics = evaluate(model, val_dataset, **kwargs)
    entry = {"step": done, "miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"]}
    history.append(entry)
    if metrics["miou"] > best:
        best = float(metrics["miou"])
        if run_dir is not None and config is not None and is_main_process():
            best_config = {**dict(config), "step": done, "fit": dict(hyper), "metrics": entry}
            ckpt.save_checkpoint(Path(run_dir) / "best", model, best_config)
        barrier()
    return best


def _save(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: Mapping[str, Any] | None,
    hyper: Mapping[str, Any],
    done: int,
    losses: list[float],
    history: list[dict[str, Any]],
    best: float,
) -> None:
    """Rank 0 writes the checkpoint; every rank contributes its RNG states."""
    rng_tensors, rng_meta = ckpt.rng_state(prefix="rng")
    gathered = all_gather_object((rng_tensors, rng_meta))
    if is_main_process():
        tensors, opt_meta = ckpt.optimizer_state(opt)
        rng_json = {}
        for r, (t, m) in enumerate(gathered):
            tensors.update({k.replace("rng.", f"rng.rank{r}.", 1): v for k, v in t.items()})
            rng_json[str(r)] = m
        meta = {
            "step": done,
            "fit": dict(hyper),
            "losses": losses,
            "val": history,
            "best_miou": None if best == -math.inf else best,
            "optimizer": opt_meta,
            "scaler": scaler.state_dict(),
            "rng": rng_json,
        }
        full = {**dict(config or {}), "step": done, "fit": dict(hyper)}
        ckpt.save_checkpoint(run_dir, model, full, state_tensors=tensors, state_meta=meta)
    barrier()


def _restore(
    run_dir: str | os.PathLike[str] | None,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    hyper: Mapping[str, Any],
    rank: int,
) -> tuple[int, list[float], list[dict[str, Any]], float]:
    assert run_dir is not None
    weights, tensors, meta = ckpt.load_training_state(run_dir)
    saved = meta.get("fit", {})
    diff = {k: (saved.get(k), hyper[k]) for k in _TRAJECTORY_KEYS if saved.get(k) != hyper[k]}
    if diff:
        listed = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {run_dir} with different settings ({listed})")
    ckpt.assign_weights(model, weights, f"{run_dir}/{ckpt.STATE_FILE}")
    ckpt.restore_optimizer(opt, tensors, meta["optimizer"])
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    prefix = f"rng.rank{rank}"
    ckpt.restore_rng(
        {k.replace(prefix, "rng", 1): v for k, v in tensors.items() if k.startswith(prefix + ".")},
        meta["rng"][str(rank)],
        prefix="rng",
    )
    best = meta.get("best_miou")
    return (
        int(meta["step"]),
        [float(x) for x in meta.get("losses", [])],
        list(meta.get("val", [])),
        -math.inf if best is None else float(best),
    )
