"""Small mask helpers shared by the kernels and the adapters."""

from __future__ import annotations

import functools

import torch

#: Ascend's compressed causal mask for ``sparse_mode`` 2/3/4 is always 2048 x 2048.
NPU_COMPRESSED_MASK_SIZE = 2048


def bottom_right_causal_mask(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Bool ``[s_q, s_kv]``, True where key ``j <= i + s_kv - s_q``: flash attention's and ``sparse_mode=3``'s
    alignment (a prefill with a cached prefix); SDPA's ``is_causal`` aligns top-left."""
    rows = torch.arange(s_q, device=device)[:, None] + (s_kv - s_q)
    cols = torch.arange(s_kv, device=device)[None, :]
    return cols <= rows


@functools.lru_cache(maxsize=8)
def npu_compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The upper-triangular bool mask (True = masked) ``sparse_mode=3`` requires; once per device (4 MiB)."""
    size = NPU_COMPRESSED_MASK_SIZE
    return torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)


def key_padding_mask(key_lengths: torch.Tensor, s_kv: int) -> torch.Tensor:
    """Bool ``[B, 1, 1, s_kv]``, True where key ``j < key_lengths[b]`` (a real, not padded, key)."""
    return (torch.arange(s_kv, device=key_lengths.device) < key_lengths[:, None])[:, None, None, :]


def leading_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Leading set entries per row of ``mask`` ``[B, S]``; None when a set entry follows an unset one
    (checked outside ``torch.compile``: one host sync)."""
    mask = mask.bool()
    lengths = mask.sum(dim=-1)
    if not torch.compiler.is_compiling():
        leading = torch.arange(mask.shape[-1], device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(mask, leading):
            return None
    return lengths
