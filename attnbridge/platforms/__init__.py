"""Platform detection and lookup. Kernels are chosen per tensor device, so one process can mix them."""

from __future__ import annotations

import torch

from attnbridge.platforms.base import Platform
from attnbridge.platforms.cpu import CpuPlatform
from attnbridge.platforms.cuda import CudaPlatform
from attnbridge.platforms.musa import MusaPlatform
from attnbridge.platforms.npu import NpuPlatform

#: Most specific first: an Ascend or MUSA machine may also report a working CPU.
PLATFORMS: dict[str, type[Platform]] = {
    p.name: p for p in (NpuPlatform, MusaPlatform, CudaPlatform, CpuPlatform)
}


def get_platform(name: str) -> type[Platform]:
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ValueError(f"unknown platform {name!r}; known platforms: {', '.join(PLATFORMS)}") from None


def detect_platform() -> type[Platform]:
    """The accelerator this machine has (the first present of npu, musa, cuda), else cpu."""
    return next(p for p in PLATFORMS.values() if p.is_present())


def platform_name_for_device(device: torch.device | str) -> str:
    device_type = torch.device(device).type
    for platform in PLATFORMS.values():
        if platform.device_type == device_type:
            return platform.name
    # ROCm builds report "cuda". Other devices (xpu, mps) have no kernel table yet: say so rather
    # than run something the user did not ask for.
    raise ValueError(
        f"no attnbridge platform serves device type {device_type!r}; "
        f"supported: {', '.join(p.device_type for p in PLATFORMS.values())}"
    )


__all__ = ["PLATFORMS", "Platform", "detect_platform", "get_platform", "platform_name_for_device"]
