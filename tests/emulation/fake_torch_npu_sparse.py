"""A CPU stand-in for ``torch_npu.npu_block_sparse_attention`` (the fake ``torch_npu`` installs
every public ``npu_*`` function of this module).

Source: the torch_npu API page ``torch_npu.npu_block_sparse_attention`` (Ascend/op-plugin docs):

* ``(query, key, value, block_sparse_mask, block_shape, *, q_input_layout='TND',
  kv_input_layout='TND', num_key_value_heads=1, scale_value=0.0, inner_precise=1,
  actual_seq_lengths=None, actual_seq_lengths_kv=None, softmax_lse_flag=0) -> (out, softmax_lse)``.
* float16/bfloat16; layouts TND or BNSD, the same for q and kv; head_dim 64 or 128 (forward);
  ``N1 % N2 == 0`` with ``num_key_value_heads == N2``.
* ``block_sparse_mask`` int8 ``[B, N, ceil(Sq/blockShapeX), ceil(Skv/blockShapeY)]``, 1 = computed;
  ``blockShapeY`` a multiple of 128; sequence lengths need not divide the block shape.
* ``inner_precise`` 0 (float32 softmax) or 1 (float16); bfloat16 allows only 0. sglang passes 4 on
  Ascend 950 (A5), so 4 is accepted too.
* actual lengths: both or neither; required for TND, where they are per-sequence lengths that
  must sum to T (sglang's note), optional for BNSD.
* ``softmax_lse`` float32 ``[B, N, S, 1]`` (``[T, N, 1]`` for TND) when ``softmax_lse_flag=1``.

Not documented, chosen here: with ``softmax_lse_flag=0`` the second output is a float32 ``[1]``
zero tensor; rows that see no key give 0.
"""

from __future__ import annotations

import math

import torch

from tests.emulation.fake_attentions_ops import _attention_bnsd, _expand_blocks


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"npu_block_sparse_attention: {message}")


def npu_block_sparse_attention(
    query,
    key,
    value,
    block_sparse_mask,
    block_shape,
    *,
    q_input_layout="TND",
    kv_input_layout="TND",
    num_key_value_heads=1,
    scale_value=0.0,
    inner_precise=1,
    actual_seq_lengths=None,
    actual_seq_lengths_kv=None,
    softmax_lse_flag=0,
):
    """Attention over the blocks ``block_sparse_mask`` marks (see the module docstring)."""
    _require(q_input_layout in ("TND", "BNSD"), f"q_input_layout {q_input_layout!r} not supported")
    _require(kv_input_layout == q_input_layout, "kv_input_layout must match q_input_layout")
    _require(query.dtype in (torch.float16, torch.bfloat16), f"dtype {query.dtype} not supported")
    _require(key.dtype == value.dtype == query.dtype, "query, key, value dtypes differ")
    _require(len(block_shape) >= 2 and min(block_shape) > 0, "block_shape needs two positive sizes")
    block_x, block_y = int(block_shape[0]), int(block_shape[1])
    _require(block_y % 128 == 0, "blockShapeY must be a multiple of 128")
    _require(inner_precise in (0, 1, 4), f"inner_precise {inner_precise} not supported")
    _require(
        not (query.dtype == torch.bfloat16 and inner_precise == 1), "bfloat16 supports only inner_precise=0"
    )
    _require(query.shape[-1] in (64, 128), f"head_dim {query.shape[-1]} not supported (64 or 128)")
    _require(
        (actual_seq_lengths is None) == (actual_seq_lengths_kv is None), "give both actual lengths or none"
    )
    if q_input_layout == "TND":
        _require(actual_seq_lengths is not None, "TND needs actual_seq_lengths and actual_seq_lengths_kv")
        _require(sum(actual_seq_lengths) == query.shape[0], "actual_seq_lengths must sum to T")
        _require(sum(actual_seq_lengths_kv) == key.shape[0], "actual_seq_lengths_kv must sum to T_kv")
        segments = _split_tnd(query, key, value, actual_seq_lengths, actual_seq_lengths_kv)
    else:
        batch = query.shape[0]
        lengths_q = list(actual_seq_lengths) if actual_seq_lengths is not None else [query.shape[2]] * batch
        lengths_kv = (
            list(actual_seq_lengths_kv) if actual_seq_lengths_kv is not None else [key.shape[2]] * batch
        )
        _require(len(lengths_q) == batch and len(lengths_kv) == batch, "one actual length per batch")
        segments = [
            (
                query[b : b + 1, :, : lengths_q[b]],
                key[b : b + 1, :, : lengths_kv[b]],
                value[b : b + 1, :, : lengths_kv[b]],
            )
            for b in range(batch)
        ]
    heads, kv_heads = segments[0][0].shape[1], segments[0][1].shape[1]
    _require(heads % kv_heads == 0, "query heads must be a multiple of key/value heads")
    _require(num_key_value_heads == kv_heads, f"num_key_value_heads {num_key_value_heads} != {kv_heads}")
    max_q = max(q.shape[2] for q, _, _ in segments) if q_input_layout == "TND" else query.shape[2]
    max_kv = max(k.shape[2] for _, k, _ in segments) if q_input_layout == "TND" else key.shape[2]
    expected = (len(segments), heads, math.ceil(max_q / block_x), math.ceil(max_kv / block_y))
    _require(block_sparse_mask.dtype == torch.int8, "block_sparse_mask must be int8")
    _require(
        tuple(block_sparse_mask.shape) == expected,
        f"block_sparse_mask must be {expected}, got {tuple(block_sparse_mask.shape)}",
    )
    outs, lses = [], []
    for b, (q, k, v) in enumerate(segments):
        visible = _expand_blocks(
            block_sparse_mask[b : b + 1].bool(), block_x, block_y, q.shape[2], k.shape[2]
        )
        out, lse = _attention_bnsd(q, k, v, visible, float(scale_value))
        outs.append(out)
        lses.append(lse)
    if q_input_layout == "TND":
        out = torch.cat([o[0].transpose(0, 1) for o in outs]).to(query.dtype)
        lse = torch.cat([x[0].transpose(0, 1) for x in lses])[..., None].float()
    else:
        out = torch.zeros(query.shape, dtype=torch.float64)
        lse = torch.full((*query.shape[:3], 1), float("-inf"), dtype=torch.float64)
        for b, (o, x) in enumerate(zip(outs, lses)):
            out[b, :, : o.shape[2]] = o[0]
            lse[b, :, : x.shape[2], 0] = x[0]
        out, lse = out.to(query.dtype), lse.float()
    return out, (lse if softmax_lse_flag else torch.zeros(1))


def _split_tnd(query, key, value, lengths_q, lengths_kv):
    segments, q_start, kv_start = [], 0, 0
    for s_q, s_kv in zip(lengths_q, lengths_kv):
        q = query[q_start : q_start + s_q].transpose(0, 1)[None]
        k = key[kv_start : kv_start + s_kv].transpose(0, 1)[None]
        v = value[kv_start : kv_start + s_kv].transpose(0, 1)[None]
        segments.append((q, k, v))
        q_start, kv_start = q_start + s_q, kv_start + s_kv
    return segments
