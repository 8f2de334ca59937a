"""CPU stand-ins for the sgl-kernel-npu attention kernels attnbridge calls.

sgl-kernel-npu ships them in two layouts (``tests.emulation.install`` installs either):

* ``import attentions``: ``torch.ops.attentions.{la, block_sparse_attention (older builds) or
  ada_block_sparse_attention, rainfusionattention}`` (:data:`ATTENTIONS_OPS`).
* ``import sgl_kernel_npu``: ``torch.ops.npu.{laser_attn, ada_block_sparse_attention}``
  (:data:`NPU_OPS`), the same kernels under new names.

Each function follows its op's registered schema, computes in float64, and rejects the inputs the
real op rejects that a caller could get wrong. It emulates only what attnbridge calls (BNSD for Laser
and block-sparse, one TND sequence per ``rainfusionattention`` call); every other input raises
``NotImplementedError`` ("... is not emulated").

Sources, all in sgl-project/sgl-kernel-npu. "SKN" is snapshot ``f425bdf1``, paths under
``csrc/attentions/csrc/``: schemas ``plugin/register_ops.cpp:23-42``; plugins ``plugin/la.cpp``,
``plugin/ada_block_sparse_attention.cpp``, ``plugin/rainfusionattention.cpp``,
``plugin/sparse_block_estimate.cpp``; kernels ``ops/laser_attention/**`` and
``ops/ada_block_sparse_attention/**``. Commit ``4d1ad10e`` holds the same block-sparse kernel and
schema under the name ``block_sparse_attention``. "SKN-new" is the ``torch.ops.npu`` layout:
``python/sgl_kernel_npu/sgl_kernel_npu/attentions/__init__.py`` (``4b03c43c``) and the
``laser_attn`` host code ``csrc/laser_attention/op_host/laser_attention.cpp`` (``7f12e8f0``).

Not documented, chosen here: rows that see no key give 0; LSE outputs are float32 natural log.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

HALF = (torch.float16, torch.bfloat16)
#: Ops of each layout, by name: ``torch.ops.attentions`` (``import attentions``) and
#: ``torch.ops.npu`` (``import sgl_kernel_npu``).
ATTENTIONS_OPS = ("la", "block_sparse_attention", "ada_block_sparse_attention", "rainfusionattention")
NPU_OPS = ("laser_attn", "ada_block_sparse_attention")
#: ``pre_tokens`` meaning "no padded keys" (``laser_attention_tiling.cpp:203-207``: windowLen = 0).
LA_NO_PAD = 2**31 - 1
#: The only ``next_tokens`` the emulation accepts: the schema default, which the kernel never reads.
LA_NEXT_TOKENS = 1
#: The Laser kernel's tail alignment (``VectorForward.h:899``: ``align_size = 256``).
LA_TAIL = 256
FP16_MAX = 65504.0


def _expand_blocks(mask: torch.Tensor, block_q: int, block_kv: int, s_q: int, s_kv: int) -> torch.Tensor:
    """Block mask ``[..., nq, nk]`` -> token mask ``[..., s_q, s_kv]``."""
    return mask.repeat_interleave(block_q, dim=-2)[..., :s_q, :].repeat_interleave(block_kv, dim=-1)[
        ..., :s_kv
    ]


def _attention_bnsd(q, k, v, visible, scale):
    """float64 attention on BNSD with bool ``visible`` [B|1, N|1, S_q, S_kv]; query head ``n`` reads
    kv head ``n // G``; returns (out, lse)."""
    group = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bnqd,bnkd->bnqk", q64, k64) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    # A row with no visible key gives 0 (the kernels zero-fill empty rows); NaN or inf in the inputs
    # still reach the output, as on the device.
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, 0.0)
    return torch.einsum("bnqk,bnkd->bnqd", probs, v64), lse


def _require(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{op}: {message}")


def _not_emulated(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise NotImplementedError(f"fake {op}: {message}")


# ----------------------------------------------------------------------------------------------
# Laser: la / laser_attn


def _laser(
    op,
    query,
    key,
    value,
    masks,
    scale_value,
    head_num,
    input_layout,
    keep_prob,
    pre_tokens,
    next_tokens,
    seq_multiple,
):
    """The Laser kernel behind both op names.

    Kernel files are SKN's, under ``ops/laser_attention/``: ``op_kernel/laser_attention.cpp``,
    ``op_kernel/VectorForward.h``, ``op_host/laser_attention_tiling.cpp``.

    * fp16 only: ``laser_attention.cpp:61,66`` instantiate only ``CubeForward<half…>`` /
      ``VectorForward<half…>``. The scale is applied to fp16 scores as ``(INPUT_T)SCALE`` with
      ``INPUT_T = half`` (``VectorForward.h:894``), so a ``scale_value`` beyond fp16's range is
      refused: the kernel would turn it into inf.
    * GQA: ``laser_attention_tiling.cpp:199-202`` sets ``headGroupSize = queryDim / keyDim``; query
      head ``n`` reads kv head ``n // G`` (SKN-new ``test_laser_attn`` reference,
      ``repeat_interleave``).
    * ``pre_tokens``: the tiling reads only attr 4 (``laser_attention_tiling.cpp:160``); windowLen =
      ``pre_tokens``, or 0 for 2**31 - 1 (l.203-207). ``VectorForward.h:898-916`` then sets the last
      windowLen score columns of the 256-aligned tail to -60000: the last ``pre_tokens`` keys get
      no weight. That arithmetic (``(256 - windowLen) % 128``) only covers windowLen < 256, so larger
      values are refused; the fake also insists those keys are zero, since the callers' padding is.
    * ``next_tokens`` is never read by the tiling; only the schema default 1 is accepted, so a caller
      who sets it expecting an effect is caught.
    """
    _require(input_layout == "BNSD", op, f"only BNSD is supported, got {input_layout!r}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        _require(x.dtype == torch.float16, op, f"{name} must be float16, got {x.dtype}")
    batch, heads, s_q, dim = query.shape
    kv_heads, s_kv = key.shape[1], key.shape[2]
    _require(head_num == heads, op, f"head_num {head_num} != query heads {heads}")
    _require(key.shape == value.shape and key.shape[0] == batch, op, "key/value must be [B, N_kv, S, D]")
    _require(
        heads % kv_heads == 0, op, f"query heads {heads} must be a multiple of key/value heads {kv_heads}"
    )
    _require(key.shape[3] == dim == 128, op, f"head_dim must be padded to 128, got {dim}")
    _require(
        s_q % seq_multiple == 0 and s_kv % seq_multiple == 0,
        op,
        f"sequence lengths must be multiples of {seq_multiple}",
    )
    _not_emulated(
        all(m is None for m in masks), op, "masks (atten_mask, alibi_mask, drop_mask) are not emulated"
    )
    _require(0.0 < float(keep_prob) <= 1.0, op, f"keep_prob must be in (0, 1]; got {keep_prob}")
    _not_emulated(keep_prob == 1.0, op, "dropout (keep_prob < 1) is not emulated")
    _require(
        math.isfinite(scale_value) and abs(scale_value) <= FP16_MAX,
        op,
        f"scale_value {scale_value} overflows the kernel's fp16 scale",
    )
    _not_emulated(
        next_tokens == LA_NEXT_TOKENS,
        op,
        f"next_tokens={next_tokens!r} is not emulated: only {LA_NEXT_TOKENS} (the schema default, "
        "which the kernel never reads)",
    )
    _not_emulated(
        pre_tokens == LA_NO_PAD or 0 <= pre_tokens < LA_TAIL,
        op,
        f"pre_tokens={pre_tokens!r} is not emulated: only the zero-padded key count (0-255) or "
        f"{LA_NO_PAD} (no padding)",
    )
    window = 0 if pre_tokens == LA_NO_PAD else pre_tokens
    _not_emulated(
        window == 0 or s_kv % LA_TAIL == 0,
        op,
        f"pre_tokens={pre_tokens} with a key length {s_kv} that is not a multiple of {LA_TAIL} is not emulated",
    )
    valid = s_kv - window
    _require(
        not bool(key[:, :, valid:].any() or value[:, :, valid:].any()),
        op,
        f"pre_tokens={pre_tokens} but the last {window} key/value rows are not zero padding",
    )
    scale = float(torch.tensor(scale_value, dtype=torch.float16))
    visible = (torch.arange(s_kv) < valid).expand(1, 1, s_q, s_kv)
    out, lse = _attention_bnsd(query, key, value, visible, scale)
    return lse.float(), out.float()


def _laser_op(op: str, seq_multiple: int, host_checks: Callable, doc: str) -> Callable:
    """An op with ``la``'s schema (SKN ``register_ops.cpp:23-28``; ``laser_attn`` keeps it) that runs
    ``host_checks(query, key, value)``, then the Laser kernel (:func:`_laser`)."""

    def laser(
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
        host_checks(query, key, value)
        masks = (atten_mask, alibi_mask, drop_mask)
        args = (scale_value, head_num, input_layout, keep_prob, pre_tokens, next_tokens, seq_multiple)
        return _laser(op, query, key, value, masks, *args)

    laser.__name__ = laser.__qualname__ = op.rsplit(".", 1)[-1]
    laser.__doc__ = doc
    return laser


def _la_host_checks(query, key, value) -> None:
    op = "attentions.la"
    _require(query.dim() == 4, op, f"the first input dimension of la must be 4 but got {query.dim()}")
    _require(key.dim() == value.dim() == 4, op, "key/value must be 4-D (BNSD)")


def _laser_attn_host_checks(query, key, value) -> None:
    op = "npu.laser_attn"
    _require(
        query.dim() == key.dim() == value.dim() == 4,
        op,
        "laser_attn expects query, key, and value in rank-4 BNSD layout",
    )
    _require(min(query.shape) > 0 and min(key.shape) > 0, op, "dimensions must be greater than zero")


la = _laser_op(
    "attentions.la",
    256,
    _la_host_checks,
    """``torch.ops.attentions.la`` (SKN ``register_ops.cpp:23-28``) -> ``(softmax_log_max_sum [B,N,S]
    float32, out [B,N,S,D] float32)`` (``la.cpp:43-53``). ``la.cpp:36`` checks only the rank; the rest
    is the kernel's (:func:`_laser`). S must be a multiple of 256, the tail alignment: this build has
    no host check, and its callers (sglang ``laser_attn.py``, MindIE-SD ``ascend_laser_attention.py``)
    pad to 256.""",
)
laser_attn = _laser_op(
    "npu.laser_attn",
    128,
    _laser_attn_host_checks,
    """``torch.ops.npu.laser_attn``: ``la``'s schema and kernel (SKN-new ``attentions/__init__.py``),
    with host checks (``laser_attention.cpp`` ``check_inputs``): rank-4 BNSD, fp16, head dim 128,
    Hq % Hkv == 0, ``head_num == query.size(1)``, S a multiple of 128, ``keep_prob`` in (0, 1].""",
)


# ----------------------------------------------------------------------------------------------
# Block-sparse: block_sparse_attention / ada_block_sparse_attention


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
    actual_seq_lengths,
    actual_seq_lengths_kv,
):
    """The block-sparse kernel behind both op names.

    * The plugin refuses TND (``ada_block_sparse_attention.cpp:32``), hard-codes ``sparseMode = 0``
      and passes no atten_mask (l.36, l.44); the tiling then sets both sparse windows to INT_MAX
      (``ada_block_sparse_attention_tiling.cpp:3618-3625``), so ``pre_tokens``/``next_tokens`` have
      no effect. The same holds at ``4d1ad10e`` (``plugin/block_sparse_attention.cpp:35,43``).
    * float16 kernels exist only for the high-performance tiling keys
      (``op_kernel/ada_block_sparse_attention.cpp:58-62``, identical at ``4d1ad10e`` in
      ``op_kernel/block_sparse_attention.cpp``), so float16 needs ``inner_precise`` 1 or 3; bfloat16
      has its own keys (l.71-75).
    * ``sparse_mask`` int8 ``[B, Nq, ceil(S_q/ss), align32(ceil(S_kv/ss))]`` with 0/1 entries and zero
      padding, ``sparse_count_table`` int32 ``[B, Nq, ceil(S_q/ss)]`` = the row sums
      (``sparse_block_estimate.cpp:69-77``, which produces them); the kernel reads one mask per query
      head (``ada_block_sparse_attention_s1s2_bns1_x910.h:176-191``) and writes 0 for a row whose
      count is 0 (l.696-699).
    * ``sparse_size``: the schema default 128 (``register_ops.cpp:38``), what sglang passes; the
      tiling states no limit on it, so other sizes are not emulated.
    * ``causal``: key ``j`` visible to query ``i`` iff ``j <= i``, emulated only for S_q == S_kv, where
      top-left and bottom-right alignment agree.
    """
    _require(input_layout != "TND", op, "input_layout currently does not support 'TND'.")
    _not_emulated(input_layout == "BNSD", op, f"input_layout {input_layout!r} is not emulated (only BNSD)")
    _require(query.dtype in HALF, op, f"query must be float16 or bfloat16, got {query.dtype}")
    _require(key.dtype == query.dtype == value.dtype, op, "query, key, value dtypes differ")
    _require(
        not (query.dtype == torch.float16 and inner_precise in (0, 2)),
        op,
        "the FP16 high-precision specialization (inner_precise 0 or 2) is absent",
    )
    _require(query.dim() == key.dim() == value.dim() == 4, op, "BNSD inputs are [B, N, S, D]")
    batch, heads, s_q, _ = query.shape
    kv_heads, s_kv = key.shape[1], key.shape[2]
    _require(key.shape == value.shape and key.shape[0] == batch, op, "key/value must be [B, N_kv, S, D]")
    _require(num_heads == heads, op, f"num_heads {num_heads} != query heads {heads}")
    _require(num_key_value_heads == kv_heads, op, f"num_key_value_heads {num_key_value_heads} != {kv_heads}")
    _require(heads % kv_heads == 0, op, "query heads must be a multiple of key/value heads")
    _not_emulated(sparse_size == 128, op, f"sparse_size={sparse_size} is not emulated (only 128)")
    _not_emulated(
        actual_seq_lengths is None and actual_seq_lengths_kv is None,
        op,
        "actual_seq_lengths/actual_seq_lengths_kv are not emulated",
    )
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
    if causal:
        _not_emulated(s_q == s_kv, op, f"causal with S_q {s_q} != S_kv {s_kv} is not emulated")
        visible = visible & (torch.arange(s_kv)[None, :] <= torch.arange(s_q)[:, None])
    out, _ = _attention_bnsd(query, key, value, visible, float(scale_value))
    return out.to(query.dtype)


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
    """``torch.ops.attentions.block_sparse_attention`` (older builds: ``4d1ad10e``
    ``plugin/register_ops.cpp:36``, the schema of ``ada_block_sparse_attention``); see
    :func:`_block_sparse`."""
    return _block_sparse(
        "attentions.block_sparse_attention",
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
    """``ada_block_sparse_attention`` (SKN ``register_ops.cpp:35-42``; the same under
    ``torch.ops.npu`` in SKN-new); see :func:`_block_sparse`."""
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
        actual_seq_lengths,
        actual_seq_lengths_kv,
    )


# ----------------------------------------------------------------------------------------------
# rainfusionattention


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
    """``torch.ops.attentions.rainfusionattention`` (SKN ``register_ops.cpp:29-34``) -> ``(out [T,N,D],
    softmax_lse [T,N,D])``, both in the query dtype (``rainfusionattention.cpp:46-49``).

    The plugin takes TND or BNSD (l.34-37). The kernel (``aclnnRainFusionAttention``) is not in any
    source found, so only sglang's and MindIE-SD's usage fixes the rest: one TND sequence with
    ``actual_seq_qlen``/``kvlen`` = its length (MindIE-SD ``sparse_flash_attn.py`` passes
    per-sequence lengths); ``select_idx`` int64 ``[q_blocks, N, kv_blocks]`` with the kept blocks in
    ascending order, then -1, and ``select_num_idx`` int64 ``[q_blocks, N]`` (sglang
    ``rain_fusion_attn.py`` ``_get_mask_index``, MindIE-SD ``sparse_flash_attn_rf_v2.py``
    ``get_mask_index``). Several sequences per call, GQA, masks and paging are not emulated. The
    second output's contents are undocumented: it is NaN here, so no caller relies on it.
    """
    op = "attentions.rainfusionattention"
    for name, layout in (("q_input_layout", q_input_layout), ("kv_input_layout", kv_input_layout)):
        _require(layout in ("TND", "BNSD"), op, f"{name} only supports 'TND' and 'BNSD' now.")
        _not_emulated(layout == "TND", op, f"{name} {layout!r} is not emulated (only TND)")
    _require(query.dtype in HALF and key.dtype == value.dtype == query.dtype, op, "float16/bfloat16 inputs")
    _require(query.dim() == key.dim() == value.dim() == 3, op, "TND inputs are [T, N, D]")
    _require(head_num == query.shape[1], op, f"head_num {head_num} != query heads {query.shape[1]}")
    _not_emulated(key.shape[1] == query.shape[1], op, "GQA (fewer key/value heads than query heads)")
    _not_emulated(attn_mask is None and block_table is None and mask_type == 0, op, "masks/paging")
    _require(actual_seq_qlen is not None and actual_seq_kvlen is not None, op, "TND needs actual lengths")
    _not_emulated(
        len(actual_seq_qlen) == len(actual_seq_kvlen) == 1, op, "several sequences in one call (B > 1)"
    )
    (s_q,), (s_kv,) = actual_seq_qlen, actual_seq_kvlen
    _require(s_q == query.shape[0], op, "actual_seq_qlen must be the sequence length T (per-sequence)")
    _require(s_kv == key.shape[0], op, "actual_seq_kvlen must be the key length T_kv (per-sequence)")
    block_q, block_kv = blockshape
    _require(select_idx.dtype == torch.int64 and select_num_idx.dtype == torch.int64, op, "int64 indices")
    heads = query.shape[1]
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
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))
    out, _ = _attention_bnsd(q, k, v, visible, float(scale))
    return out[0].transpose(0, 1).to(query.dtype), torch.full_like(query, float("nan"))
