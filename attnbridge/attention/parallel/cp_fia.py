"""Causal prefill attention of a rank's zigzag queries over the gathered keys of their sequences: the
prev and next query halves attend bottom-right causally to the first ``kv_len_prev[s]`` resp.
``kv_len_next[s]`` keys of sequence ``s``. Ascend: one FIA call per half in TND layout where its
documented limits allow, else BSND FIA per sequence (``docs/ascend.md``); elsewhere ``attend`` per
sequence."""

from __future__ import annotations

import functools
from itertools import accumulate

import torch

from attnbridge.attention.api import attend, platform_for
from attnbridge.attention.backends.fa import check_fia_limits, fia, npu_fia
from attnbridge.attention.contract import default_scale
from attnbridge.attention.masks import npu_compressed_causal_mask
from attnbridge.attention.parallel.zigzag import ZigzagMetadata
from attnbridge.notices import warn_once


def zigzag_cp_attention(
    q_local: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: ZigzagMetadata,
    *,
    scale: float | None = None,
    platform: str | None = None,
    backend: str = "fa",
) -> torch.Tensor:
    """``[local_tokens, H_q, D]`` for this rank's zigzag-ordered TND queries over ``k``, ``v``: TND
    ``[sum(prefix_lens + seq_lens), H_kv, D]`` in natural order, prefixes first (:func:`gather_kv`).
    ``backend`` serves non-Ascend platforms."""
    _check(q_local, k, v, meta)
    platform = platform_for(q_local.device, platform)
    split = meta.total_q_prev_tokens
    halves = (
        (q_local[:split], meta.actual_seq_q_prev, meta.kv_len_prev, "kv_prev"),
        (q_local[split:], meta.actual_seq_q_next, meta.kv_len_next, "kv_next"),
    )
    if platform == "npu":  # where TND cannot: one BSND causal FIA call per sequence
        scale_value = default_scale(q_local.shape[-1], scale)
        per_sequence = functools.partial(npu_fia, causal=True, scale=scale_value, return_lse=False)
    else:
        per_sequence = functools.partial(attend, backend=backend, causal=True, scale=scale, platform=platform)
    outs = []
    for q_half, q_lens, kv_lens, kv_key in halves:
        refusal = fia_tnd_refusal(q_half, k) if platform == "npu" else "not on Ascend"
        if platform == "npu" and refusal is not None:
            warn_once(
                f"context-parallel prefill on Ascend: FIA's TND layout does not take {refusal}; "
                "each sequence runs BSND causal FIA"
            )
        if refusal is None:
            check_fia_limits("fa", q_half[None], k[None], layout="TND")  # TND [T, H, D] as a batch of one
            # TND takes cumulative kv lengths (per-sequence ones need paged K/V): keep just the keys seen.
            kv_rows = meta.index_tensor(kv_key, k.device)
            k_half, v_half = k.index_select(0, kv_rows), v.index_select(0, kv_rows)
            outs.append(_npu_fia_half(q_half, k_half, v_half, q_lens, kv_lens, scale))
        else:
            outs.append(_per_sequence(q_half, k, v, q_lens, kv_lens, meta, per_sequence))
    return torch.cat(outs)


#: FIA's documented TND limits (torch_npu ``_op_plugin_docs.py``); TND also takes bfloat16 only.
FIA_TND_HEAD_SIZES = (128, 192)
FIA_TND_MAX_TOKENS = 65536


def fia_tnd_refusal(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """What of this call FIA's TND layout does not document, or None."""
    if q.dtype != torch.bfloat16:
        return f"dtype {str(q.dtype).removeprefix('torch.')} (TND takes bfloat16 only)"
    if q.shape[-1] not in FIA_TND_HEAD_SIZES:
        return f"head size {q.shape[-1]} (TND takes {' or '.join(map(str, FIA_TND_HEAD_SIZES))})"
    if max(q.shape[0], k.shape[0]) > FIA_TND_MAX_TOKENS:
        return f"{max(q.shape[0], k.shape[0])} tokens (TND takes at most {FIA_TND_MAX_TOKENS})"
    return None


def _check(q_local, k, v, meta: ZigzagMetadata) -> None:
    if q_local.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            "CP attention expects TND tensors: q [tokens, H_q, D], k and v [tokens, H_kv, D]; got "
            f"{tuple(q_local.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q_local.shape[0] != meta.local_tokens:
        raise ValueError(
            f"rank {meta.cp_rank} holds {meta.local_tokens} query tokens; q has {q_local.shape[0]}"
        )
    kv_tokens = sum(meta.prefix_lens) + sum(meta.seq_lens)
    if k.shape[0] != kv_tokens:
        raise ValueError(f"k/v must hold all {kv_tokens} tokens (prefixes included); got {k.shape[0]}")
    if q_local.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q_local.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


def _npu_fia_half(q, k, v, q_lens, kv_lens, scale):
    # Python int lists: the op takes host-side lengths.
    lengths = {
        "actual_seq_lengths": list(accumulate(q_lens)),
        "actual_seq_lengths_kv": list(accumulate(kv_lens)),
    }
    causal = {"atten_mask": npu_compressed_causal_mask(q.device), "sparse_mode": 3, "next_tokens": 0}
    return fia(q, k, v, "TND", default_scale(q.shape[-1], scale), **causal, **lengths)[0]


def _per_sequence(q, k, v, q_lens, kv_lens, meta: ZigzagMetadata, attention):
    """``attention`` (on ``[1, S, H, D]``) of each sequence's queries over the keys they see."""
    outs, q_start = [], 0
    for kv_start, q_len, kv_len in zip(meta.kv_starts, q_lens, kv_lens):
        q_seq = q[q_start : q_start + q_len].unsqueeze(0)
        k_seq, v_seq = (x[kv_start : kv_start + kv_len].unsqueeze(0) for x in (k, v))
        outs.append(attention(q_seq, k_seq, v_seq).squeeze(0))
        q_start += q_len
    return torch.cat(outs)
