"""One run over several processes: ``torch.distributed`` under ``torchrun``, seen by the training loops.

Every training path (cached heads, the converged probe, DifFeed, live probing and fine-tuning,
pretraining) runs unchanged on 1 or N processes and means the same run: ``--batch-size`` is the
GLOBAL batch, every rank takes a contiguous share of each global batch drawn from the same seeded
order a single process uses, gradients are averaged by DDP over the trained parameters only, and
losses are scaled so that the averaged gradient is the gradient of the global batch's mean loss.
Scores are summed as counts across ranks, never averaged as percentages. Rank 0 alone writes.

A training loop adopts it in a few lines (``probe.train.fit`` is the worked example)::

    from extract import distributed as dist
    model = dist.wrap_trained(dist.sync_batch_norm(model), device)   # DDP, frozen backbone left out
    for rows in global_batches:                                      # the single-process order
        mine = rows[dist.share(len(rows))]                           # this rank's contiguous part
        n = dist.global_count(len(mine))                             # rows in the global batch
        loss = criterion(model(x[mine]), y[mine], reduction="sum") * dist.world_size() / n
        loss.backward(); optimizer.step()                            # DDP averages: the global mean
    correct = dist.all_reduce_sum(torch.tensor([hits, rows]))        # exact scores: counts
    if dist.is_main(): save(...)                                     # checkpoints, results, reports

``initialize`` is called once per process by the CLI (``pipeline.cli.main``); it does nothing
outside ``torchrun`` (no ``WORLD_SIZE`` in the environment), and every helper then falls back to
the single-process meaning, so library code never asks whether it is distributed.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch import distributed as torch_dist

__all__ = [
    "DistContext", "detect", "initialize", "shutdown", "context", "rank", "world_size", "is_main", "active",
    "share", "global_count", "all_reduce_sum", "barrier", "wrap_trained", "unwrap", "sync_batch_norm",
    "GlobalBatchNorm", "no_sync", "describe_failure",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size, its local rank, the backend, the accumulation.

    Args:
        accumulate: micro-batches per optimizer step on every rank (gradient accumulation keeps a
            global batch when fewer processes, or less memory, are at hand; the sum is the same step).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    accumulate: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT = DistContext()


def detect() -> DistContext:
    """The distributed environment ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistContext(rank=int(os.environ.get("RANK", "0")), world_size=world,
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def initialize(device: str = "auto", accumulate: int = 1, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group ``torchrun`` prepared: ``nccl`` for CUDA tensors when this rank has a GPU, ``gloo``
    for CPU tensors (both at once on GPU machines: ``cpu:gloo,cuda:nccl``, so counts kept on the CPU and a
    ``--device cpu`` run work there too).

    Outside ``torchrun`` (WORLD_SIZE unset or 1) nothing is joined and the context says one process.
    Each GPU rank is pinned to ``cuda:LOCAL_RANK`` (so ``--device auto``/``cuda`` mean its own GPU).

    Args:
        device: ``auto``, ``cpu`` or ``cuda``: chooses the backend (cpu forces gloo).
        accumulate: micro-batches per optimizer step (see ``DistContext``).
        timeout_s: how long a collective waits for a rank before it fails.
    """
    global _CONTEXT
    found = detect()
    if accumulate < 1:
        raise ValueError(f"--accumulate must be at least 1, got {accumulate}")
    backend = None
    if found.world_size > 1:
        gpu = torch.cuda.is_available() and device != "cpu"
        backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
        if gpu:
            torch.cuda.set_device(found.local_rank)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _CONTEXT = DistContext(found.rank, found.world_size, found.local_rank, backend, int(accumulate))
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (end of a command); the context returns to one process, no accumulation."""
    global _CONTEXT
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _CONTEXT = DistContext()


def context() -> DistContext:
    """This process's context (a process group joined outside ``initialize``, e.g. by a test, counts too)."""
    if _CONTEXT.world_size == 1 and active():
        return DistContext(torch_dist.get_rank(), torch_dist.get_world_size(), torch_dist.get_rank(),
                           torch_dist.get_backend(), _CONTEXT.accumulate)
    return _CONTEXT


def active() -> bool:
    """True when a process group of more than one process is joined."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, results rows and reports."""
    return rank() == 0


def share(num_rows: int, part: int | None = None, parts: int | None = None) -> slice:
    """This rank's contiguous part of ``num_rows`` rows: ``[n*r // W, n*(r+1) // W)``.

    The parts are disjoint, cover every row once (no drop, no repeat when W does not divide n), and
    differ in size by at most one row.
    """
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    return slice(num_rows * part // parts, num_rows * (part + 1) // parts)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place, and returned); the value itself on one process. Counts stay exact."""
    if active():
        torch_dist.all_reduce(value)
    return value


def global_count(local_rows: int, device: torch.device | str = "cpu") -> int:
    """Rows of the global batch: the sum of every rank's share (its own on one process)."""
    if not active():
        return int(local_rows)
    return int(all_reduce_sum(torch.tensor([int(local_rows)], dtype=torch.int64, device=device)).item())


def barrier() -> None:
    if active():
        torch_dist.barrier()


def wrap_trained(module: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``DistributedDataParallel`` over what trains; the module itself on one process.

    A frozen backbone (``module.backbone`` with no parameter that trains) is left out of DDP: its
    weights are neither broadcast nor watched (552M parameters of the 256x256 U-Net), since every rank
    builds the same ones. A tuned backbone is in, with unused-parameter detection (the truncated
    forward leaves later blocks without gradients). Save and load through ``unwrap(model)``, so
    checkpoints never carry ``module.`` and load on any world size.
    """
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    backbone = getattr(module, "backbone", None)
    tuned = backbone is not None and any(p.requires_grad for p in backbone.parameters())
    if backbone is not None and not tuned:
        names = [f"backbone.{n}" for n, _ in backbone.named_parameters()] + \
                [f"backbone.{n}" for n, _ in backbone.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    device = torch.device(device) if device is not None else None
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else None
    # buffers are not sent every forward: BatchNorm statistics are global already (``sync_batch_norm``)
    quiet = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    buffers = {"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=tuned, **buffers)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the module itself otherwise)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


class no_sync:
    """``model.no_sync()`` for a DDP model (gradient accumulation: reduce once per step), nothing otherwise."""

    def __init__(self, model: nn.Module, skip: bool = True):
        self.inner = model.no_sync() if skip and hasattr(model, "no_sync") else None

    def __enter__(self):
        return self.inner.__enter__() if self.inner is not None else None

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc) if self.inner is not None else False


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss reaches every input."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics are those of the global batch, on any backend (gloo too).

    ``torch.nn.SyncBatchNorm`` (used on GPUs) refuses CPU tensors; this one sums (count, sum, sum of
    squares) over ranks with a differentiable all-reduce, so forward and backward equal BatchNorm on
    the whole global batch. Same parameters and buffers as ``BatchNorm2d``: checkpoints move freely.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0, 2, 3]
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=x.dtype, device=x.device)
        stats = torch.cat([count, x.sum(dims), (x * x).sum(dims)])
        stats = _SumOverRanks.apply(stats)
        n = stats[0]
        mean = stats[1:1 + x.shape[1]] / n
        var = (stats[1 + x.shape[1]:] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach() * momentum)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` in ``module`` computes global-batch statistics when several ranks train.

    GPUs get ``torch.nn.SyncBatchNorm``; gloo (CPUs) gets ``GlobalBatchNorm``. The same parameter
    objects are kept (an optimizer built before still holds them). One process: unchanged.
    """
    if not active():
        return module
    if any(p.is_cuda for p in module.parameters()) and "nccl" in str(torch_dist.get_backend()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            replaced = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device=child.running_mean.device
                                       if child.running_mean is not None else None)
            if child.affine:
                replaced.weight, replaced.bias = child.weight, child.bias
            if child.track_running_stats:
                replaced.running_mean, replaced.running_var = child.running_mean, child.running_var
                replaced.num_batches_tracked = child.num_batches_tracked
            replaced.train(child.training)
            setattr(module, name, replaced)
        else:
            sync_batch_norm(child)
    return module


def describe_failure(exc: BaseException) -> str | None:
    """One line for an error that a lost rank causes in a collective (None for any other error)."""
    text = str(exc)
    lost = ("Connection closed by peer", "Connection reset", "Broken pipe", "NCCL communicator was aborted",
            "Timed out", "timed out", "DistBackendError", "ProcessGroup")
    if not active():
        return None
    if type(exc).__name__ == "DistBackendError" or any(word in text for word in lost):
        first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
        return (f"rank {rank()} of {world_size()}: another rank stopped during a collective ({first}); "
                f"torchrun names the rank that died; rerun with --resume to continue from the last checkpoint")
    return None
