"""Small mask helpers shared by the kernels and the adapters."""

from __future__ import annotations

import functools

import torch

#: Ascend's compressed causal mask for ``sparse_mode`` 2/3/4 is always 2048 x 2048.
NPU_COMPRESSED_MASK_SIZE = 2048


def bottom_right_causal_mask(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Bool ``[s_q, s_kv]``, True where query ``i`` may see key ``j`` (``j <= i + s_kv - s_q``). Bottom-right
    alignment is what flash attention and Ascend's ``sparse_mode=3`` do, and what a prefill with a cached
    prefix needs; torch SDPA's ``is_causal`` aligns top-left instead."""
    rows = torch.arange(s_q, device=device)[:, None] + (s_kv - s_q)
    cols = torch.arange(s_kv, device=device)[None, :]
    return cols <= rows


@functools.lru_cache(maxsize=8)
def npu_compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The 2048 x 2048 upper-triangular bool mask (True = masked) that ``sparse_mode=3`` requires;
    made once per device (4 MiB) and only read afterwards."""
    size = NPU_COMPRESSED_MASK_SIZE
    return torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)


def key_padding_mask(key_lengths: torch.Tensor, s_kv: int) -> torch.Tensor:
    """Bool ``[B, 1, 1, s_kv]``, True where key ``j < key_lengths[b]`` (a real, not padded, key)."""
    return (torch.arange(s_kv, device=key_lengths.device) < key_lengths[:, None])[:, None, None, :]


def leading_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """How many leading entries of each row of the 2-D ``mask`` ``[B, S]`` are set, or None when a row
    has a set entry after an unset one (checked outside ``torch.compile``: one host sync)."""
    mask = mask.bool()
    lengths = mask.sum(dim=-1)
    if not torch.compiler.is_compiling():
        leading = torch.arange(mask.shape[-1], device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(mask, leading):
            return None
    return lengths
