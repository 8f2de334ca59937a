"""The Ascend call sites whose limits and fallbacks attnbridge applies itself, on the CPU emulation.

* FIA (``fa``): head size a multiple of 16 and at most 512, at most 64 query heads per key/value
  head, refused with a ValueError before the op runs; one compressed causal mask per device.
* Context-parallel prefill: FIA TND only for bfloat16 with head size 128/192 and at most 65,536
  tokens, otherwise one BSND causal FIA call per sequence; both equal per-sequence causal attention.
* Padded batches (``AttentionContext(key_lengths=...)``): ``fa`` through FIA's
  ``actual_seq_lengths_kv``, ``sdpa`` through an explicit ``[B, 1, S_q, S_kv]`` mask.
* Tiny Qwen-Image (joint attention, prompts of different lengths) and Qwen3-MoE (right and left
  padding) in bfloat16 on the emulated NPU, per sample equal to the unpatched model.

Tolerances (relative L2 against float64, or against the unpatched bfloat16 model): bfloat16
1.5e-2 (attention) / 2e-2 (whole models), float16 3e-3, float32 1e-5; LSE absolute 1e-4.
"""

from __future__ import annotations

import logging

import pytest
import torch

from attnbridge import attend, notices
from attnbridge.attention.backends import laser
from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.masks import npu_compressed_causal_mask
from attnbridge.attention.parallel import (
    build_zigzag_metadata,
    restore_natural_order,
    zigzag_cp_attention,
    zigzag_split,
)
from attnbridge.attention.parallel.cp_fia import FIA_TND_MAX_TOKENS, fia_tnd_refusal
from attnbridge.enable import enable_npu_attention
from attnbridge.tiny_models import tiny_qwen3_moe, tiny_qwen_image_transformer
from tests.emulation.reference import dense_reference, rel_l2
from tests.test_cp_fia import causal_reference
from tests.tiny_inputs import qwen_image_inputs

FIA = "npu_fused_infer_attention_score"
FUSION = "npu_fusion_attention"
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-5}
MODEL_TOL = 2e-2
LSE_ATOL = 1e-4
CAUSAL_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def _qkv(b, s_q, s_kv, h, h_kv, d, dtype=torch.bfloat16):
    return (
        torch.randn(b, s_q, h, d).to(dtype),
        torch.randn(b, s_kv, h_kv, d).to(dtype),
        torch.randn(b, s_kv, h_kv, d).to(dtype),
    )


def _op_calls(fake, name):
    return [kwargs for op, _, kwargs in fake.calls if op == name]


# ---------------------------------------------------------------------------------------------
# FIA's head limits (npu_fused_infer_attention_score docs l.8116, l.8210)


@pytest.mark.parametrize("head_dim", [72, 528])
def test_fa_on_npu_refuses_a_head_size_fia_does_not_take(fake_npu, head_dim):
    q, k, v = _qkv(1, 8, 8, 2, 2, head_dim)
    with pytest.raises(ValueError, match=f"head size {head_dim}; allowed: multiples of 16 up to 512"):
        attend(q, k, v, backend="fa", platform="npu")
    assert fake_npu.calls == []


def test_fa_on_npu_refuses_a_model_whose_head_size_fia_does_not_take_at_enable(fake_npu):
    """The model's config tells the head size: the refusal comes before anything is patched."""
    model = tiny_qwen3_moe(head_dim=72)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(
        ValueError, match="head size 72, which this model has; allowed: multiples of 16 up to 512"
    ):
        enable_npu_attention(model, "fa", platform="npu")
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert model.config._attn_implementation != "attnbridge_fa"


@pytest.mark.parametrize(
    ("heads", "head_dim", "message"),
    [
        (272, 16, "272 query heads; FIA takes at most 256"),
        (128, 512, "128 query heads x head size 512 must stay below 65535 in the BSND layout"),
    ],
)
def test_fa_on_npu_refuses_head_counts_fia_does_not_take(fake_npu, heads, head_dim, message):
    q, k, v = _qkv(1, 4, 4, heads, heads, head_dim)
    with pytest.raises(ValueError, match=message):
        attend(q, k, v, backend="fa", platform="npu")
    assert fake_npu.calls == []


def test_fa_on_npu_refuses_128_query_heads_per_key_value_head(fake_npu):
    q, k, v = _qkv(1, 8, 8, 128, 1, 16)
    with pytest.raises(ValueError, match="128 query heads per 1 key/value heads is a ratio above 64"):
        attend(q, k, v, backend="fa", platform="npu", causal=True)
    assert fake_npu.calls == []


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(64, 1, 16), (2, 2, 512)])
def test_fa_on_npu_runs_at_the_documented_limits(fake_npu, heads, kv_heads, head_dim):
    q, k, v = _qkv(1, 8, 8, heads, kv_heads, head_dim)
    out = attend(q, k, v, backend="fa", platform="npu")
    assert [op for op, _, _ in fake_npu.calls] == [FIA]
    assert rel_l2(out, dense_reference(q, k, v)[0]) < TOL[torch.bfloat16]


def test_fa_on_npu_passes_one_cached_causal_mask(fake_npu):
    q, k, v = _qkv(1, 8, 8, 2, 2, 16)
    attend(q, k, v, backend="fa", platform="npu", causal=True)
    attend(q, k, v, backend="fa", platform="npu", causal=True)
    first, second = _op_calls(fake_npu, FIA)
    assert first["atten_mask"] is second["atten_mask"] is npu_compressed_causal_mask(q.device)
    assert torch.equal(first["atten_mask"], CAUSAL_2048) and first["sparse_mode"] == 3


# ---------------------------------------------------------------------------------------------
# Context-parallel prefill: FIA TND where documented, else BSND per sequence


def _all_ranks(seq_lens, cp_size, dtype, head_dim, prefix_lens):
    """Every rank's CP output on the emulated NPU, restored to natural order, and the reference."""
    kv_tokens = sum(seq_lens) + sum(prefix_lens)
    q = torch.randn(sum(seq_lens), 4, head_dim).to(dtype)
    k, v = (torch.randn(kv_tokens, 2, head_dim).to(dtype) for _ in range(2))
    metas = [build_zigzag_metadata(seq_lens, r, cp_size, prefix_lens) for r in range(cp_size)]
    outs = [zigzag_cp_attention(zigzag_split(q, m), k, v, m, platform="npu") for m in metas]
    width = metas[0].max_rank_len
    padded = torch.cat([torch.cat([o, o.new_zeros(width - o.shape[0], *o.shape[1:])]) for o in outs])
    return restore_natural_order(padded, metas[0]), causal_reference(q, k, v, seq_lens, prefix_lens), metas


def test_cp_prefill_on_npu_runs_fia_tnd_for_bf16_head_size_128(fake_npu):
    seq_lens, cp_size = [5, 17, 9], 2
    out, want, _ = _all_ranks(seq_lens, cp_size, torch.bfloat16, 128, [0, 0, 0])
    assert out.dtype == torch.bfloat16 and rel_l2(out, want) < TOL[torch.bfloat16]
    calls = _op_calls(fake_npu, FIA)
    assert [op for op, _, _ in fake_npu.calls] == [FIA] * (2 * cp_size)  # a prev and a next half per rank
    assert {c["input_layout"] for c in calls} == {"TND"}
    assert all(c["sparse_mode"] == 3 and torch.equal(c["atten_mask"], CAUSAL_2048) for c in calls)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "prefix_lens"),
    [(torch.float16, 128, [0, 0, 0]), (torch.bfloat16, 64, [0, 0, 0]), (torch.float16, 64, [3, 0, 4])],
    ids=["fp16-d128", "bf16-d64", "fp16-d64-prefix"],
)
def test_cp_prefill_on_npu_outside_tnd_runs_bsnd_fia_per_sequence(
    fake_npu, dtype, head_dim, prefix_lens, caplog, monkeypatch
):
    """FIA TND is documented for bfloat16 with head size 128/192 only; other calls run one BSND
    causal FIA call per sequence and half, each with exactly that sequence's visible keys, and the
    user is told once why."""
    monkeypatch.setattr(notices, "_given", set())
    seq_lens, cp_size = [5, 17, 9], 2
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        out, want, metas = _all_ranks(seq_lens, cp_size, dtype, head_dim, prefix_lens)
    assert caplog.text.count("TND layout does not take") == 1, caplog.text
    reason = "dtype float16" if dtype == torch.float16 else f"head size {head_dim}"
    assert f"does not take {reason}" in caplog.text and "runs BSND causal FIA" in caplog.text
    assert out.dtype == dtype and rel_l2(out, want) < TOL[dtype]
    calls = [(args, kwargs) for op, args, kwargs in fake_npu.calls if op == FIA]
    assert len(calls) == len(fake_npu.calls) == 2 * cp_size * len(seq_lens)
    expected_shapes = [
        (q_len, kv_len)
        for m in metas
        for q_lens, kv_lens in ((m.actual_seq_q_prev, m.kv_len_prev), (m.actual_seq_q_next, m.kv_len_next))
        for q_len, kv_len in zip(q_lens, kv_lens)
    ]
    assert [(args[0].shape[1], args[1].shape[1]) for args, _ in calls] == expected_shapes
    for args, kwargs in calls:
        assert kwargs["input_layout"] == "BSND" and args[0].shape[0] == 1
        assert kwargs["sparse_mode"] == 3 and torch.equal(kwargs["atten_mask"], CAUSAL_2048)
        assert "actual_seq_lengths" not in kwargs and "actual_seq_lengths_kv" not in kwargs


def test_fia_tnd_is_used_up_to_65536_tokens():
    def tensor(tokens, dtype=torch.bfloat16, head_dim=128):
        return torch.empty(tokens, 2, head_dim, dtype=dtype, device="meta")

    assert fia_tnd_refusal(tensor(FIA_TND_MAX_TOKENS), tensor(FIA_TND_MAX_TOKENS)) is None
    assert fia_tnd_refusal(tensor(16, head_dim=192), tensor(16, head_dim=192)) is None
    assert (
        fia_tnd_refusal(tensor(16), tensor(FIA_TND_MAX_TOKENS + 1))
        == "65537 tokens (TND takes at most 65536)"
    )
    assert (
        fia_tnd_refusal(tensor(FIA_TND_MAX_TOKENS + 1), tensor(16))
        == "65537 tokens (TND takes at most 65536)"
    )
    assert fia_tnd_refusal(tensor(16, torch.float16), tensor(16, torch.float16)) == (
        "dtype float16 (TND takes bfloat16 only)"
    )
    assert fia_tnd_refusal(tensor(16, head_dim=64), tensor(16, head_dim=64)) == (
        "head size 64 (TND takes 128 or 192)"
    )


def test_cp_prefill_on_npu_refuses_a_head_size_fia_does_not_take_before_the_op(fake_npu):
    seq_lens = [8, 12]
    q, k, v = (torch.randn(20, 2, 72).half() for _ in range(3))
    meta = build_zigzag_metadata(seq_lens, 0, 2)
    with pytest.raises(ValueError, match="head size 72"):
        zigzag_cp_attention(zigzag_split(q, meta), k, v, meta, platform="npu")
    assert fake_npu.calls == []


def test_cp_prefill_on_npu_refuses_more_than_64_query_heads_per_kv_head_in_tnd(fake_npu):
    seq_lens = [8, 12]
    q = torch.randn(20, 130, 128).bfloat16()
    k, v = (torch.randn(20, 2, 128).bfloat16() for _ in range(2))
    meta = build_zigzag_metadata(seq_lens, 0, 2)
    with pytest.raises(ValueError, match="130 query heads per 2 key/value heads is a ratio above 64"):
        zigzag_cp_attention(zigzag_split(q, meta), k, v, meta, platform="npu")
    assert fake_npu.calls == []


# ---------------------------------------------------------------------------------------------
# Padded batches (key_lengths) on the NPU kernels

LENGTHS = [10, 7, 4]


def _padded(s_q, s_kv, dtype):
    q, k, v = _qkv(len(LENGTHS), s_q, s_kv, 4, 2, 64, dtype)
    return q, k, v, AttentionContext(key_lengths=torch.tensor(LENGTHS, dtype=torch.int32))


def _valid_reference(q, k, v, b, *, causal=False):
    """float64 attention of sample ``b`` over its valid keys only; causal: its valid queries too
    (right padding, S_q == S_kv, as in an LLM prefill)."""
    n = LENGTHS[b]
    rows = n if causal else q.shape[1]
    return dense_reference(q[b : b + 1, :rows], k[b : b + 1, :n], v[b : b + 1, :n], causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("s_q", "s_kv"), [(10, 10), (6, 10)], ids=["self", "cross"])
def test_fa_on_npu_padded_batch_passes_actual_seq_lengths_kv(fake_npu, dtype, s_q, s_kv):
    q, k, v, context = _padded(s_q, s_kv, dtype)
    out, lse = attend(q, k, v, backend="fa", platform="npu", context=context, return_lse=True)
    ((_, args, kwargs),) = fake_npu.calls
    assert kwargs["actual_seq_lengths_kv"] == LENGTHS
    assert all(type(n) is int for n in kwargs["actual_seq_lengths_kv"])  # host-side lengths
    assert kwargs["input_layout"] == "BSND" and kwargs.get("atten_mask") is None
    assert args[1].shape[1] == s_kv  # the padded keys go in; the lengths cut them
    for b in range(len(LENGTHS)):
        want_out, want_lse = _valid_reference(q, k, v, b)
        assert rel_l2(out[b : b + 1], want_out) < TOL[dtype], b
        torch.testing.assert_close(lse[b : b + 1].double(), want_lse, atol=LSE_ATOL, rtol=0)


def test_fa_on_npu_causal_padded_batch_matches_the_reference_on_the_valid_keys(fake_npu):
    q, k, v, context = _padded(10, 10, torch.bfloat16)
    out = attend(q, k, v, backend="fa", platform="npu", causal=True, context=context)
    cpu = attend(q, k, v, backend="fa", causal=True, context=context)
    for b in range(len(LENGTHS)):
        assert rel_l2(out[b : b + 1, : LENGTHS[b]], cpu[b : b + 1, : LENGTHS[b]]) < TOL[torch.bfloat16], b
        want = _valid_reference(q, k, v, b, causal=True)[0]
        assert rel_l2(out[b : b + 1, : LENGTHS[b]], want) < TOL[torch.bfloat16], b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("s_q", "s_kv", "causal"),
    [(10, 10, False), (6, 10, False), (10, 10, True)],
    ids=["self", "cross", "causal"],
)
def test_sdpa_on_npu_padded_batch_passes_an_explicit_mask(fake_npu, dtype, s_q, s_kv, causal):
    q, k, v, context = _padded(s_q, s_kv, dtype)
    out = attend(q, k, v, backend="sdpa", platform="npu", causal=causal, context=context)
    ((_, _, kwargs),) = fake_npu.calls
    mask = kwargs["atten_mask"]
    assert mask.dtype == torch.bool and mask.shape == (len(LENGTHS), 1, s_q, s_kv)
    assert kwargs.get("sparse_mode", 0) == 0  # the explicit mask, not the compressed causal one
    cols, rows = torch.arange(s_kv), torch.arange(s_q)[:, None]
    for b, n in enumerate(LENGTHS):
        visible = (cols < n).expand(s_q, s_kv)
        if causal:
            visible = visible & (cols <= rows + s_kv - s_q)
        assert torch.equal(mask[b, 0], ~visible), b  # True = masked
        rows_b = slice(0, n) if causal else slice(None)
        want = _valid_reference(q, k, v, b, causal=causal)[0]
        assert rel_l2(out[b : b + 1, rows_b], want) < TOL[dtype], b


# ---------------------------------------------------------------------------------------------
# Tiny models in bfloat16 on the emulated NPU


def _bf16(inputs):
    return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("backend", ["fa", "sdpa"])
def test_qwen_image_prompts_of_different_lengths_on_npu_match_unpatched(fake_npu, backend):
    model = tiny_qwen_image_transformer(head_dim=64).to(torch.bfloat16)
    inputs = _bf16(qwen_image_inputs(batch=2, text_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])))
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        enable_npu_attention(model, backend, platform="npu")
        patched = model(**inputs, return_dict=False)[0]
    for b in range(2):
        assert rel_l2(patched[b], reference[b]) < MODEL_TOL, b
    op = FIA if backend == "fa" else FUSION
    calls = _op_calls(fake_npu, op)
    assert len(calls) == len(fake_npu.calls) == 2  # one per block
    for kwargs in calls:
        if backend == "fa":
            assert kwargs["actual_seq_lengths_kv"] == [12 + 5, 12 + 3]  # image tokens, then text
        else:
            assert kwargs["atten_mask"].shape == (2, 1, 17, 17)


@pytest.mark.parametrize(
    ("backend", "kernel"),
    [("block_sparse", "ada_block_sparse_attention"), ("rain_fusion", "npu_block_sparse_attention")],
)
def test_sparse_backends_on_npu_say_at_enable_that_padded_calls_run_dense(fake_npu, backend, kernel, caplog):
    """The NPU block-sparse kernels take no key lengths: padded calls run dense FIA, said once, when
    the model is patched, and not at every call."""
    model = tiny_qwen_image_transformer(head_dim=64).to(torch.bfloat16)
    inputs = _bf16(qwen_image_inputs(batch=2, text_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])))
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        enable_npu_attention(model, backend, platform="npu")
        assert caplog.text.count("padded keys") == 1 and kernel in caplog.text, caplog.text
        caplog.clear()
        with torch.no_grad():
            model(**inputs, return_dict=False)
    assert "padded" not in caplog.text
    assert {op for op, _, _ in fake_npu.calls} == {FIA}


def test_a_model_enabled_on_the_cpu_is_told_what_the_npu_kernel_does_with_padding(
    fake_npu, caplog, monkeypatch
):
    """Enabled on the CPU of an Ascend machine (then moved to the NPU): the NPU kernel's padding
    fallback is said at enable, although the CPU kernel takes padding."""
    from attnbridge.adapters import layers
    from attnbridge.platforms import PLATFORMS

    monkeypatch.setattr(layers, "detect_platform", lambda: PLATFORMS["npu"])  # an Ascend machine
    model = tiny_qwen_image_transformer(head_dim=64)
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        enable_npu_attention(model, "block_sparse")
    assert "ada_block_sparse_attention (BNSD) takes no key lengths" in caplog.text, caplog.text


def _padded_ids(side):
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row, n in enumerate([0, 3, 5]):
        if n:
            cols = slice(0, n) if side == "left" else slice(-n, None)
            mask[row, cols] = 0
            ids[row, cols] = 0
    return ids, mask


@pytest.mark.parametrize(
    ("side", "backend"),
    [
        ("right", "sdpa"),
        ("right", "fa"),
        ("left", "sdpa"),
        ("left", "fa"),
    ],
)
def test_qwen3_moe_padded_batch_on_npu_matches_unpatched(fake_npu, side, backend):
    """Right padding runs the backend with key lengths (causal); left padding is not a suffix of the
    keys and runs transformers' own SDPA, as unpatched."""
    model = tiny_qwen3_moe(head_dim=64).to(torch.bfloat16)
    ids, mask = _padded_ids(side)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        enable_npu_attention(model, backend, platform="npu")
        patched = model(input_ids=ids, attention_mask=mask).logits
    for b in range(3):
        valid = mask[b].bool()
        assert rel_l2(patched[b][valid], reference[b][valid]) < MODEL_TOL, b
    if side == "left":
        assert fake_npu.calls == []
        return
    assert [op for op, _, _ in fake_npu.calls] == [FIA if backend == "fa" else FUSION] * 2  # one per layer


# ---------------------------------------------------------------------------------------------
# Laser's stated kernel semantics


def test_laser_states_how_the_kernel_reads_pre_tokens():
    """``pre_tokens`` masks the zero-padded tail keys (sgl-kernel-npu ``VectorForward.h``) and the
    tiling reads no ``next_tokens`` (``laser_attention_tiling.cpp``): stated, not assumed."""
    text = laser.__doc__
    assert "VectorForward.h" in text and "laser_attention_tiling.cpp" in text
    assert "never reads ``next_tokens``" in text
    for stale in ("ASSUMED", "not confirmed", "NOT confirmed"):
        assert stale not in text
