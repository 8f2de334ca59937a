"""Block-sparse attention through FlexAttention in float32, exact on every device: the CPU kernel and
the reference the Triton kernel is held to. Unfused FlexAttention evaluates only the ``mask_mod``,
so the ``mask_mod`` looks every block pair up in a table of the kept blocks (and checks pad and
padded keys). Query chunks bound the memory of the scores it materializes."""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # torch >= 2.9 asks for the LSE this way; ``return_lse`` is deprecated there
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

from attnbridge.attention.contract import default_scale
from attnbridge.attention.sparse.impl import Kernel, list_kernel
from attnbridge.attention.sparse.selection import check_block_lists, indices_to_mask

#: Bytes of float32 scores one CPU chunk may hold (same budget as the dense CPU reference).
_CPU_CHUNK_BYTES = 256 * 1024 * 1024


def block_sparse_attention(
    q,
    k,
    v,
    kv_indices,
    kv_counts,
    *,
    block_size: int,
    scale=None,
    key_valid=None,
    key_lengths=None,
    return_lse=False,
):
    """The contract of :func:`attnbridge.attention.sparse.triton_kernel.block_sparse_attention` (BSHD
    tensors; ``kv_indices`` ``[B or 1, H_q or 1, n_q_blocks, width]``, the first ``kv_counts`` entries of a
    row its key blocks; ``key_valid`` bool ``[S_kv]``, ``key_lengths`` int ``[B]``), computed exactly:
    ``out`` in q's dtype, with ``return_lse`` the float32 LSE ``[B, H_q, S_q]``."""
    check_block_lists(q, k, kv_indices, kv_counts, block_size, key_valid)
    scale = default_scale(q.shape[-1], scale)
    n_kv_blocks = math.ceil(k.shape[1] / block_size)
    valid = _valid_keys(k, key_valid, key_lengths)
    return _chunked_forward(q, k, v, kv_indices, kv_counts, n_kv_blocks, block_size, scale, valid, return_lse)


def _valid_keys(k, key_valid, key_lengths) -> torch.Tensor | None:
    """Bool ``[B, S_kv]``: the keys that may get weight, or None when all may."""
    valid = None if key_valid is None else key_valid[None, :].expand(k.shape[0], -1)
    if key_lengths is not None:
        lengths = torch.arange(k.shape[1], device=k.device)[None, :] < key_lengths[:, None]
        valid = lengths if valid is None else valid & lengths
    return valid


def _exact_mask_mod(table: torch.Tensor, valid: torch.Tensor | None, block_size: int):
    """``mask_mod`` that keeps exactly the listed blocks of ``table`` ``[B, H, nq, nk]`` (and valid keys)."""

    def kept(b, h, q_idx, kv_idx):
        keep = table[b, h, q_idx // block_size, kv_idx // block_size]
        return keep if valid is None else keep & valid[b, kv_idx]

    return kept


def _flex(q, k, v, block_mask, scale, return_lse):
    """FlexAttention on BHSD tensors (unfused; traced into the caller's graph under ``torch.compile``)."""
    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": q.shape[1] != k.shape[1]}
    if return_lse:
        kwargs.update(
            {"return_aux": AuxRequest(lse=True)} if AuxRequest is not None else {"return_lse": True}
        )
    if torch.compiler.is_compiling():
        result = flex_attention(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            result = flex_attention(q, k, v, **kwargs)
    if not return_lse:
        return result, None
    out, aux = result
    return out, (aux.lse if hasattr(aux, "lse") else aux).float()


def _chunked_forward(q, k, v, kv_indices, kv_counts, n_kv_blocks, block_size, scale, valid, return_lse):
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
        # The unfused path applies only the mask_mod: one block row per chunk row, every key listed.
        everything = torch.arange(rows.shape[3], dtype=torch.int32, device=q.device).expand(*rows.shape)
        block_mask = BlockMask.from_kv_blocks(
            torch.full(rows.shape[:3], rows.shape[3], dtype=torch.int32, device=q.device),
            everything.contiguous(),
            BLOCK_SIZE=block_size,
            mask_mod=_exact_mask_mod(rows, valid, block_size),
            seq_lengths=(q_chunk.shape[2], s_kv),
            compute_q_blocks=False,
        )
        out, lse = _flex(q_chunk, kf, vf, block_mask, scale, return_lse)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


FLEX = Kernel(
    "FlexAttention with an exact block mask (float32)", list_kernel(block_sparse_attention), query_tail=True
)
