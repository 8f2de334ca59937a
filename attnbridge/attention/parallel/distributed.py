"""Starting torch.distributed with the accelerator's collective library, and small collective helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

#: The collective library each platform's devices talk through.
COLLECTIVE_BACKENDS = {"npu": "hccl", "cuda": "nccl", "musa": "mccl", "cpu": "gloo"}


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launched_world_size() -> int:
    """Processes started by ``torchrun`` / ``accelerate launch`` (1 without a launcher)."""
    return _env_int("WORLD_SIZE", 1)


#: Seconds to wait for every rank to join (and any collective): a missing rank fails the others, not hangs.
TIMEOUT_ENV = "ATTNBRIDGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def default_timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(value) if value not in (None, "") else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {value!r}") from None
    return timedelta(seconds=seconds)


def init_distributed(
    backend: str | None = None,
    *,
    platform: str | None = None,
    init_method: str | None = None,
    timeout: timedelta | None = None,
) -> DistributedInfo:
    """Initialise the default process group once from the launcher's ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` and select the local device. Without a launcher (``WORLD_SIZE`` unset or 1, no
    ``init_method``) nothing is initialised. ``timeout``: ``$ATTNBRIDGE_DIST_TIMEOUT`` s, else 300."""
    from attnbridge.platforms import PLATFORM_ENV, detect_platform, get_platform

    platform = platform or os.environ.get(PLATFORM_ENV)
    platform_info = get_platform(platform) if platform else detect_platform()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _select_device(platform_info.name, platform_info.device_type, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)
    rank = _env_int("RANK", 0)
    world_size = launched_world_size()
    if world_size == 1 and init_method is None:
        return DistributedInfo(0, 1, local_rank, None, device)
    backend = backend or COLLECTIVE_BACKENDS[platform_info.name]
    timeout = timeout or default_timeout()
    try:
        dist.init_process_group(
            backend, init_method=init_method or "env://", rank=rank, world_size=world_size, timeout=timeout
        )
    except (RuntimeError, dist.DistError) as error:
        raise RuntimeError(
            f"torch.distributed did not start within {timeout.total_seconds():g} s: rank {rank} of "
            f"{world_size} waited for the others ({error}). Start every rank (torchrun --nproc_per_node "
            f"{world_size}), or set {TIMEOUT_ENV}=<seconds>"
        ) from error
    return DistributedInfo(rank, world_size, local_rank, backend, device)


def _select_device(platform: str, device_type: str, local_rank: int) -> torch.device:
    if platform == "cpu":
        return torch.device("cpu")
    if platform == "npu":
        from attnbridge.platforms.npu import load_torch_npu

        load_torch_npu()  # registers torch.npu and the HCCL backend
    module = getattr(torch, device_type)
    count = module.device_count()
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} needs {device_type} device {local_rank}, but this machine has {count}: "
            f"start at most {count} processes per node, or run on the CPU with gloo (ATTNBRIDGE_PLATFORM=cpu)"
        )
    module.set_device(local_rank)
    return torch.device(device_type, local_rank)


def group_size(group: dist.ProcessGroup | None) -> int:
    """``None`` stands for "no parallelism here" (size 1), not the world."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's equally shaped ``x`` along dim 0, in group-rank order."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    # all_gather_single replaces all_gather_into_tensor from torch 2.13 on; older torch lacks it.
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(out, x, group=group)
    return out
