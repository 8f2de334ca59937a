"""CUDA (and ROCm builds of torch): cuDNN/flash SDPA, SageAttention, FlexAttention block masks."""

from __future__ import annotations

import torch

from attnbridge.platforms.base import Kernel, Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    kernels = {
        "sdpa": Kernel("attnbridge.attention.backends.sdpa:TorchSDPAImpl"),
        "fa": Kernel("attnbridge.attention.backends.fa:AtenFAImpl"),
        "sage": Kernel("attnbridge.attention.backends.sage:SageImpl", fallback="fa"),
        "laser": Kernel("attnbridge.attention.backends.laser:LaserReferenceImpl"),
        "block_sparse": Kernel("attnbridge.attention.backends.block_sparse:FlexBlockSparseImpl"),
        "rain_fusion": Kernel("attnbridge.attention.backends.rain_fusion:FlexRainFusionImpl"),
        "vsa": Kernel("attnbridge.attention.backends.vsa:FlexVSAImpl"),
    }

    @classmethod
    def is_present(cls) -> bool:
        return torch.cuda.is_available()
