"""Multi-process training helpers: process-group set-up under ``torchrun`` and collectives.

``torchrun --nproc-per-node N -m deepcrf train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` in the environment;
:func:`init_from_env` joins them into one process group (NCCL on GPUs, gloo on CPU). Every helper
below is a no-op in a single process, so the same engine code runs with and without it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank_and_world()[0] == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (torchrun sets these)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None) -> torch.device:
    """Join the process group torchrun described; return this process's device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). With CUDA each process
            takes GPU ``LOCAL_RANK`` and the NCCL backend; on CPU the gloo backend.

    Returns:
        The device this process should train on.
    """
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return dev


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def reduce_mean(value: torch.Tensor) -> float:
    """Average a scalar tensor over processes and return it as a float."""
    if is_distributed():
        value = all_reduce_sum(value) / dist.get_world_size()
    return float(value)


def _collective_device() -> torch.device:
    """Where collectives need their tensors: this process's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes; returns a new tensor on ``value``'s device (input untouched).

    The tensor travels to the backend's device (GPU for NCCL, CPU for gloo) and back, so CPU-side
    counters (confusion matrices) can be reduced under either backend.
    """
    if not is_distributed():
        return value.clone()
    # gloo and NCCL both reduce float64 and int64; counts stay exact in int64.
    out = value.to(_collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(value.device)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    process still holds the statistics of its own last batch; syncing them makes every rank
    evaluate, and rank 0 save, the same model.
    """
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every process (in memory only, never written to disk)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
