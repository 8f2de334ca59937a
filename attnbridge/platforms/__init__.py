"""Platform detection and lookup. Kernels are chosen per tensor device, so one process can mix them."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch


def _musa_present() -> bool:
    if importlib.util.find_spec("torch_musa") is None:
        return False
    importlib.import_module("torch_musa")  # registers torch.musa
    return bool(getattr(torch, "musa", None) and torch.musa.is_available())


def _npu_present() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    from attnbridge.platforms.npu import load_torch_npu

    load_torch_npu()  # registers torch.npu
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


@dataclass(frozen=True)
class Platform:
    """One accelerator family: attnbridge name, torch device type, and how to detect it."""

    name: str
    device_type: str
    is_present: Callable[[], bool]


#: Most specific first: an Ascend or MUSA machine may also report a working CPU.
PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform("npu", "npu", _npu_present),
        Platform("musa", "musa", _musa_present),
        Platform("cuda", "cuda", torch.cuda.is_available),
        Platform("cpu", "cpu", lambda: True),
    )
}
#: Environment variable that forces every layer's platform (as ``platform=`` does for one layer).
PLATFORM_ENV = "ATTNBRIDGE_PLATFORM"
#: Column order of every table.
PLATFORM_ORDER: tuple[str, ...] = ("cpu", "npu", "cuda", "musa")


def get_platform(name: str) -> Platform:
    try:
        return PLATFORMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown platform {name!r}; known platforms: {', '.join(PLATFORMS)}") from None


def detect_platform() -> Platform:
    """The accelerator this machine has (the first present of npu, musa, cuda), else cpu."""
    return next(p for p in PLATFORMS.values() if p.is_present())


def platform_name_for_device(device: torch.device | str) -> str:
    device_type = torch.device(device).type
    for platform in PLATFORMS.values():
        if platform.device_type == device_type:
            return platform.name
    # ROCm reports "cuda"; other devices (xpu, mps) have no kernels: refuse rather than run something else.
    raise ValueError(
        f"no attnbridge platform serves device type {device_type!r}; "
        f"supported: {', '.join(p.device_type for p in PLATFORMS.values())}"
    )


__all__ = ["PLATFORM_ENV", "PLATFORM_ORDER", "detect_platform", "get_platform", "platform_name_for_device"]
