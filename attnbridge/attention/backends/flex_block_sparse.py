"""Block-sparse attention through FlexAttention, from lists of kept key blocks.

The ``BlockMask`` is built directly from the index lists (``BlockMask.from_kv_blocks``) with every
kept block marked *full*, so the kernel never evaluates a mask per element; sequence lengths that
are not a multiple of the block size are handled by the kernel's own bounds (``seq_lengths``).
With ``key_valid`` (pad keys), only the kept blocks that hold a pad key are *partial* blocks whose
``mask_mod`` reads ``key_valid``.

* CUDA (and other GPUs): ``torch.compile(flex_attention, dynamic=False)``, compiled once per shape.
  The BlockMask tensors are inputs of the compiled graph, so a mask built fresh each call does not
  recompile.
* CPU: FlexAttention's unfused path, in float32 and in query chunks. That path materializes scores
  and applies only the ``mask_mod``, so on CPU the mask_mod looks the kept blocks up in a table.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # torch >= 2.9 asks for the LSE this way; ``return_lse`` is deprecated there
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

from attnbridge.attention.backends.block_select import indices_to_mask
from attnbridge.attention.backends.row_split import merge_row_split, split_long_rows
from attnbridge.attention.contract import default_scale

#: Bytes of float32 scores one CPU chunk may hold (same budget as the dense CPU reference).
_CPU_CHUNK_BYTES = 256 * 1024 * 1024

#: FlexAttention kernel options for 128-token blocks on Hopper (sm90). Measured on an H200 at the
#: Wan 480p shape (S=32760, H=12, D=128, bf16) with 25% and 10% of the blocks kept: 128x128 tiles,
#: 3 stages, TMA loads ran 3.52 / 1.80 ms against 3.81 / 1.94 ms for Flex's default (128x64, no
#: TMA); 128x64 with TMA, 4 stages, or 4 warps were slower. Elsewhere Flex's defaults are used.
SM90_KERNEL_OPTIONS: dict = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True}
#: Overrides the kernel options for 128-token blocks on every GPU (for tuning; None: as above).
GPU_KERNEL_OPTIONS: dict | None = None
#: On GPUs, ``long_rows`` run as chunks of this many key blocks (:mod:`.row_split`); None: never.
GPU_ROW_CHUNK: int | None = 32

_compiled_flex = None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
    long_rows: tuple[int, ...] = (),
    row_chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each ``block_size`` query block over its listed key blocks only.

    ``q``/``k``/``v`` BSHD (``H_q % H_kv == 0``); ``kv_indices`` int ``[B, H_q, n_q_blocks, max_k]``
    (entries past the row's count are ignored), ``kv_counts`` int ``[B, H_q, n_q_blocks]``; B and H
    may be 1 to broadcast. ``key_valid`` optional bool ``[S_kv]``: False marks a pad key that gets
    no weight. Returns ``out`` BSHD in q's dtype, and with ``return_lse`` the float32 natural-log LSE
    ``[B, H_q, S_q]``.

    ``long_rows``: query blocks with long lists (dense rows), run as chunks of ``row_chunk`` key
    blocks on separate thread blocks (:mod:`.row_split`; default :data:`GPU_ROW_CHUNK` on GPUs,
    no split on the CPU, where it buys nothing). The result is the same up to rounding.
    """
    _check_args(q, k, kv_indices, kv_counts, block_size, key_valid)
    scale = default_scale(q.shape[-1], scale)
    n_kv_blocks = math.ceil(k.shape[1] / block_size)
    forward = _cpu_forward if q.device.type == "cpu" else _gpu_forward
    if row_chunk is None and q.device.type != "cpu":
        row_chunk = GPU_ROW_CHUNK
    n_q_blocks = math.ceil(q.shape[1] / block_size)
    if any(not 0 <= row < n_q_blocks for row in long_rows):
        raise ValueError(
            f"block_sparse_attention: long_rows {tuple(long_rows)} must be query blocks in [0, {n_q_blocks})"
        )
    split = None
    if long_rows and row_chunk:
        kv_indices = _fit_width(kv_indices, n_kv_blocks)
        split = split_long_rows(q, kv_indices, kv_counts, tuple(long_rows), row_chunk, block_size)
    if split is None:
        return forward(q, k, v, kv_indices, kv_counts, n_kv_blocks, block_size, scale, key_valid, return_lse)
    args = (n_kv_blocks, block_size, scale, key_valid, True)
    out, lse = forward(q, k, v, kv_indices, split.main_counts, *args)
    extra_out, extra_lse = forward(split.extra_q, k, v, split.extra_indices, split.extra_counts, *args)
    out, lse = merge_row_split(out, lse, extra_out, extra_lse, split.plan)
    return (out, lse) if return_lse else out


def _check_args(q, k, kv_indices, kv_counts, block_size, key_valid) -> None:
    batch, s_q, heads = q.shape[0], q.shape[1], q.shape[2]
    n_q_blocks = math.ceil(s_q / block_size)
    if kv_indices.dim() != 4 or kv_counts.shape != kv_indices.shape[:3]:
        raise ValueError(
            "block_sparse_attention: kv_indices must be [B, H, n_q_blocks, max_k] and kv_counts "
            f"[B, H, n_q_blocks]; got {tuple(kv_indices.shape)} and {tuple(kv_counts.shape)}"
        )
    b, h, nq = kv_indices.shape[:3]
    if b not in (1, batch) or h not in (1, heads) or nq != n_q_blocks:
        raise ValueError(
            f"block_sparse_attention: kv_indices {tuple(kv_indices.shape)} does not fit q {tuple(q.shape)} "
            f"with block_size {block_size} (expected [{batch} or 1, {heads} or 1, {n_q_blocks}, max_k])"
        )
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.shape != (k.shape[1],)):
        raise ValueError(
            f"block_sparse_attention: key_valid must be a bool tensor of shape [{k.shape[1]}] (S_kv); "
            f"got {key_valid.dtype} {tuple(key_valid.shape)}"
        )


def _fit_width(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Pad or cut the index lists to ``width`` columns, so the compiled graph's shapes stay fixed."""
    indices = indices.to(torch.int32)
    if indices.shape[-1] < width:
        return torch.nn.functional.pad(indices, (0, width - indices.shape[-1]))
    return indices[..., :width].contiguous()


def _blocks_with_pads(key_valid: torch.Tensor, n_kv_blocks: int, block_size: int) -> torch.Tensor:
    """Bool ``[n_kv_blocks]``: blocks holding at least one pad key (those need the mask_mod)."""
    padded = torch.nn.functional.pad(key_valid, (0, n_kv_blocks * block_size - key_valid.numel()), value=True)
    return ~padded.view(n_kv_blocks, block_size).all(dim=-1)


def _compact(indices: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the entries where ``keep`` is True to the front of each row (order kept), with counts."""
    width = indices.shape[-1]
    slot = torch.where(keep, keep.to(torch.int32).cumsum(-1) - 1, width).long()
    out = torch.zeros(*indices.shape[:-1], width + 1, dtype=torch.int32, device=indices.device)
    out.scatter_(-1, slot, indices)
    return out[..., :width].contiguous(), keep.sum(-1, dtype=torch.int32)


def _gpu_block_mask(kv_indices, kv_counts, n_kv_blocks, block_size, seq_lengths, key_valid) -> BlockMask:
    indices = _fit_width(kv_indices, n_kv_blocks)
    counts = kv_counts.to(torch.int32).contiguous()
    if key_valid is None:
        none = torch.zeros_like(counts)
        return BlockMask.from_kv_blocks(
            none,
            indices,
            counts,
            indices,
            BLOCK_SIZE=block_size,
            seq_lengths=seq_lengths,
            compute_q_blocks=False,
        )
    # Blocks with pad keys are partial (mask_mod applied), the others stay full.
    listed = torch.arange(n_kv_blocks, device=indices.device) < counts[..., None]
    has_pad = _blocks_with_pads(key_valid, n_kv_blocks, block_size)[indices.long()] & listed
    partial_indices, partial_counts = _compact(indices, has_pad)
    full_indices, full_counts = _compact(indices, listed & ~has_pad)
    valid = torch.nn.functional.pad(key_valid, (0, n_kv_blocks * block_size - key_valid.numel()))

    def key_is_valid(b, h, q_idx, kv_idx):
        return valid[kv_idx]

    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=key_is_valid,
        seq_lengths=seq_lengths,
        compute_q_blocks=False,
    )


def _gpu_forward(q, k, v, kv_indices, kv_counts, n_kv_blocks, block_size, scale, key_valid, return_lse):
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = _gpu_block_mask(
        kv_indices, kv_counts, n_kv_blocks, block_size, (q.shape[1], k.shape[1]), key_valid
    )
    result = _compiled_flex(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
        kernel_options=_kernel_options(block_size, q.device),
        **_lse_request(return_lse),
    )
    out, lse = _split_lse(result, return_lse)
    return (out.transpose(1, 2), lse.float()) if return_lse else out.transpose(1, 2)


def _kernel_options(block_size: int, device: torch.device) -> dict | None:
    """Flex's tile sizes must divide the sparse block: smaller blocks (VSA's 64) get 64-wide tiles."""
    if block_size >= 128:
        if GPU_KERNEL_OPTIONS is not None:
            return GPU_KERNEL_OPTIONS
        if (
            device.type == "cuda"
            and torch.version.cuda
            and torch.cuda.get_device_capability(device) == (9, 0)
        ):
            return SM90_KERNEL_OPTIONS
        return None
    tile = min(64, block_size)
    return {"BLOCK_M": tile, "BLOCK_N": tile, "num_warps": 4, "num_stages": 3}


def _cpu_forward(q, k, v, kv_indices, kv_counts, n_kv_blocks, block_size, scale, key_valid, return_lse):
    batch, s_q, heads, _ = q.shape
    s_kv = k.shape[1]
    table = indices_to_mask(kv_indices, kv_counts, n_kv_blocks).expand(batch, heads, -1, -1)
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    rows_per_block = batch * heads * block_size * s_kv * 4 * 3  # scores, mask and probs
    chunk_blocks = max(1, _CPU_CHUNK_BYTES // rows_per_block)
    outs, lses = [], []
    for first in range(0, table.shape[2], chunk_blocks):
        rows = table[:, :, first : first + chunk_blocks]
        q_chunk = qf[:, :, first * block_size : (first + chunk_blocks) * block_size]
        out, lse = _split_lse(
            _flex_unfused(q_chunk, kf, vf, rows, block_size, scale, key_valid, return_lse), return_lse
        )
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return (out, torch.cat(lses, dim=2).float()) if return_lse else out


def _flex_unfused(q, k, v, table, block_size, scale, key_valid, return_lse):
    """FlexAttention's unfused path on one query chunk; ``table`` [B, H, chunk_blocks, nk] decides."""

    if key_valid is None:

        def kept(b, h, q_idx, kv_idx):
            return table[b, h, q_idx // block_size, kv_idx // block_size]

    else:

        def kept(b, h, q_idx, kv_idx):
            return table[b, h, q_idx // block_size, kv_idx // block_size] & key_valid[kv_idx]

    indices = torch.arange(table.shape[3], dtype=torch.int32).expand(*table.shape).contiguous()
    counts = torch.full(table.shape[:3], table.shape[3], dtype=torch.int32)
    block_mask = BlockMask.from_kv_blocks(
        counts,
        indices,
        BLOCK_SIZE=block_size,
        mask_mod=kept,
        seq_lengths=(q.shape[2], k.shape[2]),
        compute_q_blocks=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(
            q,
            k,
            v,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            **_lse_request(return_lse),
        )


def _lse_request(return_lse: bool) -> dict:
    if not return_lse:
        return {}
    return {"return_aux": AuxRequest(lse=True)} if AuxRequest is not None else {"return_lse": True}


def _split_lse(result, return_lse: bool):
    if not return_lse:
        return result, None
    out, aux = result
    return out, (aux.lse if hasattr(aux, "lse") else aux)
