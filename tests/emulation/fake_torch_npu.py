"""A CPU stand-in for Ascend's ``torch_npu`` attention ops, so attnbridge's NPU code runs in tests.

It follows the documented semantics of ``torch_npu.npu_fused_infer_attention_score`` (FIA) and
``torch_npu.npu_fusion_attention`` (Ascend/op-plugin ``docs/context/torch_npu-*.md``), computes in
float64, and rejects what the real op rejects that a caller could get wrong (layout strings, head
counts, mask shapes, TND length lists), so plumbing bugs fail on CPU rather than on an Ascend box.

Facts from those docs that the emulation relies on:

* ``atten_mask``: True / 1 means *masked out*. ``sparse_mode`` 2/3 take the 2048 x 2048 compressed
  upper-triangular mask; 3 is causal aligned to the bottom right of each sequence, 2 to the top left.
* TND layout: ``actual_seq_lengths[_kv]`` (FIA) and ``actual_seq_qlen/kvlen`` (fusion attention) are
  cumulative end offsets (``[2, 4, 6]`` for three sequences of 2). With paged KV (``block_table``)
  FIA's ``actual_seq_lengths_kv`` are per-sequence lengths instead.
* FIA: inputs float16/bfloat16; ``softmax_lse`` float32 ``[B, N, S, 1]`` (``[T, N, 1]`` for TND), or a
  ``[1]`` zero tensor when ``softmax_lse_flag`` is False; sparse_mode 2/3/4 raise without a mask.
* Fusion attention: inputs float16/bfloat16/float32; returns ``(out, softmax_max, softmax_sum,
  softmax_in, seed, offset, numels)`` with max/sum float32 ``[B, N, S, 8]`` (the value replicated 8
  times; ``[N, T, 8]`` for TND unless ``softmax_layout="TND"``); without a mask, sparse_mode and
  pre/next_tockens are ignored and the attention is full.

Not documented, chosen here: a query row that sees no key (or lies past its actual length) gives
``out = 0``, ``lse = -inf``, ``softmax_max = -inf``, ``softmax_sum = 0``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import inspect
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

INT_MAX = 2147483647
COMPRESSED_MASK_SIZE = 2048

FIA_OP = "npu_fused_infer_attention_score"
FUSION_OP = "npu_fusion_attention"
FIA_LAYOUTS = ("BSH", "BSND", "BNSD", "TND")
FUSION_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
#: Query dtypes each op documents; the fake rejects others unless made with ``strict_dtypes=False``.
DOCUMENTED_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    FIA_OP: (torch.float16, torch.bfloat16),
    FUSION_OP: (torch.float16, torch.bfloat16, torch.float32),
}
SPARSE_MODULE = "tests.emulation.fake_torch_npu_sparse"


# ----------------------------------------------------------------------------------------------
# Shared math: one sequence at a time, float64.


@dataclass
class _Segment:
    """One sequence: ``q`` ``[S_q, N_q, D]``, ``k``/``v`` ``[S_kv, N_kv, D]`` (float64) and
    ``visible`` bool ``[S_q, S_kv]`` (True: the query may attend the key)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visible: torch.Tensor


@dataclass
class _SegmentResult:
    out: torch.Tensor  # [S_q, N_q, D_v]
    lse: torch.Tensor  # [N_q, S_q]
    row_max: torch.Tensor  # [N_q, S_q], scaled scores
    row_sum: torch.Tensor  # [N_q, S_q], sum of exp(score - row_max)


def _attend_segment(seg: _Segment, scale: float) -> _SegmentResult:
    group = seg.q.shape[1] // seg.k.shape[1]
    k = seg.k.repeat_interleave(group, dim=1)
    v = seg.v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qnd,knd->nqk", seg.q, k) * scale
    scores = scores.masked_fill(~seg.visible, float("-inf"))
    row_max = scores.amax(dim=-1) if scores.shape[-1] else scores.new_full(scores.shape[:-1], -math.inf)
    finite_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - finite_max[..., None])  # masked keys give exactly 0
    row_sum = weights.sum(dim=-1)
    probs = weights / row_sum.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
    out = torch.einsum("nqk,knd->qnd", probs, v)
    lse = finite_max + torch.log(row_sum)  # log(0) = -inf for rows that see nothing
    return _SegmentResult(out, lse, row_max, row_sum)


def _band(s_q: int, s_kv: int, pre: int, nxt: int) -> torch.Tensor:
    """Top-left-origin band: query ``i`` sees key ``j`` iff ``-pre <= j - i <= next``."""
    diff = torch.arange(s_kv)[None, :] - torch.arange(s_q)[:, None]
    return (diff <= nxt) & (diff >= -pre)


def _causal(s_q: int, s_kv: int, *, bottom_right: bool) -> torch.Tensor:
    offset = s_kv - s_q if bottom_right else 0
    return torch.arange(s_kv)[None, :] <= torch.arange(s_q)[:, None] + offset


@functools.lru_cache(maxsize=1)
def _compressed_mask() -> torch.Tensor:
    size = COMPRESSED_MASK_SIZE
    return torch.triu(torch.ones(size, size, dtype=torch.bool), diagonal=1)


def _check_compressed_mask(op: str, mask: torch.Tensor | None, sparse_mode: int) -> None:
    """sparse_mode 2/3/4 take the fixed 2048 x 2048 upper-triangular mask (True = masked)."""
    size = COMPRESSED_MASK_SIZE
    if mask is None:
        raise RuntimeError(f"{op}: sparse_mode={sparse_mode} needs the {size}x{size} compressed atten_mask")
    if tuple(mask.shape) not in ((size, size), (1, size, size), (1, 1, size, size)):
        raise RuntimeError(
            f"{op}: sparse_mode={sparse_mode} needs atten_mask of shape ({size}, {size}) (or with leading 1s); "
            f"got {tuple(mask.shape)}"
        )
    # The real kernel does not read the values, it trusts them; a wrong mask here is a caller bug.
    if not torch.equal(mask.reshape(size, size).to(torch.bool).cpu(), _compressed_mask()):
        raise ValueError(
            f"{op}: sparse_mode={sparse_mode} atten_mask must be torch.triu(ones(2048, 2048), diagonal=1) "
            "(True above the diagonal = masked); the real kernel would silently compute a wrong result"
        )


def _check_mask_dtype(op: str, mask: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if mask.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise RuntimeError(f"{op}: atten_mask dtype {mask.dtype} is not supported; allowed: {names}")


def _int_list(op: str, name: str, values) -> list[int] | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    try:
        out = [int(x) for x in values]
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list of ints; got {type(values).__name__}") from None
    if any(x < 0 for x in out):
        raise RuntimeError(f"{op}: {name} has a negative value: {out}")
    return out


def _cumulative_to_lengths(op: str, name: str, offsets: list[int], total: int) -> list[int]:
    """Check a TND cumulative-offset list (trailing zeros mark batches that are skipped) and return
    the per-sequence lengths."""
    used = list(offsets)
    while len(used) > 1 and used[-1] == 0:
        used.pop()
    if any(b < a for a, b in zip(used, used[1:])):
        raise RuntimeError(
            f"{op}: {name} must be cumulative end offsets (non-decreasing, e.g. [5, 22, 31] for lengths "
            f"[5, 17, 9]) with input_layout TND; got {offsets}"
        )
    if used[-1] != total:
        raise RuntimeError(
            f"{op}: {name} ends at {used[-1]} but the TND tensor has T={total} tokens; it must hold "
            f"cumulative end offsets; got {offsets}"
        )
    lengths = [b - a for a, b in zip([0] + used[:-1], used)]
    return lengths + [0] * (len(offsets) - len(used))


def _require_unset(op: str, **values) -> None:
    for name, value in values.items():
        if value is not None:
            raise NotImplementedError(f"fake {op}: {name} is not emulated")


def _to_bsnd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """BSH / SBH / BSND / BNSD -> ``[B, S, N, D]``."""
    if layout == "SBH":
        x = x.transpose(0, 1)
    if layout in ("BSH", "SBH"):
        return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads)
    if layout == "BNSD":
        return x.transpose(1, 2)
    return x


def _from_bsnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout in ("BSH", "SBH"):
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return (x.transpose(0, 1) if layout == "SBH" else x).contiguous()
    if layout == "BNSD":
        return x.transpose(1, 2).contiguous()
    return x.contiguous()


def _check_qkv_basics(
    op: str, query, key, value, layout: str, allowed_layouts, *, paged: bool = False
) -> None:
    """Layout string, tensor ranks, dtypes; a paged KV cache has its own ranks (checked later)."""
    if layout not in allowed_layouts:
        raise RuntimeError(
            f"{op}: input_layout {layout!r} is not supported; allowed: {', '.join(allowed_layouts)}"
        )
    want_dim = 3 if layout in ("BSH", "SBH", "TND") else 4
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor")
        if t.dim() != want_dim and not (paged and name != "query"):
            raise RuntimeError(f"{op}: layout {layout} needs {want_dim}-D {name}; got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            f"{op}: query, key, value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
        )


def _check_heads(op: str, heads: int, kv_heads: int, max_group: int | None = None) -> None:
    if kv_heads <= 0 or heads % kv_heads != 0:
        raise RuntimeError(f"{op}: query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if max_group is not None and heads // kv_heads > max_group:
        raise RuntimeError(
            f"{op}: num_heads / num_key_value_heads must be <= {max_group}; got {heads // kv_heads}"
        )


# ----------------------------------------------------------------------------------------------
# npu_fused_infer_attention_score


def _fia_batch_lengths(name: str, values: list[int] | None, batch: int, limit: int) -> list[int]:
    """Non-TND ``actual_seq_lengths[_kv]``: one per batch; a single value applies to all; extra
    values past the batch are ignored (documented)."""
    if values is None:
        return [limit] * batch
    if len(values) == 1:
        values = values * batch
    elif len(values) < batch:
        raise RuntimeError(f"{FIA_OP}: {name} has {len(values)} entries; needs 1 or >= batch ({batch})")
    values = values[:batch]
    if any(n > limit for n in values):
        raise RuntimeError(f"{FIA_OP}: {name} {values} exceeds the sequence length {limit}")
    return values


def _fia_user_mask(mask: torch.Tensor, batch: int, s_q: int) -> Callable[[int], torch.Tensor]:
    """``sparse_mode`` 0/1 mask: returns ``b -> bool [S_q', S_kv']`` (True = masked). Shapes may be
    padded up (the docs allow rounding S up to 16/32), so callers slice."""
    _check_mask_dtype(FIA_OP, mask, (torch.bool, torch.int8, torch.uint8))
    m = mask.to(torch.bool)
    if s_q == 1 and m.dim() == 2 and m.shape[0] == batch:
        m = m[:, None, :]  # the incremental (Q_S == 1) shape (B, KV_S)
    if m.dim() == 2:
        return lambda b: m
    if m.dim() == 3 and m.shape[0] in (1, batch):
        return lambda b: m[b if m.shape[0] > 1 else 0]
    if m.dim() == 4 and m.shape[0] in (1, batch) and m.shape[1] == 1:
        return lambda b: m[b if m.shape[0] > 1 else 0, 0]
    raise RuntimeError(
        f"{FIA_OP}: atten_mask shape {tuple(mask.shape)} is not one of (S_q, S_kv), (B|1, S_q, S_kv), "
        f"(B|1, 1, S_q, S_kv)"
    )


def _fia_visible(
    sparse_mode: int, user_mask, s_q: int, s_kv: int, pre_tokens: int, next_tokens: int
) -> torch.Tensor:
    if s_q == 1 and sparse_mode in (2, 3, 4):
        return torch.ones(1, s_kv, dtype=torch.bool)  # sparse_mode has no effect when Q_S == 1
    if sparse_mode == 2:
        return _causal(s_q, s_kv, bottom_right=False)
    if sparse_mode == 3:
        return _causal(s_q, s_kv, bottom_right=True)
    if user_mask is None:
        return torch.ones(s_q, s_kv, dtype=torch.bool)
    if user_mask.shape[-2] < s_q or user_mask.shape[-1] < s_kv:
        raise RuntimeError(
            f"{FIA_OP}: atten_mask covers {tuple(user_mask.shape[-2:])} but the sequence needs ({s_q}, {s_kv})"
        )
    visible = ~user_mask[:s_q, :s_kv]
    if sparse_mode == 0 and s_q > 1:
        visible = visible & _band(s_q, s_kv, pre_tokens, next_tokens)
    return visible


def _paged_kv(
    key: torch.Tensor, value: torch.Tensor, block_table, block_size: int, kv_lengths: list[int], kv_heads: int
):
    """Gather each sequence's keys from a paged cache: ``(blocks, block_size, N*D)`` or
    ``(blocks, N, block_size, D)``; returns lists of ``[len, N, D]``."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise RuntimeError(f"{FIA_OP}: block_table must be a 2-D int32 tensor [B, max_blocks_per_seq]")
    if block_table.dtype != torch.int32:
        raise RuntimeError(f"{FIA_OP}: block_table dtype must be int32; got {block_table.dtype}")
    if block_size < 128 or block_size > 512 or block_size % 128:
        raise RuntimeError(f"{FIA_OP}: block_size must be a multiple of 128 in [128, 512]; got {block_size}")
    if block_table.shape[0] != len(kv_lengths):
        raise RuntimeError(
            f"{FIA_OP}: block_table has {block_table.shape[0]} rows for {len(kv_lengths)} sequences"
        )
    if key.shape != value.shape:
        raise RuntimeError(f"{FIA_OP}: paged key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    if key.dim() == 3 and key.shape[1] == block_size and key.shape[2] % kv_heads == 0:
        tokens_k = key.reshape(key.shape[0], block_size, kv_heads, -1)
        tokens_v = value.reshape(value.shape[0], block_size, kv_heads, -1)
    elif key.dim() == 4 and key.shape[1] == kv_heads and key.shape[2] == block_size:
        tokens_k, tokens_v = key.transpose(1, 2), value.transpose(1, 2)
    else:
        raise RuntimeError(
            f"{FIA_OP}: paged key shape {tuple(key.shape)} is neither (blocks, {block_size}, N*D) nor "
            f"(blocks, N, {block_size}, D) with N={kv_heads}"
        )
    ks, vs = [], []
    for b, kv_len in enumerate(kv_lengths):
        n_blocks = -(-kv_len // block_size)
        if n_blocks > block_table.shape[1]:
            raise RuntimeError(
                f"{FIA_OP}: sequence {b} needs {n_blocks} blocks; block_table has {block_table.shape[1]}"
            )
        ids = block_table[b, :n_blocks].long()
        ks.append(tokens_k[ids].reshape(-1, *tokens_k.shape[2:])[:kv_len])
        vs.append(tokens_v[ids].reshape(-1, *tokens_v.shape[2:])[:kv_len])
    return ks, vs


def npu_fused_infer_attention_score(
    query,
    key,
    value,
    *,
    pse_shift=None,
    atten_mask=None,
    actual_seq_lengths=None,
    actual_seq_lengths_kv=None,
    dequant_scale1=None,
    quant_scale1=None,
    dequant_scale2=None,
    quant_scale2=None,
    quant_offset2=None,
    antiquant_scale=None,
    antiquant_offset=None,
    block_table=None,
    query_padding_size=None,
    kv_padding_size=None,
    key_antiquant_scale=None,
    key_antiquant_offset=None,
    value_antiquant_scale=None,
    value_antiquant_offset=None,
    key_shared_prefix=None,
    value_shared_prefix=None,
    actual_shared_prefix_len=None,
    query_rope=None,
    key_rope=None,
    key_rope_antiquant_scale=None,
    num_heads=1,
    scale=1.0,
    pre_tokens=INT_MAX,
    next_tokens=INT_MAX,
    input_layout="BSH",
    num_key_value_heads=0,
    sparse_mode=0,
    inner_precise=0,
    block_size=0,
    antiquant_mode=0,
    softmax_lse_flag=False,
    key_antiquant_mode=0,
    value_antiquant_mode=0,
):
    """Emulates ``torch_npu.npu_fused_infer_attention_score`` -> ``(attention_out, softmax_lse)``."""
    op = FIA_OP
    _require_unset(
        op,
        pse_shift=pse_shift,
        dequant_scale1=dequant_scale1,
        quant_scale1=quant_scale1,
        dequant_scale2=dequant_scale2,
        quant_scale2=quant_scale2,
        quant_offset2=quant_offset2,
        antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset,
        query_padding_size=query_padding_size,
        kv_padding_size=kv_padding_size,
        key_antiquant_scale=key_antiquant_scale,
        key_antiquant_offset=key_antiquant_offset,
        value_antiquant_scale=value_antiquant_scale,
        value_antiquant_offset=value_antiquant_offset,
        key_shared_prefix=key_shared_prefix,
        value_shared_prefix=value_shared_prefix,
        actual_shared_prefix_len=actual_shared_prefix_len,
        query_rope=query_rope,
        key_rope=key_rope,
        key_rope_antiquant_scale=key_rope_antiquant_scale,
    )
    layout = input_layout
    paged = block_table is not None
    _check_qkv_basics(op, query, key, value, layout, FIA_LAYOUTS, paged=paged)
    if paged and layout in ("BSH", "BSND") and key.dim() != 3:
        raise RuntimeError(
            f"{op}: with input_layout {layout} the paged key must be (blocks, block_size, N*D)"
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {name} must be contiguous (non-contiguous tensors are not supported)")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise RuntimeError(f"{op}: num_heads must be a positive int; got {num_heads!r}")
    kv_heads = num_key_value_heads or num_heads
    _check_heads(op, num_heads, kv_heads, max_group=64)
    if sparse_mode not in (0, 1, 2, 3, 4):
        raise RuntimeError(f"{op}: sparse_mode {sparse_mode} is not supported (0, 1, 2, 3, 4 are)")
    if sparse_mode == 4:
        raise NotImplementedError(f"fake {op}: sparse_mode 4 (band) is not emulated")
    if inner_precise not in (0, 1, 2, 3):
        raise RuntimeError(f"{op}: inner_precise must be 0, 1, 2 or 3; got {inner_precise}")
    if paged and not block_size:
        raise RuntimeError(f"{op}: block_table given without block_size")

    # Head counts the layout carries must agree with num_heads / num_key_value_heads.
    if layout == "BSH":
        if query.shape[2] % num_heads:
            raise RuntimeError(
                f"{op}: query hidden size {query.shape[2]} is not divisible by num_heads={num_heads}"
            )
        head_dim = query.shape[2] // num_heads
        if not paged and key.shape[2] != kv_heads * head_dim:
            raise RuntimeError(
                f"{op}: key hidden size {key.shape[2]} != num_key_value_heads ({kv_heads}) x head_dim ({head_dim})"
            )
    else:
        head_axis = 2 if layout == "BSND" else 1
        if query.shape[head_axis] != num_heads:
            raise RuntimeError(
                f"{op}: num_heads={num_heads} but query has {query.shape[head_axis]} heads (layout {layout})"
            )
        if not paged and key.shape[head_axis] != kv_heads:
            raise RuntimeError(
                f"{op}: num_key_value_heads={num_key_value_heads} (-> {kv_heads}) but key has "
                f"{key.shape[head_axis]} heads (layout {layout})"
            )
    if not paged and key.shape != value.shape:
        raise RuntimeError(
            f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape"
        )

    q_lens_arg = _int_list(op, "actual_seq_lengths", actual_seq_lengths)
    kv_lens_arg = _int_list(op, "actual_seq_lengths_kv", actual_seq_lengths_kv)
    if paged and kv_lens_arg is None:
        raise RuntimeError(f"{op}: paged attention (block_table) needs actual_seq_lengths_kv")

    user_mask = None
    if sparse_mode in (2, 3, 4):
        _check_compressed_mask(op, atten_mask, sparse_mode)
    elif atten_mask is not None:
        if layout == "TND":
            raise RuntimeError(
                f"{op}: with input_layout TND only sparse_mode=0 without a mask or sparse_mode=3"
            )
        user_mask = _fia_user_mask(atten_mask, query.shape[0], query.shape[1 if layout != "BNSD" else 2])
    elif sparse_mode == 1:
        raise RuntimeError(f"{op}: sparse_mode=1 needs the full atten_mask")

    # Split into sequences.
    if layout == "TND":
        if q_lens_arg is None or kv_lens_arg is None:
            raise RuntimeError(f"{op}: input_layout TND needs actual_seq_lengths and actual_seq_lengths_kv")
        if len(q_lens_arg) != len(kv_lens_arg):
            raise RuntimeError(
                f"{op}: actual_seq_lengths ({len(q_lens_arg)}) and actual_seq_lengths_kv ({len(kv_lens_arg)}) "
                "must have one entry per sequence each"
            )
        q_lens = _cumulative_to_lengths(op, "actual_seq_lengths", q_lens_arg, query.shape[0])
        q_starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
        q_parts = [query[s : s + n] for s, n in zip(q_starts, q_lens)]
        if paged:
            k_parts, v_parts = _paged_kv(key, value, block_table, block_size, kv_lens_arg, kv_heads)
        else:
            kv_lens = _cumulative_to_lengths(op, "actual_seq_lengths_kv", kv_lens_arg, key.shape[0])
            kv_starts = [sum(kv_lens[:i]) for i in range(len(kv_lens))]
            k_parts = [key[s : s + n] for s, n in zip(kv_starts, kv_lens)]
            v_parts = [value[s : s + n] for s, n in zip(kv_starts, kv_lens)]
    else:
        q4 = _to_bsnd(query, layout, num_heads)
        batch, s_q = q4.shape[0], q4.shape[1]
        q_lens = _fia_batch_lengths("actual_seq_lengths", q_lens_arg, batch, s_q)
        q_parts = [q4[b, :n] for b, n in enumerate(q_lens)]
        if paged:
            kv_lens = _fia_batch_lengths("actual_seq_lengths_kv", kv_lens_arg, batch, INT_MAX)
            k_parts, v_parts = _paged_kv(key, value, block_table, block_size, kv_lens, kv_heads)
        else:
            if key.shape[0] != batch:
                raise RuntimeError(f"{op}: query batch {batch} and key batch {key.shape[0]} differ")
            k4, v4 = _to_bsnd(key, layout, kv_heads), _to_bsnd(value, layout, kv_heads)
            kv_lens = _fia_batch_lengths("actual_seq_lengths_kv", kv_lens_arg, batch, k4.shape[1])
            k_parts = [k4[b, :n] for b, n in enumerate(kv_lens)]
            v_parts = [v4[b, :n] for b, n in enumerate(kv_lens)]
    if q_parts and q_parts[0].shape[-1] != k_parts[0].shape[-1]:
        raise RuntimeError(
            f"{op}: query head_dim {q_parts[0].shape[-1]} and key head_dim {k_parts[0].shape[-1]} differ"
        )

    segments = []
    for b, (qp, kp, vp) in enumerate(zip(q_parts, k_parts, v_parts)):
        mask_b = user_mask(b) if user_mask is not None else None
        visible = _fia_visible(sparse_mode, mask_b, qp.shape[0], kp.shape[0], pre_tokens, next_tokens)
        segments.append(_Segment(qp.double(), kp.double(), vp.double(), visible))
    results = [_attend_segment(seg, float(scale)) for seg in segments]

    d_v = v_parts[0].shape[-1] if v_parts else value.shape[-1]
    if layout == "TND":
        out = torch.cat([r.out for r in results]) if results else query.new_zeros(0, num_heads, d_v)
        out = _pad_rows(out, query.shape[0])
        lse = _pad_rows(torch.cat([r.lse.T for r in results]), query.shape[0], fill=-math.inf)[..., None]
    else:
        out = torch.zeros(batch, s_q, num_heads, d_v, dtype=torch.float64)
        lse = torch.full((batch, num_heads, s_q), -math.inf, dtype=torch.float64)
        for b, (n, r) in enumerate(zip(q_lens, results)):
            out[b, :n] = r.out
            lse[b, :, :n] = r.lse
        out = _from_bsnd(out, layout)
        lse = lse[..., None]
    out = out.to(dtype=query.dtype, device=query.device)
    if not softmax_lse_flag:
        return out, torch.zeros(1, dtype=torch.float32, device=query.device)
    return out, lse.to(dtype=torch.float32, device=query.device)


def _pad_rows(x: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """TND: tokens past the last offset (trailing skipped batches) stay ``fill``."""
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), fill)
    return torch.cat([x, pad])


# ----------------------------------------------------------------------------------------------
# npu_fusion_attention


def _fusion_user_mask(mask: torch.Tensor, batch: int, heads: int, s_q: int, s_kv: int, varlen: bool):
    """``sparse_mode`` 0/1 mask: ``(b, head) -> bool [S_q, S_kv]`` (True = masked)."""
    _check_mask_dtype(FUSION_OP, mask, (torch.bool, torch.uint8))
    m = mask.to(torch.bool)
    if m.dim() == 2 and tuple(m.shape) == (s_q, s_kv):
        return lambda b, n: m
    if not varlen and m.dim() == 4 and tuple(m.shape[2:]) == (s_q, s_kv):
        if m.shape[0] in (1, batch) and m.shape[1] in (1, heads):
            return lambda b, n: m[b if m.shape[0] > 1 else 0, n if m.shape[1] > 1 else 0]
    allowed = "(maxS_q, maxS_kv) for TND" if varlen else "(S_q, S_kv), (B|1, N|1, S_q, S_kv)"
    raise RuntimeError(
        f"{FUSION_OP}: atten_mask shape {tuple(mask.shape)} does not fit; allowed: {allowed} "
        f"with S_q={s_q}, S_kv={s_kv}"
    )


def _fusion_visible(sparse_mode: int, user_mask, s_q: int, s_kv: int, pre: int, nxt: int) -> torch.Tensor:
    if sparse_mode == 2:
        return _causal(s_q, s_kv, bottom_right=False)
    if sparse_mode == 3:
        return _causal(s_q, s_kv, bottom_right=True)
    visible = ~user_mask[:s_q, :s_kv]
    if sparse_mode == 0:
        visible = visible & _band(s_q, s_kv, pre, nxt)
    return visible


def npu_fusion_attention(
    query,
    key,
    value,
    head_num,
    input_layout,
    pse=None,
    padding_mask=None,
    atten_mask=None,
    scale=1.0,
    keep_prob=1.0,
    pre_tockens=INT_MAX,
    next_tockens=INT_MAX,
    inner_precise=0,
    prefix=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    sparse_mode=0,
    gen_mask_parallel=True,
    sync=False,
    softmax_layout="",
):
    """Emulates ``torch_npu.npu_fusion_attention`` -> ``(attention_out, softmax_max, softmax_sum,
    softmax_in, seed, offset, numels)``."""
    op = FUSION_OP
    _require_unset(op, pse=pse, padding_mask=padding_mask, prefix=prefix)
    layout = input_layout
    _check_qkv_basics(op, query, key, value, layout, FUSION_LAYOUTS)
    if not 0.0 < float(keep_prob) <= 1.0:
        raise RuntimeError(f"{op}: keep_prob must be in (0, 1]; got {keep_prob}")
    if keep_prob != 1.0:
        raise NotImplementedError(f"fake {op}: dropout (keep_prob < 1) is not emulated")
    if not isinstance(head_num, int) or head_num < 1:
        raise RuntimeError(f"{op}: head_num must be a positive int; got {head_num!r}")
    if sparse_mode not in range(9):
        raise RuntimeError(f"{op}: sparse_mode {sparse_mode} is not supported (0..8 are)")
    if sparse_mode >= 4 and atten_mask is not None:
        raise NotImplementedError(f"fake {op}: sparse_mode {sparse_mode} is not emulated")
    if softmax_layout not in ("", "TND") or (softmax_layout == "TND" and layout != "TND"):
        raise RuntimeError(f"{op}: softmax_layout {softmax_layout!r} is only valid as 'TND' with TND input")
    if key.shape[:-1] != value.shape[:-1]:
        raise RuntimeError(
            f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must agree but for D"
        )

    if layout in ("BSH", "SBH"):
        if query.shape[2] % head_num:
            raise RuntimeError(
                f"{op}: query hidden size {query.shape[2]} is not divisible by head_num={head_num}"
            )
        head_dim = query.shape[2] // head_num
        if key.shape[2] % head_dim:
            raise RuntimeError(
                f"{op}: key hidden size {key.shape[2]} is not a multiple of head_dim {head_dim}"
            )
        kv_heads = key.shape[2] // head_dim
        d_v_total = value.shape[2]
        if d_v_total % kv_heads:
            raise RuntimeError(f"{op}: value hidden size {d_v_total} does not split over {kv_heads} heads")
    else:
        head_axis = 2 if layout == "BSND" else 1
        if query.shape[head_axis] != head_num:
            raise RuntimeError(
                f"{op}: head_num={head_num} but query has {query.shape[head_axis]} heads ({layout})"
            )
        kv_heads = key.shape[head_axis]
    _check_heads(op, head_num, kv_heads)

    varlen = layout == "TND"
    q_lens_arg = _int_list(op, "actual_seq_qlen", actual_seq_qlen)
    kv_lens_arg = _int_list(op, "actual_seq_kvlen", actual_seq_kvlen)
    if varlen:
        if q_lens_arg is None or kv_lens_arg is None:
            raise RuntimeError(f"{op}: input_layout TND needs actual_seq_qlen and actual_seq_kvlen")
        if len(q_lens_arg) != len(kv_lens_arg):
            raise RuntimeError(f"{op}: actual_seq_qlen and actual_seq_kvlen must have the same length")
        q_lens = _cumulative_to_lengths(op, "actual_seq_qlen", q_lens_arg, query.shape[0])
        kv_lens = _cumulative_to_lengths(op, "actual_seq_kvlen", kv_lens_arg, key.shape[0])
        q_starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
        kv_starts = [sum(kv_lens[:i]) for i in range(len(kv_lens))]
        q_parts = [query[s : s + n] for s, n in zip(q_starts, q_lens)]
        k_parts = [key[s : s + n] for s, n in zip(kv_starts, kv_lens)]
        v_parts = [value[s : s + n] for s, n in zip(kv_starts, kv_lens)]
        batch, mask_s_q, mask_s_kv = len(q_lens), max(q_lens), max(kv_lens)
    else:
        if q_lens_arg is not None or kv_lens_arg is not None:
            raise RuntimeError(f"{op}: actual_seq_qlen/actual_seq_kvlen are only used with input_layout TND")
        q4, k4, v4 = (
            _to_bsnd(t, layout, n) for t, n in ((query, head_num), (key, kv_heads), (value, kv_heads))
        )
        if q4.shape[0] != k4.shape[0]:
            raise RuntimeError(f"{op}: query batch {q4.shape[0]} and key batch {k4.shape[0]} differ")
        batch, mask_s_q, mask_s_kv = q4.shape[0], q4.shape[1], k4.shape[1]
        q_parts, k_parts, v_parts = list(q4), list(k4), list(v4)
    if q_parts[0].shape[-1] != k_parts[0].shape[-1] or k_parts[0].shape[-1] < v_parts[0].shape[-1]:
        raise RuntimeError(f"{op}: head dims must satisfy D_q == D_k >= D_v")

    user_mask = None
    if atten_mask is not None:
        if sparse_mode in (2, 3):
            _check_compressed_mask(op, atten_mask, sparse_mode)
        else:
            user_mask = _fusion_user_mask(atten_mask, batch, head_num, mask_s_q, mask_s_kv, varlen)

    results = []
    for b, (qp, kp, vp) in enumerate(zip(q_parts, k_parts, v_parts)):
        s_q, s_kv = qp.shape[0], kp.shape[0]
        if atten_mask is None:  # documented: without a mask, sparse_mode and pre/next are ignored
            visible = torch.ones(s_q, s_kv, dtype=torch.bool)
        elif user_mask is not None and (atten_mask.dim() == 4 and atten_mask.shape[1] > 1):
            visible = torch.stack(
                [
                    _fusion_visible(sparse_mode, user_mask(b, n), s_q, s_kv, pre_tockens, next_tockens)
                    for n in range(head_num)
                ]
            )
        else:
            mask_b = user_mask(b, 0) if user_mask is not None else None
            visible = _fusion_visible(sparse_mode, mask_b, s_q, s_kv, pre_tockens, next_tockens)
        results.append(
            _attend_segment(_Segment(qp.double(), kp.double(), vp.double(), visible), float(scale))
        )

    if varlen:
        out = _pad_rows(torch.cat([r.out for r in results]), query.shape[0])
        row_max = _pad_rows(torch.cat([r.row_max.T for r in results]), query.shape[0], fill=-math.inf)
        row_sum = _pad_rows(torch.cat([r.row_sum.T for r in results]), query.shape[0])
        if softmax_layout != "TND":  # documented default for TND: NTD
            row_max, row_sum = row_max.T, row_sum.T
    else:
        out = _from_bsnd(torch.stack([r.out for r in results]), layout)
        row_max = torch.stack([r.row_max for r in results])  # [B, N, S]
        row_sum = torch.stack([r.row_sum for r in results])
    softmax_max = row_max[..., None].expand(*row_max.shape, 8).to(torch.float32).contiguous()
    softmax_sum = row_sum[..., None].expand(*row_sum.shape, 8).to(torch.float32).contiguous()
    softmax_in = torch.empty(0, dtype=query.dtype, device=query.device)
    out = out.to(dtype=query.dtype, device=query.device)
    return out, softmax_max.to(query.device), softmax_sum.to(query.device), softmax_in, 0, 0, 0


# ----------------------------------------------------------------------------------------------
# The fake module


def _recording(name: str, fn: Callable, calls: list, dtypes: tuple[torch.dtype, ...] | None) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls.append((name, args, kwargs))
        query = args[0] if args else kwargs.get("query")
        if dtypes is not None and isinstance(query, torch.Tensor) and query.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise RuntimeError(f"{name}: query dtype {query.dtype} is not supported; allowed: {allowed}")
        return fn(*args, **kwargs)

    return wrapper


def _sparse_ops() -> dict[str, Callable]:
    """Public ``npu_*`` functions of the optional sparse-ops emulation module, if it exists."""
    try:
        module = importlib.import_module(SPARSE_MODULE)
    except ModuleNotFoundError as error:
        if error.name != SPARSE_MODULE:
            raise
        return {}
    return {
        name: fn
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if name.startswith("npu_") and fn.__module__ == module.__name__
    }


def make_fake_torch_npu(*, strict_dtypes: bool = True, soc_version: int = 220) -> types.ModuleType:
    """A module named ``torch_npu`` with the emulated ops; every call is appended to ``module.calls``
    as ``(op_name, args, kwargs)`` so tests can assert the argument plumbing.

    ``strict_dtypes=False`` lets FIA take float32 (the real op rejects it) for precision tests of
    the emulation itself. ``module.npu.get_soc_version()`` returns ``soc_version`` (220: Atlas A2).
    """
    module = types.ModuleType("torch_npu", "Fake torch_npu (CPU emulation for attnbridge tests)")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    module.__version__ = "0.0.0+fake"
    calls: list[tuple[str, tuple, dict]] = []
    module.calls = calls
    ops: dict[str, Callable] = {
        FIA_OP: npu_fused_infer_attention_score,
        FUSION_OP: npu_fusion_attention,
        **_sparse_ops(),
    }
    for name, fn in ops.items():
        dtypes = DOCUMENTED_DTYPES.get(name) if strict_dtypes else None
        setattr(module, name, _recording(name, fn, calls, dtypes))
    module.npu = types.SimpleNamespace(get_soc_version=lambda: soc_version, is_available=lambda: False)
    return module
