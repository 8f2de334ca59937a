"""A CPU stand-in for ``torch_npu.npu_block_sparse_attention`` (the fake ``torch_npu`` installs
every public ``npu_*`` function of this module). attnbridge calls it in BNSD only; TND and partial
actual lengths raise "not emulated".

Sources: "docs l.N" is a line of ``torch_npu/_op_plugin_docs.py`` in the torch-npu 2.14.0 wheel
(docstring from l.546); the schema is yaml:983 of ``npu_native_functions_by_codegen.yaml`` in that
wheel; "op-plugin test" is torch_npu's unit test ``test_npu_block_sparse_attention`` (gated on
CANN >= 9.0.0).

* ``(query, key, value, block_sparse_mask, block_shape, *, q_input_layout='TND',
  kv_input_layout='TND', num_key_value_heads=1, scale_value=0.0, inner_precise=1,
  actual_seq_lengths=None, actual_seq_lengths_kv=None, softmax_lse_flag=0) -> (out, softmax_lse)``
  (yaml:983).
* float16/bfloat16; layouts TND or BNSD, the same for q and kv; head_dim 64 or 128 (docs l.581).
* ``block_sparse_mask`` int8 ``[B, N, ceil(Sq/blockShapeX), ceil(Skv/blockShapeY)]``, 1 = the block
  is computed; ``blockShapeY`` a multiple of 128 (torch_npu API page
  ``torch_npu.npu_block_sparse_attention``).
* ``inner_precise`` 0 (float32 softmax) or 1 (float16); bfloat16 allows only 0 (docs l.583). sglang's
  ``rain_fusion_attn.py`` passes 4 on Ascend 950 (A5), so 4 is accepted too.
* Actual lengths: one per batch ("各 batch 的 query 实际序列长度"); sglang's note: the op "validates
  sum(actual_seq_lengths) == T".
* GQA: ``N1 % N2 == 0`` with ``num_key_value_heads == N2`` and ``G = N1 / N2`` with "G<128 且
  128%G==0" (op-plugin test docstring).
* ``softmax_lse`` float32 ``[B, N, S, 1]``, also with ``softmax_lse_flag=0`` (op-plugin test
  ``..._softmax_lse_flag0``).

Not documented, chosen here: query head ``n`` reads kv head ``n // G`` (the op-plugin test's CPU
reference uses ``n % N2``, and tests only G = 1 or N2 = 1, where the two agree); rows that see no key
give 0 and LSE -inf; the LSE with ``softmax_lse_flag=0`` is NaN, so no caller relies on it.
"""

from __future__ import annotations

import math

import torch

from tests.emulation.fake_attentions_ops import _attention_bnsd, _expand_blocks

OP = "npu_block_sparse_attention"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{OP}: {message}")


def _not_emulated(condition: bool, what: str) -> None:
    if not condition:
        raise NotImplementedError(f"fake {OP}: {what} is not emulated")


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
    _not_emulated(q_input_layout == "BNSD", "q_input_layout 'TND'")
    _require(query.dtype in (torch.float16, torch.bfloat16), f"dtype {query.dtype} not supported")
    _require(key.dtype == value.dtype == query.dtype, "query, key, value dtypes differ")
    _require(query.dim() == key.dim() == value.dim() == 4, "BNSD inputs are [B, N, S, D]")
    _require(len(block_shape) >= 2 and min(block_shape) > 0, "block_shape needs two positive sizes")
    block_x, block_y = int(block_shape[0]), int(block_shape[1])
    _require(block_y % 128 == 0, "blockShapeY must be a multiple of 128")
    _require(inner_precise in (0, 1, 4), f"inner_precise {inner_precise} not supported")
    _require(
        not (query.dtype == torch.bfloat16 and inner_precise == 1), "bfloat16 supports only inner_precise=0"
    )
    _require(query.shape[-1] in (64, 128), f"head_dim {query.shape[-1]} not supported (64 or 128)")
    _require(key.shape == value.shape and key.shape[-1] == query.shape[-1], "key/value must be [B, N2, S, D]")
    _require(softmax_lse_flag in (0, 1), f"softmax_lse_flag must be 0 or 1; got {softmax_lse_flag!r}")
    batch, heads, s_q, _ = query.shape
    kv_heads, s_kv = key.shape[1], key.shape[2]
    _require(key.shape[0] == batch, "query and key/value batches differ")
    _require(heads % kv_heads == 0, "query heads must be a multiple of key/value heads")
    _require(num_key_value_heads == kv_heads, f"num_key_value_heads {num_key_value_heads} != {kv_heads}")
    group = heads // kv_heads
    _require(group < 128 and 128 % group == 0, f"GQA needs G < 128 and 128 % G == 0; got G={group}")
    _require(
        (actual_seq_lengths is None) == (actual_seq_lengths_kv is None), "give both actual lengths or none"
    )
    if actual_seq_lengths is not None:
        lengths_q, lengths_kv = list(actual_seq_lengths), list(actual_seq_lengths_kv)
        _require(len(lengths_q) == batch and len(lengths_kv) == batch, "one actual length per batch")
        _not_emulated(
            lengths_q == [s_q] * batch and lengths_kv == [s_kv] * batch,
            f"actual lengths shorter than the tensors ({lengths_q}, {lengths_kv})",
        )
    expected = (batch, heads, math.ceil(s_q / block_x), math.ceil(s_kv / block_y))
    _require(block_sparse_mask.dtype == torch.int8, "block_sparse_mask must be int8")
    _require(
        tuple(block_sparse_mask.shape) == expected,
        f"block_sparse_mask must be {expected}, got {tuple(block_sparse_mask.shape)}",
    )
    _require(
        bool(((block_sparse_mask == 0) | (block_sparse_mask == 1)).all()),
        "block_sparse_mask entries must be 0/1",
    )
    visible = _expand_blocks(block_sparse_mask.bool(), block_x, block_y, s_q, s_kv)
    out, lse = _attention_bnsd(query, key, value, visible, float(scale_value))
    lse = lse[..., None].float()
    if not softmax_lse_flag:
        lse = torch.full_like(lse, float("nan"))
    return out.to(query.dtype), lse
