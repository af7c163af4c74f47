"""Data parallelism for the trainer: which rank this is, its shard, and the few collectives it needs.

The trainer's unit of work is the *global* batch (``TrainConfig.batch_size``
sequences). With N processes each rank samples, scores and trains on its
contiguous 1/N of it; every number that reaches the controller or the metrics
is reduced over all ranks from sums and counts, so a run on N processes
computes what one process computes on the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (``size == 1``: no torch.distributed)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        """The default process group's rank and size, or a single process when it is not initialized."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and prints."""
        return self.rank == 0

    @property
    def group(self):
        """The process group for :func:`klbelt.aggregate` and the losses (``None`` alone: no reduction)."""
        if self.size == 1:
            return None
        import torch.distributed as dist

        return dist.group.WORLD

    def shard(self, n: int) -> slice:
        """This rank's contiguous rows of a global batch of ``n`` (``n`` divisible by ``size``)."""
        if n % self.size:
            raise ValueError(f"a global batch of {n} cannot be split evenly over {self.size} processes")
        per_rank = n // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def all_sum(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` summed over the ranks (one all-reduce; e.g. a step's sums and counts, stacked)."""
        if self.size == 1:
            return local
        import torch.distributed as dist

        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``local`` along dim 0, in rank order (same shape on every rank)."""
        if self.size == 1:
            return local
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def gather_list(self, local: list) -> list:
        """Concatenate every rank's Python list, in rank order (e.g. decoded texts)."""
        if self.size == 1:
            return list(local)
        import torch.distributed as dist

        parts: list = [None] * self.size
        dist.all_gather_object(parts, list(local))
        return [item for part in parts for item in part]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` under DistributedDataParallel (gradients averaged in backward); itself when alone.

        Buffers are not broadcast: the models' buffers are constants (causal
        masks), identical on every rank.
        """
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, broadcast_buffers=False)


def _prctl():
    """libc's ``prctl`` (Linux), looked up once; ``None`` elsewhere."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(prctl=None) -> bool:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``); False elsewhere.

    torchrun starts each worker in a session of its own, so killing the launcher's
    process group leaves the workers running: orphans that keep writing to the run
    folder while a ``--resume`` of it starts. With this a killed launcher takes its
    workers with it. A parent already gone (this process adopted by init) ends it now.
    ``prctl``: the function, looked up before a fork (:func:`parent_death_kills`).
    """
    import signal

    prctl = prctl or _prctl()
    if prctl is None or prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        return False
    if os.getppid() == 1:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def parent_death_kills():
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child dies with this process (no-op off Linux).

    libc is looked up here, in the parent: the child runs only the call.
    """
    prctl = _prctl()
    return lambda: die_with_parent(prctl) if prctl is not None else None


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> World:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    gloo on CPU, NCCL on CUDA. Does nothing (a single-process world) when not
    launched by torchrun or when the group already exists. A worker that torchrun
    started dies with it (:func:`die_with_parent`).
    """
    import datetime

    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's worker: never outlive the agent
        die_with_parent()
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World.current()


def rank_device(device: str, world: World) -> str:
    """``"cuda"`` means this rank's own GPU (``cuda:LOCAL_RANK``) when there are several processes."""
    if device == "cuda" and world.size > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', world.rank)}"
    return device
