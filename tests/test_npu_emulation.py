"""The CPU emulation of torch_npu's attention ops, and the float64 reference, are themselves right.

Everything the NPU tests conclude rests on these two, so each is checked against something
independent: the reference against brute-force loops and torch SDPA, the emulated ops against the
reference, in every layout. Tolerances (relative L2 of the output): float32 1e-5, bfloat16 2e-2;
LSE absolute 1e-5 (float32 outputs of float64 math).
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tests.emulation.fake_torch_npu import SPARSE_MODULE, make_fake_torch_npu
from tests.emulation.reference import dense_reference, rel_l2

FP32_TOL = 1e-5
BF16_TOL = 2e-2
LSE_ATOL = 1e-5
CAUSAL_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)

# (B, S_q, S_kv, H_q, H_kv, D): self-attention, GQA, cross-attention with S_q < S_kv and S_q > S_kv.
SHAPES = [
    (2, 9, 9, 4, 4, 16),
    (2, 11, 11, 8, 2, 8),
    (1, 7, 19, 6, 3, 16),
    (2, 13, 6, 4, 1, 8),
]


@pytest.fixture
def npu():
    """The fake with float32 allowed in FIA too, so the emulation's math is held to 1e-5."""
    return make_fake_torch_npu(strict_dtypes=False)


def _qkv(b, s_q, s_kv, h, h_kv, d, dtype=torch.float32):
    return (
        torch.randn(b, s_q, h, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
        torch.randn(b, s_kv, h_kv, d, dtype=dtype),
    )


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """BSHD -> layout (the test's own conversion, independent of the emulation's)."""
    b, s, h, d = x.shape
    if layout == "BSH":
        return x.reshape(b, s, h * d).contiguous()
    if layout == "SBH":
        return x.reshape(b, s, h * d).transpose(0, 1).contiguous()
    if layout == "BNSD":
        return x.permute(0, 2, 1, 3).contiguous()
    assert layout == "BSND"
    return x.contiguous()


def _from_layout(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BSH":
        return x.reshape(x.shape[0], x.shape[1], heads, -1)
    if layout == "SBH":
        return x.transpose(0, 1).reshape(x.shape[1], x.shape[0], heads, -1)
    if layout == "BNSD":
        return x.permute(0, 2, 1, 3)
    return x


def _assert_lse(lse: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal where finite, and -inf exactly where the reference row sees no key."""
    torch.testing.assert_close(lse.to(torch.float64), expected, atol=LSE_ATOL, rtol=0)


def _cumulative(lengths):
    return [sum(lengths[: i + 1]) for i in range(len(lengths))]


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


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fia_matches_reference(npu, layout, causal, shape):
    b, s_q, s_kv, h, h_kv, d = shape
    q, k, v = _qkv(*shape)
    extra = {"atten_mask": CAUSAL_2048, "sparse_mode": 3} if causal else {}
    out, lse = npu.npu_fused_infer_attention_score(
        _to_layout(q, layout),
        _to_layout(k, layout),
        _to_layout(v, layout),
        num_heads=h,
        num_key_value_heads=h_kv,
        input_layout=layout,
        scale=0.3,
        softmax_lse_flag=True,
        **extra,
    )
    want_out, want_lse = dense_reference(q, k, v, causal=causal, scale=0.3)
    assert out.shape == _to_layout(q, layout).shape and out.dtype == torch.float32
    assert rel_l2(_from_layout(out, layout, h), want_out) < FP32_TOL
    assert lse.shape == (b, h, s_q, 1) and lse.dtype == torch.float32
    _assert_lse(lse[..., 0], want_lse)


def test_fia_bfloat16_within_tolerance():
    npu = make_fake_torch_npu()  # strict: bf16 is a documented FIA dtype
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
    q_lens, kv_lens, h, h_kv, d = [5, 17, 9], [7, 17, 12], 4, 2, 16
    seqs = [_qkv(1, sq, skv, h, h_kv, d) for sq, skv in zip(q_lens, kv_lens)]
    q = torch.cat([s[0][0] for s in seqs])
    k = torch.cat([s[1][0] for s in seqs])
    v = torch.cat([s[2][0] for s in seqs])
    extra = {"atten_mask": CAUSAL_2048, "sparse_mode": 3} if causal else {}
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


@pytest.mark.parametrize(
    "layout, cache", [("BSND", "blocks_bs_h"), ("BNSD", "blocks_n_bs_d"), ("TND", "blocks_bs_h")]
)
def test_fia_paged_kv_matches_reference(npu, layout, cache):
    h, h_kv, d, block = 4, 2, 8, 128
    kv_lens, s_q = [130, 200], 3
    q, k, v = _qkv(2, s_q, 256, h, h_kv, d)
    # Sequence b's keys live in blocks block_table[b] of a shuffled pool.
    block_table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
    k_pool, v_pool = torch.randn(5, block, h_kv, d), torch.randn(5, block, h_kv, d)
    for b in range(2):
        for i, blk in enumerate(block_table[b].tolist()):
            k_pool[blk], v_pool[blk] = k[b, i * block : (i + 1) * block], v[b, i * block : (i + 1) * block]
    if cache == "blocks_bs_h":
        k_pool, v_pool = k_pool.reshape(5, block, h_kv * d), v_pool.reshape(5, block, h_kv * d)
    else:
        k_pool, v_pool = k_pool.transpose(1, 2).contiguous(), v_pool.transpose(1, 2).contiguous()
    query, q_lens = (_to_layout(q, layout), None) if layout != "TND" else (q.reshape(-1, h, d), [3, 6])
    out, lse = npu.npu_fused_infer_attention_score(
        query,
        k_pool,
        v_pool,
        num_heads=h,
        num_key_value_heads=h_kv,
        input_layout=layout,
        scale=0.3,
        block_table=block_table,
        block_size=block,
        actual_seq_lengths=q_lens,
        actual_seq_lengths_kv=kv_lens,
        atten_mask=CAUSAL_2048,
        sparse_mode=3,
        softmax_lse_flag=True,
    )
    want_out, want_lse = dense_reference(q, k, v, causal=True, scale=0.3, kv_lengths=kv_lens)
    got = out.reshape(2, s_q, h, d) if layout == "TND" else _from_layout(out, layout, h)
    assert rel_l2(got, want_out) < FP32_TOL
    got_lse = lse[..., 0].reshape(2, s_q, h).transpose(1, 2) if layout == "TND" else lse[..., 0]
    _assert_lse(got_lse, want_lse)


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
        "BSH hidden not divisible": (
            (q.reshape(2, 6, 32), k.reshape(2, 6, 16), v.reshape(2, 6, 16)),
            {**fia, "input_layout": "BSH", "num_heads": 5, "num_key_value_heads": 1},
            "not divisible",
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


def test_fia_rejects_float32_like_the_real_op():
    q, k, v = _qkv(1, 4, 4, 2, 2, 16)
    with pytest.raises(RuntimeError, match="float16, bfloat16"):
        make_fake_torch_npu().npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")


def test_fia_actual_lengths_list_shorter_than_batch_is_rejected(npu):
    q, k, v = _qkv(3, 6, 6, 2, 2, 8)
    with pytest.raises(RuntimeError, match="needs 1 or >= batch"):
        npu.npu_fused_infer_attention_score(
            q, k, v, num_heads=2, input_layout="BSND", actual_seq_lengths_kv=[6, 6]
        )


# ------------------------------------------------------------------------------------------------
# npu_fusion_attention


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fusion_attention_matches_reference(npu, layout, causal, shape):
    b, s_q, s_kv, h, h_kv, d = shape
    q, k, v = _qkv(*shape)
    extra = {"atten_mask": CAUSAL_2048, "sparse_mode": 3} if causal else {}
    out, softmax_max, softmax_sum, softmax_in, seed, offset, numels = npu.npu_fusion_attention(
        _to_layout(q, layout), _to_layout(k, layout), _to_layout(v, layout), h, layout, scale=0.3, **extra
    )
    want_out, want_lse = dense_reference(q, k, v, causal=causal, scale=0.3)
    assert out.shape == _to_layout(q, layout).shape and out.dtype == torch.float32
    assert rel_l2(_from_layout(out, layout, h), want_out) < FP32_TOL
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


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("causal", [False, True])
def test_fusion_attention_tnd_uneven_cumulative_lengths(npu, causal, softmax_layout):
    q_lens, kv_lens, h, h_kv, d = [5, 17, 9], [7, 17, 12], 4, 2, 16
    seqs = [_qkv(1, sq, skv, h, h_kv, d) for sq, skv in zip(q_lens, kv_lens)]
    q, k, v = (torch.cat([s[i][0] for s in seqs]) for i in range(3))
    extra = {"atten_mask": CAUSAL_2048, "sparse_mode": 3} if causal else {}
    out, softmax_max, softmax_sum, *_ = npu.npu_fusion_attention(
        q,
        k,
        v,
        h,
        "TND",
        scale=0.25,
        actual_seq_qlen=_cumulative(q_lens),
        actual_seq_kvlen=_cumulative(kv_lens),
        softmax_layout=softmax_layout,
        **extra,
    )
    assert out.shape == (31, h, d)
    # Documented: softmax outputs are NTD by default for TND input, TND with softmax_layout="TND".
    assert softmax_max.shape == ((31, h, 8) if softmax_layout == "TND" else (h, 31, 8))
    lse = softmax_max[..., 0].double() + softmax_sum[..., 0].double().log()
    lse = lse if softmax_layout == "TND" else lse.T  # -> [T, N]
    start = 0
    for (sq, sk, sv), n in zip(seqs, q_lens):
        want_out, want_lse = dense_reference(sq, sk, sv, causal=causal, scale=0.25)
        assert rel_l2(out[start : start + n], want_out[0]) < FP32_TOL
        _assert_lse(lse[start : start + n].T, want_lse[0])
        start += n


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


def test_fusion_attention_sparse_mode_0_band_from_pre_and_next_tokens(npu):
    q, k, v = _qkv(1, 8, 8, 2, 2, 8)
    no_mask = torch.zeros(8, 8, dtype=torch.bool)
    out = npu.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=no_mask, scale=0.5, next_tockens=0)[0]
    assert rel_l2(out, dense_reference(q, k, v, causal=True, scale=0.5)[0]) < FP32_TOL


def test_fusion_attention_without_mask_ignores_sparse_mode(npu):
    """Documented: with atten_mask None, sparse_mode and pre/next_tockens have no effect."""
    q, k, v = _qkv(1, 8, 8, 2, 2, 8)
    out = npu.npu_fusion_attention(q, k, v, 2, "BSND", scale=0.5, sparse_mode=3, next_tockens=0)[0]
    assert rel_l2(out, dense_reference(q, k, v, causal=False, scale=0.5)[0]) < FP32_TOL


def _fusion_bad_calls():
    q, k, v = _qkv(2, 6, 6, 4, 2, 8)
    tq, tk, tv = q.reshape(12, 4, 8), k.reshape(12, 2, 8), v.reshape(12, 2, 8)
    return {
        "unknown layout": ((q, k, v, 4, "BHSD"), {}, "input_layout 'BHSD'"),
        "head_num disagrees with query": ((q, k, v, 2, "BSND"), {}, "head_num=2"),
        "BSH hidden not divisible": (
            (q.reshape(2, 6, 32), k.reshape(2, 6, 16), v.reshape(2, 6, 16), 5, "BSH"),
            {},
            "not divisible",
        ),
        "GQA heads not divisible": ((q[:, :, :3].contiguous(), k, v, 3, "BSND"), {}, "multiple"),
        "TND lengths not cumulative": (
            (tq, tk, tv, 4, "TND"),
            {"actual_seq_qlen": [5, 4, 3], "actual_seq_kvlen": [5, 4, 3]},
            "cumulative",
        ),
        "TND per-sequence lengths": (
            (tq, tk, tv, 4, "TND"),
            {"actual_seq_qlen": [3, 4, 5], "actual_seq_kvlen": [3, 4, 5]},
            "cumulative",
        ),
        "TND without lengths": ((tq, tk, tv, 4, "TND"), {}, "needs actual_seq_qlen"),
        "lengths with a padded layout": (
            (q, k, v, 4, "BSND"),
            {"actual_seq_qlen": [6, 12], "actual_seq_kvlen": [6, 12]},
            "only used with input_layout TND",
        ),
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


# ------------------------------------------------------------------------------------------------
# The fake module and the fixture


def test_calls_are_recorded_with_their_arguments(npu):
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    npu.npu_fusion_attention(q, k, v, 2, "BSND", scale=0.5)
    npu.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")
    assert [c[0] for c in npu.calls] == ["npu_fusion_attention", "npu_fused_infer_attention_score"]
    name, args, kwargs = npu.calls[0]
    assert args[3:] == (2, "BSND") and kwargs == {"scale": 0.5}
    assert npu.calls[1][2] == {"num_heads": 2, "input_layout": "BSND"}


def test_sparse_ops_module_functions_join_the_fake(monkeypatch):
    sparse = types.ModuleType(SPARSE_MODULE)
    exec(
        "def npu_block_sparse_attention(x, **kw):\n    return x * 2\ndef helper():\n    pass", sparse.__dict__
    )
    monkeypatch.setitem(sys.modules, SPARSE_MODULE, sparse)
    npu = make_fake_torch_npu()
    assert npu.npu_block_sparse_attention(torch.ones(2), blockshape=[128, 128]).tolist() == [2.0, 2.0]
    assert npu.calls == [("npu_block_sparse_attention", (npu.calls[0][1][0],), {"blockshape": [128, 128]})]
    assert not hasattr(npu, "helper")


def test_fake_npu_fixture_installs_the_fake_packages(fake_npu):
    import torch_npu

    from attnbridge.platforms.npu import load_attentions_ops, load_torch_npu

    assert torch_npu is fake_npu and load_torch_npu("fa") is fake_npu
    assert load_attentions_ops("block_sparse") is torch.ops.attentions
    assert hasattr(fake_npu, "npu_fused_infer_attention_score") and fake_npu.calls == []
