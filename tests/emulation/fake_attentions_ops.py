"""A CPU stand-in for the sgl-kernel-npu ``torch.ops.attentions`` kernels attnbridge calls.

Every public function is one op, named like it (the ``fake_npu`` fixture installs them on
``torch.ops.attentions``). Each follows the op's documented schema and semantics, computes in
float64, and rejects the inputs the real kernel rejects that a caller could get wrong.

Sources (sgl-kernel-npu): op schemas in ``csrc/attentions/csrc/plugin/register_ops.cpp``; Python
wrappers and fake (meta) kernels in ``python/attentions/attentions/layers/_custom_ops.py``; the
kernel README (mask layout of the block-sparse kernels); the ``la`` plugin (``la.cpp``: returns
``(softmax_log_max_sum [B,N,S] float32, out float32 [B,N,S,D])``).

* ``la``: fp16 BNSD, S a multiple of 256, head_dim 128 (what its callers guarantee). Its
  ``pre_tokens`` / ``next_tokens`` semantics are ASSUMED, inferred from how sglang's and
  sgl-kernel-npu's callers use them, NOT confirmed from the kernel source (which we have not seen):
  ``pre_tokens`` < S means "the last ``pre_tokens`` keys are zero padding and get no weight"
  (callers pass ``roundup(S_kv, 256) - S_kv``, else 2**31 - 1), and ``next_tokens=1`` (the only
  value sglang passes, and the schema default) means "no mask" for this non-causal kernel. Both
  assumptions are the ones attnbridge's Laser code makes too, so this fake cannot show them wrong;
  it only refuses every other value, and a ``pre_tokens`` whose "padding" keys are not zero, so that
  a change in what attnbridge passes is caught rather than silently given some meaning.
* ``block_sparse_attention`` (older builds) and ``ada_block_sparse_attention`` (newer, same schema):
  int8 mask ``[B, Nq, ceil(Sq/ss), align32(ceil(Skv/ss))]`` with 0/1 entries and zero padding,
  int32 counts ``[B, Nq, ceil(Sq/ss)]`` equal to the row sums; a token pair is visible when its
  block is kept, ``j`` lies in the band ``[i - pre_tokens, i + next_tokens]`` (as in Ascend's other
  attention kernels; the schema defaults ``next_tokens=0`` and ``causal=True``, so a non-causal
  caller passes 214748647 for both, as sglang does) and, with ``causal``, ``j <= i``.
* ``rainfusionattention``: TND ``[T, N, D]`` with per-sequence ``actual_seq_qlen``/``kvlen``; one
  ``select_idx`` ``[q_blocks, N, kv_blocks]`` int64 (ascending kept blocks, then -1) and
  ``select_num_idx`` ``[q_blocks, N]`` int64 for every sequence of the call.

Not documented, chosen here: rows that see no key give 0; the LSE outputs are float32 natural log.
"""

from __future__ import annotations

import math

import torch

HALF = (torch.float16, torch.bfloat16)
#: The only ``la`` window values the emulation models (see the module docstring).
LA_NEXT_TOKENS = 1
LA_NO_PAD = 2**31 - 1


def _expand_blocks(mask: torch.Tensor, block_q: int, block_kv: int, s_q: int, s_kv: int) -> torch.Tensor:
    """Block mask ``[..., nq, nk]`` -> token mask ``[..., s_q, s_kv]``."""
    return mask.repeat_interleave(block_q, dim=-2)[..., :s_q, :].repeat_interleave(block_kv, dim=-1)[
        ..., :s_kv
    ]


def _attention_bnsd(q, k, v, visible, scale):
    """float64 attention on BNSD with bool ``visible`` [B|1, N|1, S_q, S_kv]; (out, lse)."""
    group = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bnqd,bnkd->bnqk", q64, k64) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bnqk,bnkd->bnqd", probs, v64), lse


def _require(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise RuntimeError(f"attentions.{op}: {message}")


def la(
    query,
    key,
    value,
    atten_mask=None,
    alibi_mask=None,
    drop_mask=None,
    scale_value=1.0,
    head_num=2,
    input_layout="BNSD",
    keep_prob=1.0,
    pre_tokens=2147483647,
    next_tokens=1,
    is_highPrecision=True,
):
    """Laser Attention: ``(softmax_log_max_sum [B,N,S] float32, out [B,N,S,D] float32)``."""
    op = "la"
    _require(query.dim() == 4, op, f"the first input dimension of la must be 4 but got {query.dim()}")
    _require(input_layout == "BNSD", op, f"only BNSD is supported, got {input_layout!r}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        _require(x.dtype == torch.float16, op, f"{name} must be float16, got {x.dtype}")
    batch, heads, s_q, dim = query.shape
    _require(head_num == heads, op, f"head_num {head_num} != query heads {heads}")
    _require(
        key.shape == value.shape and key.shape[:2] == (batch, heads), op, "key/value must be [B, N, S, D]"
    )
    _require(key.shape[3] == dim == 128, op, f"head_dim must be padded to 128, got {dim}")
    _require(s_q % 256 == 0 and key.shape[2] % 256 == 0, op, "sequence lengths must be multiples of 256")
    _require(atten_mask is None and alibi_mask is None and drop_mask is None, op, "masks are not emulated")
    _require(keep_prob == 1.0, op, "dropout is not emulated")
    _require(
        next_tokens == LA_NEXT_TOKENS,
        op,
        f"next_tokens={next_tokens!r} is not emulated: only {LA_NEXT_TOKENS} (what sglang passes) is",
    )
    s_kv = key.shape[2]
    _require(
        pre_tokens == LA_NO_PAD or 0 < pre_tokens < 256,
        op,
        f"pre_tokens={pre_tokens!r} is not emulated: only the zero-padded key count (1-255) or "
        f"{LA_NO_PAD} (no padding), as sglang passes it",
    )
    valid = s_kv - pre_tokens if pre_tokens < s_kv else s_kv
    _require(
        not bool(key[:, :, valid:].any() or value[:, :, valid:].any()),
        op,
        f"pre_tokens={pre_tokens} but the last {s_kv - valid} key/value rows are not zero padding",
    )
    visible = (torch.arange(s_kv) < valid).expand(1, 1, s_q, s_kv)
    out, lse = _attention_bnsd(query, key, value, visible, float(scale_value))
    return lse.float(), out.float()


def _block_sparse(
    op,
    query,
    key,
    value,
    sparse_mask,
    sparse_count_table,
    input_layout,
    sparse_size,
    num_heads,
    num_key_value_heads,
    scale_value,
    causal,
    inner_precise,
    pre_tokens,
    next_tokens,
    actual_seq_lengths,
    actual_seq_lengths_kv,
):
    _require(input_layout in ("BNSD", "BSND"), op, f"input_layout {input_layout!r} is not emulated")
    _require(query.dtype in HALF, op, f"query must be float16 or bfloat16, got {query.dtype}")
    _require(key.dtype == query.dtype == value.dtype, op, "query, key, value dtypes differ")
    q, k, v = (x if input_layout == "BNSD" else x.transpose(1, 2) for x in (query, key, value))
    batch, heads, s_q, _ = q.shape
    kv_heads, s_kv = k.shape[1], k.shape[2]
    _require(num_heads == heads, op, f"num_heads {num_heads} != query heads {heads}")
    _require(num_key_value_heads == kv_heads, op, f"num_key_value_heads {num_key_value_heads} != {kv_heads}")
    _require(heads % kv_heads == 0, op, "query heads must be a multiple of key/value heads")
    _require(sparse_size % 128 == 0 and 128 <= sparse_size <= 512, op, f"bad sparse_size {sparse_size}")
    nq, nk = math.ceil(s_q / sparse_size), math.ceil(s_kv / sparse_size)
    width = math.ceil(nk / 32) * 32
    _require(sparse_mask.dtype == torch.int8, op, f"sparse_mask must be int8, got {sparse_mask.dtype}")
    _require(
        tuple(sparse_mask.shape) == (batch, heads, nq, width),
        op,
        f"sparse_mask must be {(batch, heads, nq, width)}, got {tuple(sparse_mask.shape)}",
    )
    _require(bool(((sparse_mask == 0) | (sparse_mask == 1)).all()), op, "sparse_mask entries must be 0/1")
    _require(not bool(sparse_mask[..., nk:].any()), op, "sparse_mask padding columns must be 0")
    _require(sparse_count_table.dtype == torch.int32, op, "sparse_count_table must be int32")
    _require(
        torch.equal(sparse_count_table, sparse_mask.sum(-1, dtype=torch.int32)),
        op,
        "sparse_count_table must hold each row's number of kept blocks",
    )
    visible = _expand_blocks(sparse_mask[..., :nk].bool(), sparse_size, sparse_size, s_q, s_kv)
    rows = torch.arange(s_q)[:, None]
    cols = torch.arange(s_kv)[None, :]
    window = (cols >= rows - pre_tokens) & (cols <= rows + next_tokens)
    if causal:
        window &= cols <= rows
    visible = visible & window
    if actual_seq_lengths_kv is not None:
        lengths = torch.tensor(list(actual_seq_lengths_kv))
        visible = visible & (cols[None] < lengths[:, None, None])[:, None]
    out, _ = _attention_bnsd(q, k, v, visible, float(scale_value))
    if actual_seq_lengths is not None:
        lengths = torch.tensor(list(actual_seq_lengths))
        out = out * (torch.arange(s_q)[None, :] < lengths[:, None])[:, None, :, None]
    out = out.to(query.dtype)
    return out if input_layout == "BNSD" else out.transpose(1, 2).contiguous()


def block_sparse_attention(
    query,
    key,
    value,
    sparse_mask,
    sparse_count_table,
    input_layout="BNSD",
    sparse_size=128,
    num_heads=1,
    num_key_value_heads=1,
    scale_value=1.0,
    causal=True,
    inner_precise=1,
    pre_tokens=214748647,
    next_tokens=0,
    actual_seq_lengths=None,
    actual_seq_lengths_kv=None,
):
    """Block-sparse attention over the kept blocks of ``sparse_mask`` (older op name)."""
    return _block_sparse(
        "block_sparse_attention",
        query,
        key,
        value,
        sparse_mask,
        sparse_count_table,
        input_layout,
        sparse_size,
        num_heads,
        num_key_value_heads,
        scale_value,
        causal,
        inner_precise,
        pre_tokens,
        next_tokens,
        actual_seq_lengths,
        actual_seq_lengths_kv,
    )


def ada_block_sparse_attention(
    query,
    key,
    value,
    sparse_mask,
    sparse_count_table,
    input_layout="BNSD",
    sparse_size=128,
    num_heads=1,
    num_key_value_heads=1,
    scale_value=1.0,
    causal=True,
    inner_precise=1,
    pre_tokens=214748647,
    next_tokens=0,
    actual_seq_lengths=None,
    actual_seq_lengths_kv=None,
):
    """Block-sparse attention over the kept blocks of ``sparse_mask`` (newer op name, same schema)."""
    _require(
        not (query.dtype == torch.float16 and inner_precise in (0, 2)),
        "ada_block_sparse_attention",
        "the FP16 high-precision specialization (inner_precise 0 or 2) is absent",
    )
    return _block_sparse(
        "ada_block_sparse_attention",
        query,
        key,
        value,
        sparse_mask,
        sparse_count_table,
        input_layout,
        sparse_size,
        num_heads,
        num_key_value_heads,
        scale_value,
        causal,
        inner_precise,
        pre_tokens,
        next_tokens,
        actual_seq_lengths,
        actual_seq_lengths_kv,
    )


def rainfusionattention(
    query,
    key,
    value,
    select_idx,
    select_num_idx,
    blockshape,
    attn_mask=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    block_table=None,
    q_input_layout="TND",
    kv_input_layout="TND",
    head_num=1,
    mask_type=0,
    scale=1.0,
    inner_precise=1,
    block_size=0,
):
    """RainFusion attention over listed KV blocks: ``(out [T,N,D], lse float32 [T,N,1])``."""
    op = "rainfusionattention"
    _require(q_input_layout == kv_input_layout == "TND", op, "only TND is emulated")
    _require(query.dtype in HALF and key.dtype == value.dtype == query.dtype, op, "float16/bfloat16 inputs")
    _require(query.dim() == 3 and key.dim() == 3, op, "TND inputs are [T, N, D]")
    _require(head_num == query.shape[1], op, f"head_num {head_num} != query heads {query.shape[1]}")
    _require(attn_mask is None and block_table is None and mask_type == 0, op, "masks/paging not emulated")
    _require(actual_seq_qlen is not None and actual_seq_kvlen is not None, op, "TND needs actual lengths")
    _require(
        sum(actual_seq_qlen) == query.shape[0], op, "actual_seq_qlen must sum to T (per-sequence lengths)"
    )
    _require(sum(actual_seq_kvlen) == key.shape[0], op, "actual_seq_kvlen must sum to T_kv")
    block_q, block_kv = blockshape
    _require(select_idx.dtype == torch.int64 and select_num_idx.dtype == torch.int64, op, "int64 indices")
    heads = query.shape[1]
    outs, lses = [], []
    q_start = kv_start = 0
    for s_q, s_kv in zip(actual_seq_qlen, actual_seq_kvlen):
        nq, nk = math.ceil(s_q / block_q), math.ceil(s_kv / block_kv)
        _require(tuple(select_num_idx.shape) == (nq, heads), op, f"select_num_idx must be {(nq, heads)}")
        _require(select_idx.shape[:2] == (nq, heads) and select_idx.shape[2] >= 1, op, "bad select_idx shape")
        listed = torch.arange(select_idx.shape[2]) < select_num_idx[..., None]
        _require(bool((select_idx[~listed] == -1).all()), op, "unused select_idx entries must be -1")
        chosen = select_idx.masked_fill(~listed, nk)
        _require(bool((chosen[listed] >= 0).all() and (chosen[listed] < nk).all()), op, "index out of range")
        ascending = (chosen[..., 1:] > chosen[..., :-1]) | ~listed[..., 1:]
        _require(bool(ascending.all()), op, "kept blocks must be listed in ascending order")
        block_mask = torch.zeros(nq, heads, nk + 1, dtype=torch.bool).scatter_(-1, chosen, True)[..., :nk]
        visible = _expand_blocks(block_mask.transpose(0, 1)[None], block_q, block_kv, s_q, s_kv)
        q = query[q_start : q_start + s_q].transpose(0, 1)[None]
        k = key[kv_start : kv_start + s_kv].transpose(0, 1)[None]
        v = value[kv_start : kv_start + s_kv].transpose(0, 1)[None]
        out, lse = _attention_bnsd(q, k, v, visible, float(scale))
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
        q_start += s_q
        kv_start += s_kv
    return torch.cat(outs).to(query.dtype), torch.cat(lses).float()[..., None]
