"""torchrun integration: rank discovery, process group, reductions, the DDP wrapper.

Rank and world size come from torchrun's complete environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or not at all. Under Slurm the
cluster launcher (``hydra/launcher=slurm``) exports the same variables for each task;
a plain ``srun`` should start ``torchrun`` on each node. A partial set (``RANK`` without
``WORLD_SIZE``, or the reverse) is a :class:`~cdnv2.errors.ConfigError`: guessing would
let a process that is not rank 0 act as the main one, or one that is skip the run lock.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
GROUP_VARS = ("MASTER_ADDR", "MASTER_PORT")  # where the ranks meet (world size > 1)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_env(environ: Mapping[str, str] = os.environ) -> DistInfo:
    """This process's rank and world size from torchrun's variables (all of them or none);
    raise :class:`ConfigError` naming the variables of a partial or invalid set."""
    given = {v: environ[v] for v in (*RANK_VARS, *GROUP_VARS) if environ.get(v, "").strip()}
    if not any(v in given for v in RANK_VARS):
        return DistInfo()  # not launched by torchrun (MASTER_ADDR/PORT alone decide nothing)
    shown = " ".join(f"{k}={v}" for k, v in given.items())
    values = {}
    for v in RANK_VARS:
        try:
            values[v] = int(given[v]) if v in given else None
        except ValueError:
            raise ConfigError(f"{v}={given[v]!r} is not a whole number; unset the torchrun variables "
                              f"({', '.join(RANK_VARS)}) or launch with torchrun.") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    needed = ["RANK", "WORLD_SIZE"] + (["LOCAL_RANK", *GROUP_VARS] if (world or 0) > 1 else [])
    missing = [v for v in needed if v not in given]
    if missing:
        raise ConfigError(
            f"incomplete distributed environment: {shown} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not. "
            "Rank and world size come from torchrun's complete set (RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR, MASTER_PORT) or not at all: launch with torchrun (or hydra/launcher=slurm), "
            f"or unset {', '.join(given)} for a single-process run."
        )
    port = given.get("MASTER_PORT", "0")
    if world < 1 or not 0 <= rank < world or (local is not None and not 0 <= local < world) or (
            not port.isdigit() or int(port) > 65535):
        raise ConfigError(
            f"inconsistent distributed environment: {shown}; RANK and LOCAL_RANK must be in "
            "[0, WORLD_SIZE) and MASTER_PORT a port number. Launch with torchrun, or unset these "
            "variables for a single-process run."
        )
    return DistInfo(rank, world, local or 0)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPU, Gloo on CPU)."""
    info = distributed_env()
    if not info.enabled:
        return info
    world = info.world_size
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend=backend)
        else:
            # torchrun's store outlives a restart: without a per-restart prefix the new
            # ranks can read the dead generation's addresses and fail to connect.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False
            )
            store = dist.PrefixStore(f"cdnv2/restart{restart}", store)
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=world)
    return info


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel, its integer buffers left out of DDP's broadcasts.

    Integer buffers (stages, compact indices) are structure, identical on every rank by
    construction (checked at the end of a run); Gloo cannot broadcast int16. DDP has no
    public way to leave some buffers out of its broadcasts (broadcast_buffers=False would
    leave BN statistics per rank): this documented static method is the one way.
    """
    ids = [device.index] if device.type == "cuda" else None
    structural = [n for n, b in model.named_buffers() if not b.is_floating_point()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, structural)
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop request)."""
    return any_rank_each([flag], info, device)[0]


def any_rank_each(flags: list[bool], info: DistInfo, device: torch.device | str = "cpu") -> list[bool]:
    """:func:`any_rank` for several flags at once: one all-reduce, one host sync."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
