"""Process-group setup for torchrun (NCCL on CUDA, gloo on CPU) and the mmseg BN layout."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's or a batch
    job's cpuset), which os.cpu_count(), every core of the machine, ignores."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def init_distributed(device: str | None = None) -> DistContext:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; joins the group when WORLD_SIZE > 1.
    device None: cuda:<local_rank> when a GPU exists, else cpu."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:<index>', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index >= count:
            raise ValueError(f"--device {device!r} (CUDA device {dev.index}): this machine has {count} usable CUDA "
                             f"device(s); use --device cpu" + ("" if count == 0 else f" or cuda:0..cuda:{count - 1}"))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank, world_size, local_rank, dev)


def leave_distributed(ranks_in_step: bool = True) -> None:
    """Destroys the process group, if there is one.

    ranks_in_step: every rank got here on the same path (a normal finish). Then they first meet at a
    barrier, so no rank tears down its connections while a peer is still using them; with gloo,
    a rank shutting down alone now and then dies in std::terminate. After an error the peers may
    never arrive, so pass False: no barrier.
    """
    if not dist.is_initialized():
        return
    if ranks_in_step:
        dist.barrier()
    dist.destroy_process_group()


def heads_to_sync_bn(model: nn.Module) -> nn.Module:
    """mmseg's layout: SyncBN in the decode and auxiliary heads, plain per-GPU BN in the backbone.

    Only for NCCL on CUDA: nn.SyncBatchNorm does not run on CPU tensors, so the gloo/CPU
    path keeps per-process BN in the heads (each process normalises over its own images).
    """
    model.decode_head = nn.SyncBatchNorm.convert_sync_batchnorm(model.decode_head)
    for i, head in enumerate(model.auxiliary_head):
        model.auxiliary_head[i] = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return model


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if `flag` is true on any (one tiny all_reduce when distributed)."""
    return bool(max_over_ranks(torch.tensor([1 if flag else 0]), ctx).item())


def max_over_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The elementwise max of `values` over the ranks, on every rank (values itself when not
    distributed); on the process group's device (NCCL: the GPU), so read it with .item()/.tolist()."""
    if not ctx.enabled:
        return values
    values = values.to(ctx.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def mean_over_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The elementwise mean of `values` over the ranks, on every rank (values itself when not
    distributed): mmseg logs each loss so, averaged over the GPUs."""
    if not ctx.enabled:
        return values
    values = values.to(ctx.device if dist.get_backend() == "nccl" else "cpu", copy=True)  # reduced in place
    dist.all_reduce(values)
    return values / ctx.world_size


def broadcast_bn_statistics(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's BatchNorm running statistics on every rank, as mmseg's DistEvalHook does before
    it evaluates (broadcast_bn_buffer=True). The backbone's BN is per-GPU, so every rank has
    its own; a sharded evaluation would otherwise score each rank's images with a different
    model, none of them the checkpoint (which holds rank 0's)."""
    if not ctx.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            dist.broadcast(module.running_mean, src=0)
            dist.broadcast(module.running_var, src=0)


def gather_objects(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
