"""Moore Threads MUSA through torch_musa: torch SDPA, the aten flash op for LSE, SageAttention."""

from __future__ import annotations

import importlib.util

import torch

from attnbridge.platforms.base import Kernel, Platform

_NO_FLEX = "FlexAttention (Triton) is not available for MUSA; use 'sdpa', 'fa' or 'sage'"


class MusaPlatform(Platform):
    name = "musa"
    device_type = "musa"
    kernels = {
        "sdpa": Kernel("attnbridge.attention.backends.sdpa:TorchSDPAImpl"),
        "fa": Kernel("attnbridge.attention.backends.fa:AtenFAImpl"),
        "sage": Kernel("attnbridge.attention.backends.sage:SageImpl", fallback="fa"),
        "laser": Kernel(None, "Laser Attention is an Ascend NPU kernel; use 'fa'"),
        "block_sparse": Kernel(None, _NO_FLEX),
        "rain_fusion": Kernel(None, _NO_FLEX),
        "vsa": Kernel(None, _NO_FLEX),
    }

    @classmethod
    def is_present(cls) -> bool:
        if importlib.util.find_spec("torch_musa") is None:
            return False
        import torch_musa  # noqa: F401  (registers torch.musa)

        return bool(getattr(torch, "musa", None) and torch.musa.is_available())
