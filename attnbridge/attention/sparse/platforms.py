"""Where a block-mask backend runs: one selector in front of each platform's block-sparse kernel."""

from __future__ import annotations

from attnbridge.attention.registry import Unavailable
from attnbridge.attention.sparse.flex import FLEX
from attnbridge.attention.sparse.impl import Kernel, Selector, compose
from attnbridge.attention.sparse.triton_kernel import TRITON

#: Neither FlexAttention nor attnbridge's Triton kernel targets MUSA.
NO_MUSA = Unavailable(
    "no block-sparse kernel for MUSA (Triton does not target it); use 'sdpa', 'fa' or 'sage'"
)


def block_mask_platforms(selector: Selector, npu_kernel: Kernel) -> dict:
    """The ``platforms`` of a :class:`~attnbridge.attention.registry.Backend`: FlexAttention on the
    CPU (the exact reference), the Triton kernel on CUDA, ``npu_kernel`` on Ascend; none on MUSA."""
    return {
        "cpu": compose(selector, FLEX),
        "cuda": compose(selector, TRITON),
        "musa": NO_MUSA,
        "npu": compose(selector, npu_kernel),
    }
