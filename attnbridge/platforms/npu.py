"""Ascend NPU through torch_npu and sgl-kernel-npu's `attentions` ops.

The loaders below are the only places that import those packages, so a missing package is one
clear error naming what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from attnbridge.errors import BackendUnavailableError
from attnbridge.platforms.base import Kernel, Platform

TORCH_NPU_INSTALL = "pip install torch-npu (matching your torch and CANN versions)"
ATTENTIONS_INSTALL = "pip install sgl-kernel-npu (provides the 'attentions' torch ops)"


def load_torch_npu(backend: str = "npu") -> ModuleType:
    """Import torch_npu or raise an error that says how to install it."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as error:
        raise BackendUnavailableError(
            backend, "npu", f"torch_npu cannot be imported ({error})", TORCH_NPU_INSTALL
        ) from error


def load_attentions_ops(backend: str) -> object:
    """Import sgl-kernel-npu's `attentions` package and return its `torch.ops.attentions` namespace."""
    load_torch_npu(backend)
    try:
        importlib.import_module("attentions")
    except ImportError as error:
        raise BackendUnavailableError(
            backend,
            "npu",
            f"the 'attentions' kernel package cannot be imported ({error})",
            ATTENTIONS_INSTALL,
        ) from error
    return torch.ops.attentions


#: ``torch_npu.npu.get_soc_version()`` of Ascend 950 (A5): no Laser kernel, and the block-sparse
#: kernel wants ``inner_precise=4`` there.
ASCEND_A5_SOC = 260


def is_ascend_a5(torch_npu: ModuleType) -> bool:
    """Whether the NPU in use is an Ascend 950 (A5); False where the chip cannot be queried (an old
    torch_npu, no device), so the kernel call itself decides."""
    try:
        return torch_npu.npu.get_soc_version() == ASCEND_A5_SOC
    except Exception:  # noqa: BLE001 - any failure of the query means "unknown", not an error
        return False


class NpuPlatform(Platform):
    name = "npu"
    device_type = "npu"
    kernels = {
        "sdpa": Kernel("attnbridge.attention.backends.sdpa:NpuFusionAttentionImpl"),
        "fa": Kernel("attnbridge.attention.backends.fa:NpuFIAImpl"),
        "sage": Kernel("attnbridge.attention.backends.sage:SageUnsupportedImpl", fallback="fa"),
        "laser": Kernel("attnbridge.attention.backends.laser:NpuLaserImpl"),
        "block_sparse": Kernel("attnbridge.attention.backends.block_sparse:NpuBlockSparseImpl"),
        "rain_fusion": Kernel("attnbridge.attention.backends.rain_fusion:NpuRainFusionImpl"),
        "vsa": Kernel(
            None, "no Ascend kernel for video sparse attention; use 'block_sparse' or 'rain_fusion'"
        ),
    }

    @classmethod
    def is_present(cls) -> bool:
        if importlib.util.find_spec("torch_npu") is None:
            return False
        load_torch_npu()
        return bool(getattr(torch, "npu", None) and torch.npu.is_available())
