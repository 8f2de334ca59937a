"""The CPU emulation of the Ascend attention ops, and the float64 reference, are themselves right.

Everything the NPU tests conclude rests on these two, so each is checked against something
independent: the reference against brute-force loops and torch SDPA, the emulated ops against the
reference, in every layout attnbridge calls. Each emulated op is also held to the limits its sources
state (rejections), and refuses what it does not emulate. Tolerances (relative L2 of the output):
float32 1e-5, bfloat16 2e-2, float16 3e-3; LSE absolute 1e-5 (float32 outputs of float64 math).
"""

from __future__ import annotations

import inspect
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.emulation import fake_attentions_ops as ops
from tests.emulation import fake_torch_npu, fake_torch_npu_sparse
from tests.emulation.fake_torch_npu import SPARSE_MODULE, make_fake_torch_npu
from tests.emulation.fake_torch_npu_sparse import npu_block_sparse_attention
from tests.emulation.fixtures import KERNEL_LAYOUTS, fake_npu_layout  # noqa: F401 (fixture)
from tests.emulation.install import LAYOUTS, installed_fake_npu
from tests.emulation.reference import dense_reference, rel_l2

FP32_TOL = 1e-5
BF16_TOL = 2e-2
FP16_TOL = 3e-3
LSE_ATOL = 1e-5
CAUSAL_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
NO_PAD = 2**31 - 1

# (B, S_q, S_kv, H_q, H_kv, D): self-attention, GQA, cross-attention with S_q < S_kv and S_q > S_kv.
SHAPES = [
    (2, 9, 9, 4, 4, 16),
    (2, 11, 11, 8, 2, 8),
    (1, 7, 19, 6, 3, 16),
    (2, 13, 6, 4, 1, 8),
]


@pytest.fixture
def npu():
    """The fake with FIA's documented limits off, so the emulation's math runs on float32 and small
    head dims and is held to 1e-5."""
    return make_fake_torch_npu(strict_docs=False)


def _qkv(b, s_q, s_kv, h, h_kv, d, dtype=torch.float32):
    return (
        torch.randn(b, s_q, h, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
    )


def _bnsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def _assert_lse(lse: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal where finite, and -inf exactly where the reference row sees no key."""
    torch.testing.assert_close(lse.to(torch.float64), expected, atol=LSE_ATOL, rtol=0)


def _cumulative(lengths):
    return [sum(lengths[: i + 1]) for i in range(len(lengths))]


def _packed(q_lens, kv_lens, h, h_kv, d, dtype=torch.float32):
    """Per-sequence BSHD tensors and their TND concatenation."""
    seqs = [_qkv(1, sq, skv, h, h_kv, d, dtype) for sq, skv in zip(q_lens, kv_lens)]
    return seqs, tuple(torch.cat([s[i][0] for s in seqs]) for i in range(3))


def _block_reference(q, k, v, block_mask, block_size, scale, causal=False):
    """float64 BSHD attention over the kept blocks of ``block_mask`` [B, H, nq, nk]; the test's own
    expansion of the blocks, independent of the emulation's."""
    s_q, s_kv = q.shape[1], k.shape[1]
    rows, cols = torch.arange(s_q) // block_size, torch.arange(s_kv) // block_size
    visible = block_mask[:, :, rows][..., cols]
    if causal:
        visible = visible & (torch.arange(s_kv)[None, :] <= torch.arange(s_q)[:, None])
    group = q.shape[2] // k.shape[2]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1).nan_to_num(0.0), v64)
    return out, lse


# ------------------------------------------------------------------------------------------------
# The reference


def _brute_force(q, k, v, *, causal, scale, kv_lengths):
    """Attention by explicit loops over scalars: slow, but nothing shared with the reference."""
    b_, s_q, h_, d_ = q.shape
    h_kv, d_v = k.shape[2], v.shape[3]
    out = torch.zeros(b_, s_q, h_, d_v, dtype=torch.float64)
    lse = torch.full((b_, h_, s_q), -math.inf, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            hk = h // (h_ // h_kv)
            for i in range(s_q):
                keys = [j for j in range(kv_lengths[b]) if not causal or j <= i + kv_lengths[b] - s_q]
                if not keys:
                    continue
                logits = {
                    j: scale * sum(float(q[b, i, h, c]) * float(k[b, j, hk, c]) for c in range(d_))
                    for j in keys
                }
                top = max(logits.values())
                total = sum(math.exp(x - top) for x in logits.values())
                lse[b, h, i] = top + math.log(total)
                for j in keys:
                    out[b, i, h] += math.exp(logits[j] - top) / total * v[b, j, hk].double()
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q, s_kv, kv_lengths", [(3, 3, [3, 2]), (2, 5, [5, 4]), (4, 3, [3, 3])])
def test_reference_matches_brute_force_loops(causal, s_q, s_kv, kv_lengths):
    q, k, v = _qkv(2, s_q, s_kv, 4, 2, 3, torch.float64)
    out, lse = dense_reference(q, k, v, causal=causal, scale=0.7, kv_lengths=kv_lengths)
    want_out, want_lse = _brute_force(q, k, v, causal=causal, scale=0.7, kv_lengths=kv_lengths)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    assert out.dtype == lse.dtype == torch.float64
    assert out.shape == (2, s_q, 4, 3) and lse.shape == (2, 4, s_q)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_sdpa(causal):
    q, k, v = _qkv(2, 10, 10, 8, 2, 16, torch.float64)
    out, _ = dense_reference(q, k, v, causal=causal)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    assert rel_l2(out, want) < 1e-12


def test_rel_l2_measures_relative_error():
    expected = torch.tensor([3.0, 4.0])
    assert rel_l2(expected + torch.tensor([0.3, 0.4]), expected) == pytest.approx(0.1)
    assert rel_l2(expected, expected) == 0.0


# ------------------------------------------------------------------------------------------------
# npu_fused_infer_attention_score


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fia_matches_reference(npu, causal, shape):
    b, s_q, s_kv, h, h_kv, d = shape
    q, k, v = _qkv(*shape)
    extra = {"atten_mask": CAUSAL_2048, "sparse_mode": 3} if causal else {}
    out, lse = npu.npu_fused_infer_attention_score(
        q,
        k,
        v,
        num_heads=h,
        num_key_value_heads=h_kv,
        input_layout="BSND",
        scale=0.3,
        softmax_lse_flag=True,
        **extra,
    )
    want_out, want_lse = dense_reference(q, k, v, causal=causal, scale=0.3)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel_l2(out, want_out) < FP32_TOL
    assert lse.shape == (b, h, s_q, 1) and lse.dtype == torch.float32
    _assert_lse(lse[..., 0], want_lse)


def test_fia_bfloat16_within_tolerance():
    npu = make_fake_torch_npu()  # strict: bf16 and D=32 are in FIA's documented domain
    q, k, v = _qkv(2, 21, 33, 8, 2, 32, torch.bfloat16)
    out, lse = npu.npu_fused_infer_attention_score(
        q,
        k,
        v,
        num_heads=8,
        num_key_value_heads=2,
        input_layout="BSND",
        scale=32**-0.5,
        atten_mask=CAUSAL_2048,
        sparse_mode=3,
        softmax_lse_flag=True,
    )
    want_out, want_lse = dense_reference(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, want_out) < BF16_TOL
    _assert_lse(lse[..., 0], want_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_fia_tnd_uneven_cumulative_lengths(npu, causal):
    """Causal as the CP prefill calls it: sparse_mode 3 with next_tokens=0, which FIA ignores there."""
    q_lens, kv_lens, h, h_kv, d = [5, 17, 9], [7, 17, 12], 4, 2, 16
    seqs, (q, k, v) = _packed(q_lens, kv_lens, h, h_kv, d)
    extra = {"atten_mask": CAUSAL_2048, "sparse_mode": 3, "next_tokens": 0} if causal else {}
    out, lse = npu.npu_fused_infer_attention_score(
        q,
        k,
        v,
        num_heads=h,
        num_key_value_heads=h_kv,
        input_layout="TND",
        scale=0.25,
        softmax_lse_flag=True,
        actual_seq_lengths=_cumulative(q_lens),
        actual_seq_lengths_kv=_cumulative(kv_lens),
        **extra,
    )
    assert out.shape == (31, h, d) and lse.shape == (31, h, 1)
    start = 0
    for (sq, sk, sv), n in zip(seqs, q_lens):
        want_out, want_lse = dense_reference(sq, sk, sv, causal=causal, scale=0.25)
        assert rel_l2(out[start : start + n], want_out[0]) < FP32_TOL
        _assert_lse(lse[start : start + n, :, 0].T, want_lse[0])
        start += n


@pytest.mark.parametrize("head_dim", [128, 192])
def test_fia_tnd_runs_gqa_and_equal_lengths_as_vllm_ascend_does(head_dim):
    """Strict docs still take GQA and q_len == kv_len with sparse_mode 3 (the docs say Q_N == K_N and
    q_len < kv_len; vllm-ascend and sglang call it so)."""
    q_lens, kv_lens = [6, 9], [6, 14]
    seqs, (q, k, v) = _packed(q_lens, kv_lens, 4, 2, head_dim, torch.bfloat16)
    out, _ = make_fake_torch_npu().npu_fused_infer_attention_score(
        q,
        k,
        v,
        num_heads=4,
        num_key_value_heads=2,
        input_layout="TND",
        scale=head_dim**-0.5,
        atten_mask=CAUSAL_2048,
        sparse_mode=3,
        actual_seq_lengths=_cumulative(q_lens),
        actual_seq_lengths_kv=_cumulative(kv_lens),
    )
    want = torch.cat([dense_reference(*s, causal=True)[0][0] for s in seqs])
    assert out.dtype == torch.bfloat16 and rel_l2(out, want) < BF16_TOL


@pytest.mark.parametrize("mask_kind", ["2d", "3d_uint8", "4d_padded_int8"])
def test_fia_sparse_mode_0_applies_the_mask_as_given(npu, mask_kind):
    b, s_q, s_kv, h, d = 2, 6, 10, 4, 8
    q, k, v = _qkv(b, s_q, s_kv, h, h, d)
    kv_lengths = [10, 7]
    padding = torch.arange(s_kv)[None, None, :] >= torch.tensor(kv_lengths)[:, None, None]  # True = masked
    causal = torch.arange(s_kv)[None, :] > torch.arange(s_q)[:, None] + (s_kv - s_q)
    if mask_kind == "2d":  # one causal mask for every batch
        mask, want = causal, dense_reference(q, k, v, causal=True, scale=0.5)
    elif mask_kind == "3d_uint8":  # per-batch key padding
        mask = padding.expand(b, s_q, s_kv).to(torch.uint8)
        want = dense_reference(q, k, v, scale=0.5, kv_lengths=kv_lengths)
    else:  # [B, 1, S_q', S_kv'] rounded up to 16, as the docs allow
        mask = torch.ones(b, 1, 16, 16, dtype=torch.int8)
        mask[:, 0, :s_q, :s_kv] = padding.expand(b, s_q, s_kv).to(torch.int8)
        want = dense_reference(q, k, v, scale=0.5, kv_lengths=kv_lengths)
    out, lse = npu.npu_fused_infer_attention_score(
        q,
        k,
        v,
        num_heads=h,
        input_layout="BSND",
        scale=0.5,
        atten_mask=mask,
        sparse_mode=0,
        softmax_lse_flag=True,
    )
    assert rel_l2(out, want[0]) < FP32_TOL
    _assert_lse(lse[..., 0], want[1])


def test_fia_actual_seq_lengths_limit_each_batch(npu):
    b, s_q, s_kv, h, d = 2, 8, 12, 2, 8
    q, k, v = _qkv(b, s_q, s_kv, h, h, d)
    out, lse = npu.npu_fused_infer_attention_score(
        q,
        k,
        v,
        num_heads=h,
        input_layout="BSND",
        scale=0.4,
        softmax_lse_flag=True,
        actual_seq_lengths=[8, 5],
        actual_seq_lengths_kv=[12, 9],
    )
    want_out, want_lse = dense_reference(q, k, v, scale=0.4, kv_lengths=[12, 9])
    assert rel_l2(out[0], want_out[0]) < FP32_TOL
    assert rel_l2(out[1, :5], want_out[1, :5]) < FP32_TOL
    assert torch.all(out[1, 5:] == 0) and torch.all(lse[1, :, 5:] == -math.inf)
    _assert_lse(lse[1, :, :5, 0], want_lse[1, :, :5])


def test_fia_lse_is_a_zero_placeholder_without_the_flag(npu):
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    out, lse = npu.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")
    assert lse.shape == (1,) and lse.dtype == torch.float32 and lse.item() == 0.0
    assert rel_l2(out, dense_reference(q, k, v, scale=1.0)[0]) < FP32_TOL  # default scale is 1.0


def _fia_bad_calls():
    q, k, v = _qkv(2, 6, 6, 4, 2, 8)
    tq, tk, tv = q.reshape(12, 4, 8), k.reshape(12, 2, 8), v.reshape(12, 2, 8)
    fia = {"num_heads": 4, "num_key_value_heads": 2, "input_layout": "BSND"}
    tnd = {"num_heads": 4, "num_key_value_heads": 2, "input_layout": "TND"}
    return {
        "unknown layout": ((q, k, v), {**fia, "input_layout": "BHSD"}, "input_layout 'BHSD'"),
        "lower-case layout": ((q, k, v), {**fia, "input_layout": "bsnd"}, "input_layout 'bsnd'"),
        "num_heads disagrees with query": ((q, k, v), {**fia, "num_heads": 2}, "num_heads=2"),
        "kv heads disagree with key": ((q, k, v), {**fia, "num_key_value_heads": 0}, "num_key_value_heads"),
        "heads not divisible": (
            (q, k[:, :, :1].expand(2, 6, 3, 8).contiguous(), v[:, :, :1].expand(2, 6, 3, 8).contiguous()),
            {**fia, "num_key_value_heads": 3},
            "multiple",
        ),
        "TND lengths not cumulative": (
            (tq, tk, tv),
            {**tnd, "actual_seq_lengths": [5, 4, 3], "actual_seq_lengths_kv": [5, 4, 3]},
            "cumulative",
        ),
        "TND per-sequence lengths": (
            (tq, tk, tv),
            {**tnd, "actual_seq_lengths": [3, 4, 5], "actual_seq_lengths_kv": [3, 4, 5]},
            "cumulative",
        ),
        # FIA's lists must be non-decreasing; trailing zeros (skipped batches) are fusion attention's.
        "TND trailing zero": (
            (tq, tk, tv),
            {**tnd, "actual_seq_lengths": [6, 12, 0], "actual_seq_lengths_kv": [6, 12, 0]},
            "non-decreasing",
        ),
        "TND without lengths": ((tq, tk, tv), tnd, "needs actual_seq_lengths"),
        "TND list lengths differ": (
            (tq, tk, tv),
            {**tnd, "actual_seq_lengths": [6, 12], "actual_seq_lengths_kv": [4, 8, 12]},
            "one entry per sequence",
        ),
        "TND with a full mask": (
            (tq, tk, tv),
            {
                **tnd,
                "actual_seq_lengths": [6, 12],
                "actual_seq_lengths_kv": [6, 12],
                "atten_mask": torch.zeros(6, 6, dtype=torch.bool),
            },
            "TND",
        ),
        "sparse_mode 5": ((q, k, v), {**fia, "sparse_mode": 5}, "sparse_mode 5 is not supported"),
        "sparse_mode 3 without mask": ((q, k, v), {**fia, "sparse_mode": 3}, "compressed atten_mask"),
        "sparse_mode 3 small mask": (
            (q, k, v),
            {**fia, "sparse_mode": 3, "atten_mask": torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)},
            "2048",
        ),
        "sparse_mode 3 lower mask": (
            (q, k, v),
            {**fia, "sparse_mode": 3, "atten_mask": ~CAUSAL_2048},
            "triu",
        ),
        "float mask": ((q, k, v), {**fia, "atten_mask": torch.zeros(6, 6)}, "dtype"),
        "actual length too long": ((q, k, v), {**fia, "actual_seq_lengths_kv": [7, 6]}, "exceeds"),
        "non-contiguous query": ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v), fia, "contiguous"),
    }


_FIA_BAD = _fia_bad_calls()


@pytest.mark.parametrize("case", list(_FIA_BAD), ids=list(_FIA_BAD))
def test_fia_rejects_what_the_real_op_rejects(npu, case):
    args, kwargs, message = _FIA_BAD[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        npu.npu_fused_infer_attention_score(*args, **kwargs)


def test_fia_actual_lengths_list_shorter_than_batch_is_rejected(npu):
    q, k, v = _qkv(3, 6, 6, 2, 2, 8)
    with pytest.raises(RuntimeError, match="needs 1 or >= batch"):
        npu.npu_fused_infer_attention_score(
            q, k, v, num_heads=2, input_layout="BSND", actual_seq_lengths_kv=[6, 6]
        )


def _fia_out_of_docs_calls():
    """(args, kwargs, message) per documented FIA limit; each call is valid but for that limit."""

    def bsnd(h, d, dtype=torch.bfloat16, h_kv=None):
        return _qkv(1, 3, 5, h, h_kv or h, d, dtype), {"num_heads": h, "input_layout": "BSND"}

    def tnd(d, dtype=torch.bfloat16, q_lens=(4, 6), kv_lens=(4, 6)):
        _, qkv = _packed(q_lens, kv_lens, 2, 2, d, dtype)
        lengths = {"actual_seq_lengths": _cumulative(q_lens), "actual_seq_lengths_kv": _cumulative(kv_lens)}
        return qkv, {"num_heads": 2, "input_layout": "TND", **lengths}

    causal = {"atten_mask": CAUSAL_2048, "sparse_mode": 3}
    cases = {
        "float32": (*bsnd(2, 16, torch.float32), "float16, bfloat16"),
        "head_dim 72": (*bsnd(2, 72), "multiple of 16"),
        "head_dim 528": (*bsnd(1, 528), "<= 512"),
        "272 heads": (*bsnd(272, 16, h_kv=272), "<= 256"),
        "BSND N*D 65536": (*bsnd(256, 256), "N\\*D < 65535"),
        "TND float16": (*tnd(128, torch.float16), "bfloat16"),
        "TND head_dim 64": (*tnd(64), "128 or 192"),
        "TND q longer than kv": (*tnd(128, q_lens=(5, 6), kv_lens=(4, 6)), "query length <= its key length"),
    }
    cases["TND q longer than kv"][1].update(causal)
    return cases


_FIA_OUT_OF_DOCS = _fia_out_of_docs_calls()


@pytest.mark.parametrize("case", list(_FIA_OUT_OF_DOCS), ids=list(_FIA_OUT_OF_DOCS))
def test_fia_strict_docs_refuse_what_the_docs_rule_out(case):
    """Strict by default; with ``strict_docs`` off the same call computes."""
    args, kwargs, message = _FIA_OUT_OF_DOCS[case]
    fake = make_fake_torch_npu()
    with pytest.raises(RuntimeError, match=message):
        fake.npu_fused_infer_attention_score(*args, **kwargs)
    fake.strict_docs = False
    out, _ = fake.npu_fused_infer_attention_score(*args, **kwargs)
    assert out.shape == args[0].shape


def test_fia_strict_docs_cap_tnd_at_65536_tokens():
    q = torch.zeros(65537, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="T must be <= 65536"):
        make_fake_torch_npu().npu_fused_infer_attention_score(
            q,
            q,
            q,
            num_heads=1,
            input_layout="TND",
            actual_seq_lengths=[65537],
            actual_seq_lengths_kv=[65537],
        )


def test_fia_strict_docs_follow_the_fixture(fake_npu):
    """The fixture's fake is strict; a test can switch it off for the call it needs."""
    q, k, v = _qkv(1, 4, 4, 2, 2, 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        fake_npu.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")
    fake_npu.strict_docs = False
    fake_npu.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")


def _fia_not_emulated_calls():
    """(args, kwargs, message) per input FIA documents and attnbridge never passes."""
    q, k, v = _qkv(2, 3, 128, 2, 2, 16)
    fia = {"num_heads": 2, "input_layout": "BSND"}
    full_mask = torch.zeros(3, 128, dtype=torch.bool)
    return {
        "paged KV": (
            (q, k, v),
            {**fia, "block_table": torch.zeros(2, 1, dtype=torch.int32)},
            "block_table is not emulated",
        ),
        "block_size": ((q, k, v), {**fia, "block_size": 128}, "block_size=128 is not emulated"),
        "BSH": (
            (q.flatten(2), k.flatten(2), v.flatten(2)),
            {**fia, "input_layout": "BSH"},
            "input_layout 'BSH' is not emulated",
        ),
        "BNSD": (
            (_bnsd(q), _bnsd(k), _bnsd(v)),
            {**fia, "input_layout": "BNSD"},
            "input_layout 'BNSD' is not emulated",
        ),
        "sparse_mode 1": (
            (q, k, v),
            {**fia, "sparse_mode": 1, "atten_mask": full_mask},
            "sparse_mode 1 is not emulated",
        ),
        "sparse_mode 2": (
            (q, k, v),
            {**fia, "sparse_mode": 2, "atten_mask": CAUSAL_2048},
            "sparse_mode 2 is not emulated",
        ),
        "sparse_mode 4": (
            (q, k, v),
            {**fia, "sparse_mode": 4, "atten_mask": CAUSAL_2048},
            "sparse_mode 4 is not emulated",
        ),
        "sparse_mode 0 pre_tokens band": (
            (q, k, v),
            {**fia, "atten_mask": full_mask, "pre_tokens": 0},
            "pre_tokens=0 is not emulated",
        ),
        "sparse_mode 0 next_tokens band": (
            (q, k, v),
            {**fia, "next_tokens": 0},
            "next_tokens=0 is not emulated",
        ),
    }


_FIA_NOT_EMULATED = _fia_not_emulated_calls()


@pytest.mark.parametrize("case", list(_FIA_NOT_EMULATED), ids=list(_FIA_NOT_EMULATED))
def test_fia_refuses_what_it_does_not_emulate(npu, case):
    args, kwargs, message = _FIA_NOT_EMULATED[case]
    with pytest.raises(NotImplementedError, match=message):
        npu.npu_fused_infer_attention_score(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# npu_fusion_attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fusion_attention_matches_reference(npu, causal, shape):
    b, s_q, s_kv, h, h_kv, d = shape
    q, k, v = _qkv(*shape)
    extra = {"atten_mask": CAUSAL_2048, "sparse_mode": 3} if causal else {}
    out, softmax_max, softmax_sum, softmax_in, seed, offset, numels = npu.npu_fusion_attention(
        q, k, v, h, "BSND", scale=0.3, **extra
    )
    want_out, want_lse = dense_reference(q, k, v, causal=causal, scale=0.3)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel_l2(out, want_out) < FP32_TOL
    for stat in (softmax_max, softmax_sum):
        assert stat.shape == (b, h, s_q, 8) and stat.dtype == torch.float32
        assert torch.equal(stat, stat[..., :1].expand_as(stat))  # one value replicated 8 times
    _assert_lse(softmax_max[..., 0].double() + softmax_sum[..., 0].double().log(), want_lse)
    assert softmax_in.numel() == 0 and (seed, offset, numels) == (0, 0, 0)


def test_fusion_attention_bfloat16_within_tolerance():
    npu = make_fake_torch_npu()
    q, k, v = _qkv(2, 25, 25, 4, 2, 64, torch.bfloat16)
    out = npu.npu_fusion_attention(
        q, k, v, head_num=4, input_layout="BSND", scale=0.125, atten_mask=CAUSAL_2048, sparse_mode=3
    )[0]
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, dense_reference(q, k, v, causal=True, scale=0.125)[0]) < BF16_TOL


@pytest.mark.parametrize("mask_shape", ["SS", "B1SS", "BNSS"])
def test_fusion_attention_sparse_mode_0_applies_the_mask_as_given(npu, mask_shape):
    b, s_q, s_kv, h, d = 2, 5, 9, 4, 8
    q, k, v = _qkv(b, s_q, s_kv, h, h, d)
    kv_lengths = [6, 9] if mask_shape != "SS" else [6, 6]
    padding = torch.arange(s_kv)[None, :] >= torch.tensor(kv_lengths)[:, None]  # [B, S_kv], True = masked
    mask = {
        "SS": padding[0].expand(s_q, s_kv),
        "B1SS": padding[:, None, None, :].expand(b, 1, s_q, s_kv).to(torch.uint8),
        "BNSS": padding[:, None, None, :].expand(b, h, s_q, s_kv),
    }[mask_shape]
    out = npu.npu_fusion_attention(q, k, v, h, "BSND", atten_mask=mask.contiguous(), scale=0.5)[0]
    assert rel_l2(out, dense_reference(q, k, v, scale=0.5, kv_lengths=kv_lengths)[0]) < FP32_TOL


def test_fusion_attention_without_mask_ignores_sparse_mode(npu):
    """Documented: with atten_mask None, sparse_mode has no effect."""
    q, k, v = _qkv(1, 8, 8, 2, 2, 8)
    out = npu.npu_fusion_attention(q, k, v, 2, "BSND", scale=0.5, sparse_mode=3)[0]
    assert rel_l2(out, dense_reference(q, k, v, causal=False, scale=0.5)[0]) < FP32_TOL


def _fusion_bad_calls():
    q, k, v = _qkv(2, 6, 6, 4, 2, 8)
    return {
        "unknown layout": ((q, k, v, 4, "BHSD"), {}, "input_layout 'BHSD'"),
        "head_num disagrees with query": ((q, k, v, 2, "BSND"), {}, "head_num=2"),
        "GQA heads not divisible": ((q[:, :, :3].contiguous(), k, v, 3, "BSND"), {}, "multiple"),
        "lengths with a padded layout": (
            (q, k, v, 4, "BSND"),
            {"actual_seq_qlen": [6, 12], "actual_seq_kvlen": [6, 12]},
            "only used with input_layout TND",
        ),
        "softmax_layout TND with BSND": ((q, k, v, 4, "BSND"), {"softmax_layout": "TND"}, "softmax_layout"),
        "sparse_mode 9": ((q, k, v, 4, "BSND"), {"sparse_mode": 9}, "sparse_mode 9 is not supported"),
        "sparse_mode 3 small mask": (
            (q, k, v, 4, "BSND"),
            {"sparse_mode": 3, "atten_mask": torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)},
            "2048",
        ),
        "mask of the wrong size": (
            (q, k, v, 4, "BSND"),
            {"atten_mask": torch.zeros(6, 7, dtype=torch.bool)},
            "does not fit",
        ),
        "int8 mask": ((q, k, v, 4, "BSND"), {"atten_mask": torch.zeros(6, 6, dtype=torch.int8)}, "dtype"),
        "float64": ((q.double(), k.double(), v.double(), 4, "BSND"), {}, "float16, bfloat16, float32"),
    }


_FUSION_BAD = _fusion_bad_calls()


@pytest.mark.parametrize("case", list(_FUSION_BAD), ids=list(_FUSION_BAD))
def test_fusion_attention_rejects_what_the_real_op_rejects(npu, case):
    args, kwargs, message = _FUSION_BAD[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        npu.npu_fusion_attention(*args, **kwargs)


def test_fusion_attention_dropout_is_not_silently_ignored(npu):
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(NotImplementedError, match="keep_prob"):
        npu.npu_fusion_attention(q, k, v, 2, "BSND", keep_prob=0.9)


def _fusion_not_emulated_calls():
    """(args, kwargs, message) per input fusion attention documents and attnbridge never passes."""
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    bsnd = (q, k, v, 2, "BSND")
    full_mask = torch.zeros(4, 4, dtype=torch.bool)
    flat = (q.flatten(2), k.flatten(2), v.flatten(2), 2)
    cases = {
        "TND": (
            (q[0], k[0], v[0], 2, "TND"),
            {"actual_seq_qlen": [4], "actual_seq_kvlen": [4]},
            "input_layout 'TND' is not emulated",
        ),
        "BSH": ((*flat, "BSH"), {}, "input_layout 'BSH' is not emulated"),
        "SBH": ((*flat, "SBH"), {}, "input_layout 'SBH' is not emulated"),
        "BNSD": ((_bnsd(q), _bnsd(k), _bnsd(v), 2, "BNSD"), {}, "input_layout 'BNSD' is not emulated"),
        "sparse_mode 1": (bsnd, {"sparse_mode": 1, "atten_mask": full_mask}, "sparse_mode 1 is not emulated"),
        "sparse_mode 2": (
            bsnd,
            {"sparse_mode": 2, "atten_mask": CAUSAL_2048},
            "sparse_mode 2 is not emulated",
        ),
        "pre_tockens band": (
            bsnd,
            {"atten_mask": full_mask, "pre_tockens": 0},
            "pre_tockens=0 is not emulated",
        ),
        "next_tockens band": (
            bsnd,
            {"atten_mask": full_mask, "next_tockens": 0},
            "next_tockens=0 is not emulated",
        ),
        "next_tockens without mask": (bsnd, {"next_tockens": 0}, "next_tockens=0 is not emulated"),
    }
    for mode in range(4, 9):
        cases[f"sparse_mode {mode}"] = (bsnd, {"sparse_mode": mode}, f"sparse_mode {mode} is not emulated")
    return cases


_FUSION_NOT_EMULATED = _fusion_not_emulated_calls()


@pytest.mark.parametrize("case", list(_FUSION_NOT_EMULATED), ids=list(_FUSION_NOT_EMULATED))
def test_fusion_attention_refuses_what_it_does_not_emulate(npu, case):
    args, kwargs, message = _FUSION_NOT_EMULATED[case]
    with pytest.raises(NotImplementedError, match=message):
        npu.npu_fusion_attention(*args, **kwargs)


def test_fusion_attention_takes_the_torch_npu_2_14_arguments(npu):
    """yaml:404 ends ``softmax_layout, sink, dropout_mask, seed, offset``; none is emulated."""
    names = list(inspect.signature(fake_torch_npu.npu_fusion_attention).parameters)
    assert names[-5:] == ["softmax_layout", "sink", "dropout_mask", "seed", "offset"]
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    out = npu.npu_fusion_attention(q, k, v, 2, "BSND", sink=None, dropout_mask=None, seed=0, offset=0)[0]
    assert rel_l2(out, dense_reference(q, k, v, scale=1.0)[0]) < FP32_TOL
    for name, value in [("sink", torch.zeros(2)), ("dropout_mask", torch.ones(1, dtype=torch.uint8))]:
        with pytest.raises(NotImplementedError, match=f"{name} is not emulated"):
            npu.npu_fusion_attention(q, k, v, 2, "BSND", **{name: value})
    for name in ("seed", "offset"):
        with pytest.raises(NotImplementedError, match=f"{name}=7 is not emulated"):
            npu.npu_fusion_attention(q, k, v, 2, "BSND", **{name: 7})


# ------------------------------------------------------------------------------------------------
# npu_block_sparse_attention


def _block_sparse_inputs(heads=4, kv_heads=2, seq=300, dim=64, dtype=torch.bfloat16):
    q, k, v = _qkv(2, seq, seq, heads, kv_heads, dim, dtype)
    n = math.ceil(seq / 128)
    mask = torch.rand(2, heads, n, n) < 0.5
    mask[..., 0] = True
    return q, k, v, mask


def _npu_block_sparse(q, k, v, mask, **kwargs):
    return npu_block_sparse_attention(
        _bnsd(q),
        _bnsd(k),
        _bnsd(v),
        mask.to(torch.int8),
        [128, 128],
        q_input_layout="BNSD",
        kv_input_layout="BNSD",
        num_key_value_heads=k.shape[2],
        scale_value=0.125,
        inner_precise=0,
        **kwargs,
    )


def test_npu_block_sparse_attention_returns_the_lse_shape_without_the_flag():
    """op-plugin test ``..._softmax_lse_flag0``: ``(B, N, S, 1)`` float32 either way; its values are
    only defined with the flag."""
    q, k, v, mask = _block_sparse_inputs()
    want_out, want_lse = _block_reference(q, k, v, mask, 128, 0.125)
    out, lse = _npu_block_sparse(q, k, v, mask, softmax_lse_flag=1)
    assert rel_l2(out.transpose(1, 2), want_out) < BF16_TOL
    assert lse.shape == (2, 4, 300, 1) and lse.dtype == torch.float32
    torch.testing.assert_close(lse[..., 0].double(), want_lse, atol=1e-2, rtol=0)
    _, lse = _npu_block_sparse(q, k, v, mask, softmax_lse_flag=0)
    assert lse.shape == (2, 4, 300, 1) and lse.dtype == torch.float32 and lse.isnan().all()


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 2), (3, 1)])
def test_npu_block_sparse_attention_gqa_needs_a_group_dividing_128(heads, kv_heads):
    q, k, v, mask = _block_sparse_inputs(heads, kv_heads)
    if 128 % (heads // kv_heads):
        with pytest.raises(RuntimeError, match="G < 128 and 128 % G == 0"):
            _npu_block_sparse(q, k, v, mask)
        return
    out, _ = _npu_block_sparse(q, k, v, mask)
    assert rel_l2(out.transpose(1, 2), _block_reference(q, k, v, mask, 128, 0.125)[0]) < BF16_TOL


def test_npu_block_sparse_attention_refuses_what_it_does_not_emulate():
    q, k, v, mask = _block_sparse_inputs(2, 2)
    with pytest.raises(NotImplementedError, match="q_input_layout 'TND' is not emulated"):
        npu_block_sparse_attention(
            q[0], k[0], v[0], mask[:1].to(torch.int8), [128, 128], inner_precise=0,
            actual_seq_lengths=[300], actual_seq_lengths_kv=[300], num_key_value_heads=2,
        )  # fmt: skip
    with pytest.raises(NotImplementedError, match="actual lengths shorter"):
        _npu_block_sparse(q, k, v, mask, actual_seq_lengths=[300, 200], actual_seq_lengths_kv=[300, 300])
    _npu_block_sparse(q, k, v, mask, actual_seq_lengths=[300, 300], actual_seq_lengths_kv=[300, 300])
    with pytest.raises(RuntimeError, match="entries must be 0/1"):
        _npu_block_sparse(q, k, v, mask.to(torch.int8) * 2)


# ------------------------------------------------------------------------------------------------
# sgl-kernel-npu: block_sparse_attention / ada_block_sparse_attention


def _ada_inputs(q, k, mask):
    width = math.ceil(mask.shape[-1] / 32) * 32
    mask_i8 = F.pad(mask.to(torch.int8), (0, width - mask.shape[-1]))
    return (
        mask_i8,
        mask.sum(-1, dtype=torch.int32),
        {"num_heads": q.shape[2], "num_key_value_heads": k.shape[2]},
    )


BLOCK_SPARSE_OPS = [ops.block_sparse_attention, ops.ada_block_sparse_attention]


@pytest.mark.parametrize("op", BLOCK_SPARSE_OPS, ids=lambda op: op.__name__)
def test_block_sparse_ops_ignore_pre_and_next_tokens(op):
    """The plugin builds sparse_mode 0 without a mask, so the tiling drops both windows."""
    q, k, v, mask = _block_sparse_inputs()
    mask_i8, counts, heads = _ada_inputs(q, k, mask)
    want = _block_reference(q, k, v, mask, 128, 0.125)[0]
    for pre, nxt in [(214748647, 214748647), (0, 0), (5, 0)]:
        out = op(
            _bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts, scale_value=0.125, causal=False,
            pre_tokens=pre, next_tokens=nxt, **heads,
        )  # fmt: skip
        assert rel_l2(out.transpose(1, 2), want) < BF16_TOL


@pytest.mark.parametrize("op", BLOCK_SPARSE_OPS, ids=lambda op: op.__name__)
def test_block_sparse_ops_causal_only_for_equal_lengths(op):
    q, k, v, mask = _block_sparse_inputs()
    mask_i8, counts, heads = _ada_inputs(q, k, mask)
    out = op(_bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts, scale_value=0.125, **heads)  # causal=True
    want = _block_reference(q, k, v, mask, 128, 0.125, causal=True)[0]
    assert rel_l2(out.transpose(1, 2), want) < BF16_TOL
    k_long, v_long = torch.cat([k, k], 1), torch.cat([v, v], 1)
    long_mask = torch.ones(2, 4, 3, 5, dtype=torch.bool)
    mask_i8, counts, heads = _ada_inputs(q, k_long, long_mask)
    with pytest.raises(NotImplementedError, match="causal with S_q 300 != S_kv 600"):
        op(_bnsd(q), _bnsd(k_long), _bnsd(v_long), mask_i8, counts, **heads)


@pytest.mark.parametrize("op", BLOCK_SPARSE_OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("inner_precise", [0, 2])
def test_block_sparse_ops_have_no_fp16_high_precision_kernel(op, inner_precise):
    q, k, v, mask = _block_sparse_inputs(dtype=torch.float16)
    mask_i8, counts, heads = _ada_inputs(q, k, mask)
    with pytest.raises(RuntimeError, match="FP16 high-precision"):
        op(_bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts, inner_precise=inner_precise, causal=False, **heads)
    out = op(_bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts, inner_precise=1, causal=False, **heads)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("op", BLOCK_SPARSE_OPS, ids=lambda op: op.__name__)
def test_block_sparse_ops_refuse_what_they_do_not_emulate(op):
    q, k, v, mask = _block_sparse_inputs()
    mask_i8, counts, heads = _ada_inputs(q, k, mask)
    args = (_bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts)
    with pytest.raises(RuntimeError, match="does not support 'TND'"):
        op(*args, input_layout="TND", causal=False, **heads)
    with pytest.raises(NotImplementedError, match="input_layout 'BSND' is not emulated"):
        op(q, k, v, mask_i8, counts, input_layout="BSND", causal=False, **heads)
    with pytest.raises(NotImplementedError, match="actual_seq_lengths"):
        op(*args, causal=False, actual_seq_lengths=[300, 300], actual_seq_lengths_kv=[300, 300], **heads)
    with pytest.raises(NotImplementedError, match="sparse_size=256 is not emulated"):
        op(*args, sparse_size=256, causal=False, **heads)


# ------------------------------------------------------------------------------------------------
# sgl-kernel-npu: rainfusionattention


def _rainfusion_inputs(seq=300, heads=2, kv_heads=2, dtype=torch.bfloat16):
    q, k, v = (x[0] for x in _qkv(1, seq, seq, heads, kv_heads, 64, dtype))
    n = math.ceil(seq / 128)
    mask = torch.rand(n, heads, n) < 0.5
    mask[..., 1] = True
    num = mask.sum(-1)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # kept blocks first, ascending
    idx = torch.where(torch.arange(n) < num[..., None], order, -1)
    return q, k, v, mask, idx, num


def test_rainfusion_second_output_is_nan_in_the_query_shape_and_dtype():
    """``rainfusionattention.cpp:48`` allocates it ``{T, N, D}`` in the query dtype."""
    q, k, v, mask, idx, num = _rainfusion_inputs()
    out, second = ops.rainfusionattention(
        q, k, v, idx, num, [128, 128], actual_seq_qlen=[300], actual_seq_kvlen=[300], head_num=2, scale=0.125
    )
    want = _block_reference(q[None], k[None], v[None], mask.transpose(0, 1)[None], 128, 0.125)[0][0]
    assert rel_l2(out, want) < BF16_TOL
    assert second.shape == q.shape and second.dtype == q.dtype and second.isnan().all()


def test_rainfusion_refuses_what_it_does_not_emulate():
    q, k, v, _, idx, num = _rainfusion_inputs()
    common = {"head_num": 2, "scale": 0.125}
    lengths = {"actual_seq_qlen": [300], "actual_seq_kvlen": [300]}
    with pytest.raises(NotImplementedError, match="several sequences"):
        ops.rainfusionattention(
            q, k, v, idx, num, [128, 128], actual_seq_qlen=[150, 150], actual_seq_kvlen=[150, 150], **common
        )
    with pytest.raises(NotImplementedError, match="'BNSD' is not emulated"):
        ops.rainfusionattention(q, k, v, idx, num, [128, 128], q_input_layout="BNSD", **lengths, **common)
    with pytest.raises(RuntimeError, match="only supports 'TND' and 'BNSD'"):
        ops.rainfusionattention(q, k, v, idx, num, [128, 128], q_input_layout="BSND", **lengths, **common)
    with pytest.raises(NotImplementedError, match="GQA"):
        ops.rainfusionattention(q, k[:, :1], v[:, :1], idx, num, [128, 128], **lengths, **common)
    with pytest.raises(NotImplementedError, match="masks/paging"):
        table = torch.zeros(1, 3, dtype=torch.int32)
        ops.rainfusionattention(q, k, v, idx, num, [128, 128], block_table=table, **lengths, **common)


# ------------------------------------------------------------------------------------------------
# sgl-kernel-npu: la / laser_attn


LASER_OPS = [ops.la, ops.laser_attn]


def _laser_inputs(seq, pad_to, heads=4, kv_heads=2, dim=128):
    """fp16 BNSD, S zero-padded to ``pad_to``; also the unpadded BSHD float32 originals."""
    q, k, v = _qkv(1, seq, seq, heads, kv_heads, dim)
    padded = [F.pad(_bnsd(x), (0, 128 - dim, 0, pad_to - seq)).half() for x in (q, k, v)]
    return padded, [x.half().float() for x in (q, k, v)]


@pytest.mark.parametrize("op", LASER_OPS, ids=lambda op: op.__name__)
def test_laser_takes_gqa_and_masks_the_padded_keys(op):
    """GQA: the tiling's headGroupSize; pre_tokens = the zero-padded tail keys."""
    (qp, kp, vp), (q, k, v) = _laser_inputs(300, 512)
    lse, out = op(qp, kp, vp, scale_value=0.125, head_num=4, pre_tokens=212)
    want_out, want_lse = dense_reference(q, k, v, scale=0.125)
    assert (
        out.dtype == lse.dtype == torch.float32 and out.shape == (1, 4, 512, 128) and lse.shape == (1, 4, 512)
    )
    assert rel_l2(out[:, :, :300].transpose(1, 2), want_out) < FP16_TOL
    torch.testing.assert_close(lse[:, :, :300].double(), want_lse, atol=1e-3, rtol=0)


@pytest.mark.parametrize("op", LASER_OPS, ids=lambda op: op.__name__)
def test_laser_pre_tokens_zero_means_no_padding(op):
    """``VectorForward.h:898``: nothing is masked when windowLen is 0, as for 2**31 - 1."""
    (qp, kp, vp), _ = _laser_inputs(512, 512)
    _, out = op(qp, kp, vp, scale_value=0.125, head_num=4, pre_tokens=0)
    _, want = op(qp, kp, vp, scale_value=0.125, head_num=4, pre_tokens=NO_PAD)
    assert torch.equal(out, want)


@pytest.mark.parametrize("op", LASER_OPS, ids=lambda op: op.__name__)
def test_laser_refuses_values_the_kernel_does_not_define(op):
    (qp, kp, vp), _ = _laser_inputs(300, 512)
    with pytest.raises(NotImplementedError, match="pre_tokens=256 is not emulated"):
        op(qp, kp, vp, head_num=4, pre_tokens=256)
    with pytest.raises(NotImplementedError, match="next_tokens=0 is not emulated"):
        op(qp, kp, vp, head_num=4, pre_tokens=212, next_tokens=0)
    with pytest.raises(RuntimeError, match="overflows the kernel's fp16 scale"):
        op(qp, kp, vp, head_num=4, pre_tokens=212, scale_value=70000.0)
    with pytest.raises(RuntimeError, match="float16"):
        op(qp.float(), kp.float(), vp.float(), head_num=4, pre_tokens=212)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        op(qp[:, :3], kp, vp, head_num=3, pre_tokens=212)
    with pytest.raises(NotImplementedError, match="masks .* are not emulated"):
        op(qp, kp, vp, head_num=4, pre_tokens=212, atten_mask=torch.zeros(512, 512, dtype=torch.float16))


def test_la_and_laser_attn_differ_only_in_their_host_checks():
    """``la`` (no host checks) keeps callers at the 256 tail alignment; ``laser_attn`` checks S % 128."""
    (qp, kp, vp), (q, k, v) = _laser_inputs(384, 384)
    with pytest.raises(RuntimeError, match="multiples of 256"):
        ops.la(qp, kp, vp, head_num=4)
    _, out = ops.laser_attn(qp, kp, vp, scale_value=0.125, head_num=4)
    assert rel_l2(out.transpose(1, 2), dense_reference(q, k, v, scale=0.125)[0]) < FP16_TOL
    with pytest.raises(RuntimeError, match="multiples of 128"):
        ops.laser_attn(qp[:, :, :200], kp[:, :, :200], vp[:, :, :200], head_num=4)
    with pytest.raises(NotImplementedError, match="not a multiple of 256 is not emulated"):
        ops.laser_attn(qp, kp, vp, head_num=4, pre_tokens=84)
    (qp, kp, vp), _ = _laser_inputs(512, 512)
    assert torch.equal(ops.la(qp, kp, vp, head_num=4)[1], ops.laser_attn(qp, kp, vp, head_num=4)[1])


# ------------------------------------------------------------------------------------------------
# Every emulated op names its sources


EMULATED_OPS = [
    fake_torch_npu.npu_fused_infer_attention_score,
    fake_torch_npu.npu_fusion_attention,
    npu_block_sparse_attention,
    ops.la,
    ops.laser_attn,
    ops.block_sparse_attention,
    ops.ada_block_sparse_attention,
    ops.rainfusionattention,
]


@pytest.mark.parametrize("op", EMULATED_OPS, ids=lambda op: op.__name__)
def test_emulated_ops_cite_their_sources(op):
    """Each op's docstring (with its module's) points at the schema, docs line or kernel file it
    follows, and at nothing that is only guessed or no longer exists upstream."""
    text = inspect.getdoc(op) + inspect.getdoc(sys.modules[op.__module__])
    assert any(marker in text for marker in (".cpp", "docs l.", "yaml:"))
    for stale in ("ASSUMED", "NOT confirmed", "_custom_ops.py", "README"):
        assert stale not in text


def test_laser_and_block_sparse_cite_the_kernel_lines_that_fix_their_semantics():
    laser = inspect.getdoc(ops._laser)
    assert "VectorForward.h:898-916" in laser and "laser_attention_tiling.cpp:160" in laser
    block_sparse = inspect.getdoc(ops._block_sparse)
    assert "ada_block_sparse_attention_tiling.cpp:3618-3625" in block_sparse
    assert "sparse_block_estimate.cpp" in block_sparse


# ------------------------------------------------------------------------------------------------
# The fake packages, their layouts and the fixtures


def test_calls_are_recorded_with_their_arguments(npu):
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    npu.npu_fusion_attention(q, k, v, 2, "BSND", scale=0.5)
    npu.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")
    assert [c[0] for c in npu.calls] == ["npu_fusion_attention", "npu_fused_infer_attention_score"]
    name, args, kwargs = npu.calls[0]
    assert args[3:] == (2, "BSND") and kwargs == {"scale": 0.5}
    assert npu.calls[1][2] == {"num_heads": 2, "input_layout": "BSND"}
    assert {c.namespace for c in npu.calls} == {"torch_npu"}


def test_sparse_ops_module_functions_join_the_fake(monkeypatch):
    sparse = types.ModuleType(SPARSE_MODULE)
    exec(
        "def npu_block_sparse_attention(x, **kw):\n    return x * 2\ndef tiling():\n    pass", sparse.__dict__
    )
    monkeypatch.setitem(sys.modules, SPARSE_MODULE, sparse)
    npu = make_fake_torch_npu()
    assert npu.npu_block_sparse_attention(torch.ones(2), blockshape=[128, 128]).tolist() == [2.0, 2.0]
    assert npu.calls == [("npu_block_sparse_attention", (npu.calls[0][1][0],), {"blockshape": [128, 128]})]
    assert not hasattr(npu, "tiling")


def test_the_sparse_module_is_the_one_the_fake_loads():
    assert fake_torch_npu_sparse.__name__ == SPARSE_MODULE
    assert (
        make_fake_torch_npu().npu_block_sparse_attention.__wrapped__.__wrapped__ is npu_block_sparse_attention
    )


def test_fake_npu_fixture_installs_the_fake_packages(fake_npu):
    import attentions  # noqa: F401
    import torch_npu

    assert torch_npu is fake_npu and not _importable("sgl_kernel_npu")
    assert _namespace_ops("attentions") == set(ops.ATTENTIONS_OPS)
    assert hasattr(fake_npu, "npu_fused_infer_attention_score") and fake_npu.calls == []
    assert fake_npu.layout == "attentions" and fake_npu.strict_docs is True


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _namespace_ops(namespace: str) -> set[str]:
    ns = vars(torch.ops).get(namespace)
    return {name for name in vars(ns) if not name.startswith("_")} if ns is not None else set()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_installed_fake_npu_puts_each_layout_in_place_and_takes_it_out(layout):
    old = {"attentions": set(ops.ATTENTIONS_OPS), "npu": set()}
    new = {"attentions": set(), "npu": {"laser_attn", "ada_block_sparse_attention"}}
    want = {"attentions": old, "sgl_kernel_npu": new, "both": {n: old[n] | new[n] for n in old}}[layout]
    with installed_fake_npu(layout) as fake:
        assert fake.layout == layout and _importable("torch_npu")
        assert _importable("attentions") == bool(want["attentions"])
        assert _importable("sgl_kernel_npu") == bool(want["npu"])
        assert {n: _namespace_ops(n) for n in want} == want
    for name in ("torch_npu", "attentions", "sgl_kernel_npu"):
        assert name not in sys.modules
    assert "attentions" not in vars(torch.ops) and "npu" not in vars(torch.ops)


def test_installed_fake_npu_refuses_an_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        with installed_fake_npu("sgl-kernel-npu"):
            pass


def test_installed_fake_npu_passes_strict_docs():
    with installed_fake_npu(strict_docs=False) as fake:
        assert fake.strict_docs is False
        q, k, v = _qkv(1, 4, 4, 2, 2, 8)
        fake.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")


def test_both_layouts_record_the_namespace_of_each_call():
    (qp, kp, vp), _ = _laser_inputs(512, 512)
    q, k, v, mask = _block_sparse_inputs()
    mask_i8, counts, heads = _ada_inputs(q, k, mask)
    ada_args = (_bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts)
    with installed_fake_npu("both") as fake:
        torch.ops.attentions.la(qp, kp, vp, head_num=4)
        torch.ops.npu.laser_attn(qp, kp, vp, head_num=4)
        torch.ops.npu.ada_block_sparse_attention(*ada_args, causal=False, **heads)
        torch.ops.attentions.ada_block_sparse_attention(*ada_args, causal=False, **heads)
    assert [(c[0], c.namespace) for c in fake.calls] == [
        ("la", "attentions"),
        ("laser_attn", "npu"),
        ("ada_block_sparse_attention", "npu"),
        ("ada_block_sparse_attention", "attentions"),
    ]
    assert fake.calls[1][2] == {"head_num": 4}


def test_fake_npu_layout_fixture_runs_each_kernel_layout(fake_npu_layout):  # noqa: F811
    """One test, run once per sgl-kernel-npu layout: the block-sparse kernel is in both."""
    namespace = {"attentions": "attentions", "sgl_kernel_npu": "npu"}[fake_npu_layout.layout]
    assert fake_npu_layout.layout in KERNEL_LAYOUTS
    q, k, v, mask = _block_sparse_inputs()
    mask_i8, counts, heads = _ada_inputs(q, k, mask)
    op = getattr(torch.ops, namespace).ada_block_sparse_attention
    out = op(_bnsd(q), _bnsd(k), _bnsd(v), mask_i8, counts, scale_value=0.125, causal=False, **heads)
    assert rel_l2(out.transpose(1, 2), _block_reference(q, k, v, mask, 128, 0.125)[0]) < BF16_TOL
    assert [(c[0], c.namespace) for c in fake_npu_layout.calls] == [("ada_block_sparse_attention", namespace)]


@pytest.mark.parametrize("fake_npu_layout", ["both"], indirect=True)
def test_fake_npu_layout_fixture_takes_any_layout(fake_npu_layout):  # noqa: F811
    assert fake_npu_layout.layout == "both"
    assert hasattr(torch.ops.attentions, "la") and hasattr(torch.ops.npu, "laser_attn")
