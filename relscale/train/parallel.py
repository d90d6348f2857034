"""Process group set-up and FSDP2 sharding.

A process launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the
environment, one node or many) joins a process group (NCCL on GPU, gloo on CPU) and its model is
sharded with FSDP2: one ``fully_shard`` per block plus one on the root, which owns the
embedding, the final norm and the output head (the fused loss reads ``model.output.weight``
inside the root forward, so the root's unshard gathers it). A plain ``python`` process needs no
process group: the model stays a plain module.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from relscale.errors import ConfigError


@dataclass
class DistEnv:
    """Where this process trains: its rank among ``world_size`` processes, its device, and
    whether a process group is in use (the model is then sharded with FSDP2)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group is in use (the model is sharded)
    owns_group: bool = False  # this run created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes metrics, results and the final model."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun's RANK and WORLD_SIZE are set in the environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` for "cuda" (or "auto" with a GPU), else the CPU; ConfigError naming
    ``device`` when "cuda" is asked for without a CUDA device."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str) -> DistEnv:
    """Join (or create) the process group when launched by torchrun; a plain process gets none."""
    if not launched_by_torchrun() and not dist.is_initialized():
        device = resolve_device(requested_device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistEnv(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        # Bind the device so NCCL communicators are created eagerly for it.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
        owns = True
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        distributed=True,
        owns_group=owns,
    )


def teardown(env: DistEnv) -> None:
    """Destroy the process group if this run created it (after a barrier of every rank)."""
    if env.owns_group and dist.is_initialized():
        # Every rank reaches teardown before any destroys the group: a rank that tears gloo down
        # while its peer still has a pending operation can abort the peer at exit (seen once:
        # "terminate called without an active exception" after a finished run).
        with contextlib.suppress(Exception):  # a peer that already failed must not mask our error
            dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (gloo has no AVG, so averages are sums divided by the world size)."""
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shard_model(model: nn.Module, param_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2 per block, then the root. ``param_dtype`` bf16: compute in bf16, gradients reduced
    in fp32, master weights and optimizer state in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the backward: keep them.
        fully_shard(block, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)
    return model
