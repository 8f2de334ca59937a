"""CPU: the reference kernels. Sparse backends run through FlexAttention block masks."""

from __future__ import annotations

from attnbridge.platforms.base import Kernel, Platform

_NO_SAGE = "sageattention needs a CUDA or MUSA GPU"


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    kernels = {
        "sdpa": Kernel("attnbridge.attention.backends.sdpa:TorchSDPAImpl"),
        "fa": Kernel("attnbridge.attention.backends.fa:ReferenceFAImpl"),
        "sage": Kernel("attnbridge.attention.backends.sage:SageUnsupportedImpl", fallback="fa"),
        "laser": Kernel("attnbridge.attention.backends.laser:LaserReferenceImpl"),
        "block_sparse": Kernel("attnbridge.attention.backends.block_sparse:FlexBlockSparseImpl"),
        "rain_fusion": Kernel("attnbridge.attention.backends.rain_fusion:FlexRainFusionImpl"),
        "vsa": Kernel("attnbridge.attention.backends.vsa:FlexVSAImpl"),
    }

    @classmethod
    def is_present(cls) -> bool:
        return True
