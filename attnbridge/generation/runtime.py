"""Where a generate run computes: the process group (under a launcher), the device and the dtype."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def launched_world_size() -> int:
    """Processes started by ``torchrun`` / ``accelerate launch`` (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def start_distributed() -> tuple[torch.device | None, bool]:
    """``(this rank's device, whether we started the group)``; ``(None, False)`` without a launcher."""
    if launched_world_size() <= 1:
        return None, False
    from attnbridge.attention.parallel import init_distributed

    started = not (dist.is_available() and dist.is_initialized())
    return init_distributed().device, started


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def pick_device(requested: str | None, launcher_device: torch.device | None = None) -> torch.device:
    """``requested``, else the launcher's device for this rank, else the accelerator found, else CPU."""
    if requested:
        if requested.startswith("npu"):
            from attnbridge.platforms.npu import TORCH_NPU_INSTALL, load_torch_npu

            try:
                load_torch_npu()  # registers the "npu" device type
            except ImportError as error:
                raise ValueError(
                    f"--device {requested!r}: torch_npu cannot be imported ({error.__cause__}); "
                    f"install it with: {TORCH_NPU_INSTALL}"
                ) from None
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"--device {requested!r} is not a device torch knows ({error})") from None
        module = getattr(torch, device.type, None) if device.type != "cpu" else None
        if device.type != "cpu" and not (module is not None and module.is_available()):
            raise ValueError(f"--device {requested!r}: no {device.type} device is available on this machine")
        return device
    if launcher_device is not None:
        return launcher_device
    from attnbridge.platforms import detect_platform

    platform = detect_platform()
    return torch.device("cpu" if platform.name == "cpu" else platform.device_type)


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """bfloat16 on accelerators, float32 on CPU (bf16 matmuls there are slow), or ``requested``."""
    if requested is not None:
        try:
            return DTYPES[str(requested)]
        except KeyError:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}") from None
    return torch.float32 if device.type == "cpu" else torch.bfloat16
