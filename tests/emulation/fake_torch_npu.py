"""A CPU stand-in for Ascend's ``torch_npu`` attention ops, so attnbridge's NPU code runs in tests.

It follows the documented semantics of ``torch_npu.npu_fused_infer_attention_score`` (FIA) and
``torch_npu.npu_fusion_attention``, computes in float64, and rejects what the real op rejects that a
caller could get wrong (layout strings, head counts, mask shapes, TND length lists), so plumbing bugs
fail on CPU rather than on an Ascend box. It emulates only what attnbridge calls, on contiguous
(unpaged) K/V:

* FIA in BSND and TND, ``sparse_mode`` 0 (no mask, or a full mask in BSND) with the default
  ``pre_tokens`` / ``next_tokens``, or ``sparse_mode`` 3 (compressed causal mask);
* fusion attention in BSND, ``sparse_mode`` 0 (no mask, or a full mask) or 3 (compressed causal
  mask), with the default ``pre_tockens`` / ``next_tockens``.

Any other documented input raises ``NotImplementedError`` ("... is not emulated") instead of
computing something: the other layouts (BNSD included), FIA ``sparse_mode`` 1/2/4, fusion
``sparse_mode`` 1/2/4-8, a token band (non-default ``pre_tokens`` / ``next_tokens`` with FIA
``sparse_mode`` 0, any non-default ``pre_tockens`` / ``next_tockens`` of fusion attention), paging,
quantization, ``pse``, dropout.

Sources. "docs l.N" is a line of ``torch_npu/_op_plugin_docs.py`` in the torch-npu 2.14.0 wheel (FIA
docstring from l.8053, ``_v2`` from l.8577, fusion attention from l.1592); "yaml:N" is a line of
``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` in that wheel (FIA 349, fusion 404).

* Schemas: yaml:349 (FIA), yaml:404 (fusion, ending ``softmax_layout, sink, dropout_mask, seed,
  offset``).
* ``atten_mask``: True / 1 means *masked out* (docs l.1610; vllm-ascend ``attention_mask.py:53``
  builds FIA's mask the same way). ``sparse_mode`` 3 takes the 2048 x 2048 compressed
  upper-triangular mask and is causal aligned to the bottom right of each sequence
  ("rightDownCausal", docs l.8121 for FIA, l.1610ff for fusion); FIA ignores ``pre_tokens`` /
  ``next_tokens`` with sparse_mode 3 (docs l.8215), so attnbridge's ``next_tokens=0`` there is taken.
* FIA TND: ``actual_seq_lengths`` are cumulative end offsets ("当前Batch与之前所有Batch的seqlen和"),
  and so is ``actual_seq_lengths_kv`` without paging (docs l.8275; vllm-ascend
  ``attention_v1.py:2111,2121``); each must be non-decreasing ("后一个元素的值必须大于等于前一个元素的值").
  Trailing zeros as skipped batches are documented for fusion attention only.
* FIA: ``num_heads / num_key_value_heads`` <= 64 (docs l.8116); ``softmax_lse`` float32 ``[B, N, S,
  1]`` (``[T, N, 1]`` for TND), natural log of the scaled scores, or a ``[1]`` zero tensor when
  ``softmax_lse_flag`` is False (docs l.8148).
* FIA documented limits, checked while the fake's ``strict_docs`` is True (the default): float16 /
  bfloat16 with D % 16 == 0, D <= 512, N <= 256, N * D < 65535 in BSND (docs l.8210ff: "支持D轴小于等于
  512。inputLayout为BSH或者BSND时，要求N*D小于65535"); TND: bfloat16 only, D in (128, 192), T <= 65536
  and, with sparse_mode 3, each query length <= its key length (docs l.8193-8199; ``_v2`` l.8717ff
  adds D = 128). Practice overrides the head clause "N等于8/16/32/64/128，且Q_N、K_N、V_N相等" (vllm-ascend
  ``attention_v1.py:2120-2129`` and sglang run TND with GQA) and the strict "<" (vllm-ascend
  ``attention_cp.py:580-584`` passes equal q/kv lengths with sparse_mode 3): neither is enforced.
* Fusion attention: float16/bfloat16/float32; GQA when the head counts are proportional (docs
  l.1592ff); returns ``(out, softmax_max, softmax_sum, softmax_in, seed, offset, numels)`` with
  max/sum float32 ``[B, N, S, 8]`` (one value replicated 8 times); without a mask, sparse_mode is
  ignored and the attention is full (docs l.1689).

Not documented, chosen here: a query row that sees no key (or lies past its actual length) gives
``out = 0``, ``lse = -inf``, ``softmax_max = -inf``, ``softmax_sum = 0``.
"""

from __future__ import annotations

import contextvars
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
#: Layouts each op documents (``input_layout`` in docs l.8053ff and l.1592ff), and the subset the
#: fake computes (the rest raise "not emulated").
FIA_LAYOUTS = ("BSH", "BSND", "BNSD", "TND", "BNSD_BSND", "NTD_TND", "TND_NTD")
FIA_EMULATED_LAYOUTS = ("BSND", "TND")
FUSION_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
FUSION_EMULATED_LAYOUTS = ("BSND",)
#: ``sparse_mode`` values the fake computes (both ops): 0, and 3 (compressed bottom-right causal).
EMULATED_SPARSE_MODES = (0, 3)
HALF = (torch.float16, torch.bfloat16)
FUSION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SPARSE_MODULE = "tests.emulation.fake_torch_npu_sparse"

#: Whether the documented FIA limits apply to the call in progress; the fake module's
#: ``strict_docs`` sets it for each call, a direct call of the function is strict.
_STRICT_DOCS: contextvars.ContextVar[bool] = contextvars.ContextVar("strict_docs", default=True)


class Call(tuple):
    """One recorded op call, ``(name, args, kwargs)``; ``.namespace`` says where the op lives
    (``"torch_npu"``, ``"attentions"`` for ``torch.ops.attentions``, ``"npu"`` for ``torch.ops.npu``)."""

    namespace: str

    def __new__(cls, name: str, args: tuple, kwargs: dict, namespace: str) -> Call:
        call = super().__new__(cls, (name, args, kwargs))
        call.namespace = namespace
        return call


def recorded(name: str, fn: Callable, calls: list, namespace: str) -> Callable:
    """``fn`` appending ``Call(name, args, kwargs, namespace)`` to ``calls`` before it runs."""

    @functools.wraps(fn)
    def op(*args, **kwargs):
        calls.append(Call(name, args, kwargs, namespace))
        return fn(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    return op


# ----------------------------------------------------------------------------------------------
# Shared math: one sequence at a time, float64.


@dataclass
class _Segment:
    """One sequence: ``q`` ``[S_q, N_q, D]``, ``k``/``v`` ``[S_kv, N_kv, D]`` (float64) and
    ``visible`` bool ``[S_q, S_kv]`` or ``[N_q, S_q, S_kv]`` (True: the query may attend the key)."""

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


def _bottom_right_causal(s_q: int, s_kv: int) -> torch.Tensor:
    """``sparse_mode`` 3: query ``i`` sees key ``j`` iff ``j <= i + S_kv - S_q``."""
    return torch.arange(s_kv)[None, :] <= torch.arange(s_q)[:, None] + (s_kv - s_q)


@functools.lru_cache(maxsize=1)
def _compressed_mask() -> torch.Tensor:
    size = COMPRESSED_MASK_SIZE
    return torch.triu(torch.ones(size, size, dtype=torch.bool), diagonal=1)


def _check_compressed_mask(op: str, mask: torch.Tensor | None, sparse_mode: int) -> None:
    """sparse_mode 3 takes the fixed 2048 x 2048 upper-triangular mask, True = masked (docs l.8121,
    l.1610ff)."""
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
    """Check FIA's TND cumulative-offset list (non-decreasing, ending at T; docs l.8275) and return
    the per-sequence lengths. A trailing 0 breaks the order: FIA has no skipped-batch convention."""
    if not offsets:
        raise RuntimeError(f"{op}: {name} is empty")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise RuntimeError(
            f"{op}: {name} must be cumulative end offsets (non-decreasing, e.g. [5, 22, 31] for lengths "
            f"[5, 17, 9]) with input_layout TND; got {offsets}"
        )
    if offsets[-1] != total:
        raise RuntimeError(
            f"{op}: {name} ends at {offsets[-1]} but the TND tensor has T={total} tokens; it must hold "
            f"cumulative end offsets; got {offsets}"
        )
    return [b - a for a, b in zip([0] + offsets[:-1], offsets)]


def _require_unset(op: str, **values) -> None:
    for name, value in values.items():
        if value is not None:
            raise NotImplementedError(f"fake {op}: {name} is not emulated")


def _require_default(op: str, **values: tuple) -> None:
    """``name=(value, default)``: arguments the fake computes only at their schema default."""
    for name, (value, default) in values.items():
        if value != default:
            raise NotImplementedError(f"fake {op}: {name}={value!r} is not emulated (only {default!r})")


def _check_layout(op: str, layout: str, documented: tuple[str, ...], emulated: tuple[str, ...]) -> None:
    if layout not in documented:
        raise RuntimeError(
            f"{op}: input_layout {layout!r} is not supported; allowed: {', '.join(documented)}"
        )
    if layout not in emulated:
        raise NotImplementedError(
            f"fake {op}: input_layout {layout!r} is not emulated (only {', '.join(emulated)})"
        )


def _check_sparse_mode(op: str, sparse_mode, documented: range) -> None:
    if sparse_mode not in documented:
        raise RuntimeError(
            f"{op}: sparse_mode {sparse_mode} is not supported ({documented.start}..{documented.stop - 1} are)"
        )
    if sparse_mode not in EMULATED_SPARSE_MODES:
        raise NotImplementedError(f"fake {op}: sparse_mode {sparse_mode} is not emulated (only 0 and 3)")


def _check_qkv_basics(op: str, query, key, value, layout: str) -> None:
    """Tensor ranks and dtypes."""
    want_dim = 3 if layout == "TND" else 4
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor")
        if t.dim() != want_dim:
            raise RuntimeError(f"{op}: layout {layout} needs {want_dim}-D {name}; got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            f"{op}: query, key, value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
        )


def _check_dtype(op: str, query: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if query.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise RuntimeError(f"{op}: query dtype {query.dtype} is not supported; allowed: {names}")


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
    values past the batch are ignored (docs, FIA ``actual_seq_lengths``)."""
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
    """``sparse_mode`` 0 mask: returns ``b -> bool [S_q', S_kv']`` (True = masked). Shapes may be
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


def _fia_visible(sparse_mode: int, user_mask, s_q: int, s_kv: int) -> torch.Tensor:
    if sparse_mode == 3:
        return _bottom_right_causal(s_q, s_kv)
    if user_mask is None:
        return torch.ones(s_q, s_kv, dtype=torch.bool)
    if user_mask.shape[-2] < s_q or user_mask.shape[-1] < s_kv:
        raise RuntimeError(
            f"{FIA_OP}: atten_mask covers {tuple(user_mask.shape[-2:])} but the sequence needs ({s_q}, {s_kv})"
        )
    return ~user_mask[:s_q, :s_kv]


def _check_fia_documented_limits(
    layout: str,
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    q_lens: list[int],
    kv_lens: list[int],
    sparse_mode: int,
) -> None:
    """The limits FIA's docstring states (module docstring); skipped while ``strict_docs`` is off."""
    if not _STRICT_DOCS.get():
        return
    op = FIA_OP
    _check_dtype(op, query, HALF)
    head_dim = query.shape[-1]
    if head_dim % 16 or head_dim > 512:
        raise RuntimeError(f"{op}: head_dim {head_dim} must be a multiple of 16 and <= 512 (docs l.8210)")
    if num_heads > 256:
        raise RuntimeError(f"{op}: num_heads {num_heads} must be <= 256")
    if layout == "BSND" and num_heads * head_dim >= 65535:
        raise RuntimeError(f"{op}: BSND needs N*D < 65535; got {num_heads}*{head_dim}")
    if layout != "TND":
        return
    where = "with input_layout TND (docs l.8193-8199)"
    if query.dtype != torch.bfloat16:
        raise RuntimeError(f"{op}: {where} the dtype must be bfloat16; got {query.dtype}")
    if head_dim not in (128, 192):
        raise RuntimeError(f"{op}: {where} head_dim must be 128 or 192; got {head_dim}")
    if max(query.shape[0], key.shape[0]) > 65536:
        raise RuntimeError(f"{op}: {where} T must be <= 65536; got {query.shape[0]} / {key.shape[0]}")
    if sparse_mode == 3 and any(q > kv for q, kv in zip(q_lens, kv_lens)):
        raise RuntimeError(
            f"{op}: {where} sparse_mode 3 needs each query length <= its key length; got {q_lens} / {kv_lens}"
        )


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
    """Emulates ``torch_npu.npu_fused_infer_attention_score`` (yaml:349, docs l.8053ff) ->
    ``(attention_out, softmax_lse)``; see the module docstring for each rule's source."""
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
        block_table=block_table,
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
    _require_default(op, block_size=(block_size, 0))
    layout = input_layout
    _check_layout(op, layout, FIA_LAYOUTS, FIA_EMULATED_LAYOUTS)
    _check_qkv_basics(op, query, key, value, layout)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {name} must be contiguous (non-contiguous tensors are not supported)")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise RuntimeError(f"{op}: num_heads must be a positive int; got {num_heads!r}")
    kv_heads = num_key_value_heads or num_heads
    _check_heads(op, num_heads, kv_heads, max_group=64)
    _check_sparse_mode(op, sparse_mode, range(5))
    if sparse_mode == 0:  # sparse_mode 3 ignores them (docs l.8215)
        _require_default(op, pre_tokens=(pre_tokens, INT_MAX), next_tokens=(next_tokens, INT_MAX))
    if inner_precise not in (0, 1, 2, 3):
        raise RuntimeError(f"{op}: inner_precise must be 0, 1, 2 or 3; got {inner_precise}")

    # Head counts the layout carries must agree with num_heads / num_key_value_heads.
    head_axis = 2 if layout == "BSND" else 1
    if query.shape[head_axis] != num_heads:
        raise RuntimeError(
            f"{op}: num_heads={num_heads} but query has {query.shape[head_axis]} heads (layout {layout})"
        )
    if key.shape[head_axis] != kv_heads:
        raise RuntimeError(
            f"{op}: num_key_value_heads={num_key_value_heads} (-> {kv_heads}) but key has "
            f"{key.shape[head_axis]} heads (layout {layout})"
        )
    if key.shape != value.shape:
        raise RuntimeError(
            f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape"
        )
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"{op}: query head_dim {query.shape[-1]} and key head_dim {key.shape[-1]} differ")

    q_lens_arg = _int_list(op, "actual_seq_lengths", actual_seq_lengths)
    kv_lens_arg = _int_list(op, "actual_seq_lengths_kv", actual_seq_lengths_kv)

    user_mask = None
    if sparse_mode == 3:
        _check_compressed_mask(op, atten_mask, sparse_mode)
    elif atten_mask is not None:
        if layout == "TND":
            raise RuntimeError(
                f"{op}: with input_layout TND only sparse_mode=0 without a mask or sparse_mode=3"
            )
        user_mask = _fia_user_mask(atten_mask, query.shape[0], query.shape[1])

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
        kv_lens = _cumulative_to_lengths(op, "actual_seq_lengths_kv", kv_lens_arg, key.shape[0])
        q_parts = list(query.split(q_lens))
        k_parts, v_parts = list(key.split(kv_lens)), list(value.split(kv_lens))
    else:
        batch, s_q = query.shape[0], query.shape[1]
        if key.shape[0] != batch:
            raise RuntimeError(f"{op}: query batch {batch} and key batch {key.shape[0]} differ")
        q_lens = _fia_batch_lengths("actual_seq_lengths", q_lens_arg, batch, s_q)
        kv_lens = _fia_batch_lengths("actual_seq_lengths_kv", kv_lens_arg, batch, key.shape[1])
        q_parts = [query[b, :n] for b, n in enumerate(q_lens)]
        k_parts = [key[b, :n] for b, n in enumerate(kv_lens)]
        v_parts = [value[b, :n] for b, n in enumerate(kv_lens)]
    _check_fia_documented_limits(layout, query, key, num_heads, q_lens, kv_lens, sparse_mode)

    results = []
    for b, (qp, kp, vp) in enumerate(zip(q_parts, k_parts, v_parts)):
        mask_b = user_mask(b) if user_mask is not None else None
        visible = _fia_visible(sparse_mode, mask_b, qp.shape[0], kp.shape[0])
        results.append(
            _attend_segment(_Segment(qp.double(), kp.double(), vp.double(), visible), float(scale))
        )

    if layout == "TND":
        out = torch.cat([r.out for r in results])
        lse = torch.cat([r.lse.T for r in results])[..., None]
    else:
        out = torch.zeros(batch, s_q, num_heads, value.shape[-1], dtype=torch.float64)
        lse = torch.full((batch, num_heads, s_q), -math.inf, dtype=torch.float64)
        for b, (n, r) in enumerate(zip(q_lens, results)):
            out[b, :n] = r.out
            lse[b, :, :n] = r.lse
        lse = lse[..., None]
    out = out.to(dtype=query.dtype, device=query.device)
    if not softmax_lse_flag:
        return out, torch.zeros(1, dtype=torch.float32, device=query.device)
    return out, lse.to(dtype=torch.float32, device=query.device)


# ----------------------------------------------------------------------------------------------
# npu_fusion_attention


def _fusion_user_mask(mask: torch.Tensor, batch: int, heads: int, s_q: int, s_kv: int):
    """``sparse_mode`` 0 mask, bool or uint8 (docs l.1610): ``(b, head) -> bool [S_q, S_kv]``
    (True = masked)."""
    _check_mask_dtype(FUSION_OP, mask, (torch.bool, torch.uint8))
    m = mask.to(torch.bool)
    if m.dim() == 2 and tuple(m.shape) == (s_q, s_kv):
        return lambda b, n: m
    if m.dim() == 4 and tuple(m.shape[2:]) == (s_q, s_kv):
        if m.shape[0] in (1, batch) and m.shape[1] in (1, heads):
            return lambda b, n: m[b if m.shape[0] > 1 else 0, n if m.shape[1] > 1 else 0]
    raise RuntimeError(
        f"{FUSION_OP}: atten_mask shape {tuple(mask.shape)} does not fit; allowed: (S_q, S_kv), "
        f"(B|1, N|1, S_q, S_kv) with S_q={s_q}, S_kv={s_kv}"
    )


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
    sink=None,
    dropout_mask=None,
    seed=0,
    offset=0,
):
    """Emulates ``torch_npu.npu_fusion_attention`` (yaml:404, docs l.1592ff) -> ``(attention_out,
    softmax_max, softmax_sum, softmax_in, seed, offset, numels)``; see the module docstring."""
    op = FUSION_OP
    _require_unset(
        op, pse=pse, padding_mask=padding_mask, prefix=prefix, sink=sink, dropout_mask=dropout_mask
    )
    _require_default(
        op,
        pre_tockens=(pre_tockens, INT_MAX),
        next_tockens=(next_tockens, INT_MAX),
        seed=(seed, 0),
        offset=(offset, 0),
    )
    layout = input_layout
    _check_layout(op, layout, FUSION_LAYOUTS, FUSION_EMULATED_LAYOUTS)
    _check_qkv_basics(op, query, key, value, layout)
    _check_dtype(op, query, FUSION_DTYPES)
    if not 0.0 < float(keep_prob) <= 1.0:
        raise RuntimeError(f"{op}: keep_prob must be in (0, 1]; got {keep_prob}")
    if keep_prob != 1.0:
        raise NotImplementedError(f"fake {op}: dropout (keep_prob < 1) is not emulated")
    if not isinstance(head_num, int) or head_num < 1:
        raise RuntimeError(f"{op}: head_num must be a positive int; got {head_num!r}")
    _check_sparse_mode(op, sparse_mode, range(9))
    if softmax_layout != "":
        raise RuntimeError(f"{op}: softmax_layout {softmax_layout!r} is only valid as 'TND' with TND input")
    if key.shape[:-1] != value.shape[:-1]:
        raise RuntimeError(
            f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must agree but for D"
        )
    if actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise RuntimeError(f"{op}: actual_seq_qlen/actual_seq_kvlen are only used with input_layout TND")

    if query.shape[2] != head_num:
        raise RuntimeError(f"{op}: head_num={head_num} but query has {query.shape[2]} heads ({layout})")
    _check_heads(op, head_num, key.shape[2])
    if query.shape[0] != key.shape[0]:
        raise RuntimeError(f"{op}: query batch {query.shape[0]} and key batch {key.shape[0]} differ")
    if query.shape[-1] != key.shape[-1] or key.shape[-1] < value.shape[-1]:
        raise RuntimeError(f"{op}: head dims must satisfy D_q == D_k >= D_v")
    batch, s_q, s_kv = query.shape[0], query.shape[1], key.shape[1]

    user_mask = None
    if atten_mask is not None:
        if sparse_mode in (2, 3):
            _check_compressed_mask(op, atten_mask, sparse_mode)
        else:
            user_mask = _fusion_user_mask(atten_mask, batch, head_num, s_q, s_kv)

    results = []
    for b in range(batch):
        if atten_mask is None:  # docs l.1689: without a mask, sparse_mode is ignored
            visible = torch.ones(s_q, s_kv, dtype=torch.bool)
        elif sparse_mode == 3:
            visible = _bottom_right_causal(s_q, s_kv)
        elif atten_mask.dim() == 4 and atten_mask.shape[1] > 1:
            visible = ~torch.stack([user_mask(b, n) for n in range(head_num)])
        else:
            visible = ~user_mask(b, 0)
        segment = _Segment(query[b].double(), key[b].double(), value[b].double(), visible)
        results.append(_attend_segment(segment, float(scale)))

    out = torch.stack([r.out for r in results])
    row_max = torch.stack([r.row_max for r in results])  # [B, N, S]
    row_sum = torch.stack([r.row_sum for r in results])
    softmax_max = row_max[..., None].expand(*row_max.shape, 8).to(torch.float32).contiguous()
    softmax_sum = row_sum[..., None].expand(*row_sum.shape, 8).to(torch.float32).contiguous()
    softmax_in = torch.empty(0, dtype=query.dtype, device=query.device)
    out = out.to(dtype=query.dtype, device=query.device)
    return out, softmax_max.to(query.device), softmax_sum.to(query.device), softmax_in, 0, 0, 0


# ----------------------------------------------------------------------------------------------
# The fake module


def _with_strict_docs(module: types.ModuleType, fn: Callable) -> Callable:
    """``fn`` run with the documented FIA limits on or off as ``module.strict_docs`` says now."""

    @functools.wraps(fn)
    def op(*args, **kwargs):
        token = _STRICT_DOCS.set(bool(module.strict_docs))
        try:
            return fn(*args, **kwargs)
        finally:
            _STRICT_DOCS.reset(token)

    return op


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


def make_fake_torch_npu(*, strict_docs: bool = True, soc_version: int = 220) -> types.ModuleType:
    """A module named ``torch_npu`` with the emulated ops; every call is appended to ``module.calls``
    as a :class:`Call` ``(op_name, args, kwargs)`` so tests can assert the argument plumbing.

    ``module.strict_docs`` (read at each call; ``strict_docs`` sets it) applies FIA's documented
    limits: dtype, head_dim, head count and the TND domain. Turn it off to run the emulation's own
    math on float32 or small head dims. ``module.npu.get_soc_version()`` returns ``soc_version``
    (220: Atlas A2).
    """
    module = types.ModuleType("torch_npu", "Fake torch_npu (CPU emulation for attnbridge tests)")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    module.__version__ = "0.0.0+fake"
    module.strict_docs = strict_docs
    calls: list[Call] = []
    module.calls = calls
    ops: dict[str, Callable] = {
        FIA_OP: npu_fused_infer_attention_score,
        FUSION_OP: npu_fusion_attention,
        **_sparse_ops(),
    }
    for name, fn in ops.items():
        setattr(module, name, recorded(name, _with_strict_docs(module, fn), calls, "torch_npu"))
    module.npu = types.SimpleNamespace(get_soc_version=lambda: soc_version, is_available=lambda: False)
    return module
