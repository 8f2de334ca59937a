"""Zigzag context-parallel prefill attention (the CP FIA path) for packed batches of any size.

What users care about: with the batch split over ``cp_size`` ranks, the attention output equals
per-sequence causal attention computed on one device. float32 runs are held to relative L2 1e-5
against the float64 reference; the emulated Ascend op (bf16 only, like the real one) to 1.5e-2.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from attnbridge.attention.parallel import (
    build_zigzag_metadata,
    gather_kv,
    restore_natural_order,
    zigzag_all_gather,
    zigzag_cp_attention,
    zigzag_split,
)
from tests.emulation.reference import dense_reference, rel_l2
from tests.parallel_utils import run_cases, values

FP32_TOL = 1e-5
BF16_TOL = 1.5e-2


def causal_reference(q, k, v, seq_lens, prefix_lens=None):
    """Packed TND output of each sequence attending causally (bottom-right) to its own keys."""
    prefix_lens = prefix_lens or [0] * len(seq_lens)
    outs, q_start, kv_start = [], 0, 0
    for n, p in zip(seq_lens, prefix_lens):
        q_seq = q[q_start : q_start + n][None]
        k_seq, v_seq = k[kv_start : kv_start + p + n][None], v[kv_start : kv_start + p + n][None]
        outs.append(dense_reference(q_seq, k_seq, v_seq, causal=True)[0][0])
        q_start, kv_start = q_start + n, kv_start + p + n
    return torch.cat(outs)


def packed_qkv(seq_lens, heads=4, kv_heads=2, head_dim=16, prefix_lens=None, dtype=torch.float32):
    kv_tokens = sum(seq_lens) + sum(prefix_lens or [])
    q = torch.randn(sum(seq_lens), heads, head_dim).to(dtype)
    k = torch.randn(kv_tokens, kv_heads, head_dim).to(dtype)
    v = torch.randn(kv_tokens, kv_heads, head_dim).to(dtype)
    return q, k, v


def pad_ranks(locals_, metas):
    """What the all-gather hands every rank: each rank's zigzag-local tokens padded to max_rank_len."""
    width = metas[0].max_rank_len
    return torch.cat([torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])]) for x in locals_])


# ---------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks, cp_size 2.


def cp_case(info, *, seq_lens):
    q, k, v = packed_qkv(seq_lens)
    meta = build_zigzag_metadata(seq_lens, info.rank, info.world_size)
    q_local, k_local, v_local = (zigzag_split(t, meta) for t in (q, k, v))
    k_all, v_all = gather_kv(k_local, v_local, meta)
    out_local = zigzag_cp_attention(q_local, k_all, v_all, meta)
    out = zigzag_all_gather(out_local, meta)
    return {
        "rel_l2": rel_l2(out, causal_reference(q, k, v, seq_lens)),
        "kv_restored": torch.equal(k_all, k) and torch.equal(v_all, v),
        "local_tokens": out_local.shape[0],
    }


CP_CASES = {
    "bs3_5_17_9": [5, 17, 9],
    "worked_example_6_10": [6, 10],
    "bs1_odd": [11],
}


@pytest.fixture(scope="module")
def cp2():
    return run_cases(
        2, [(name, functools.partial(cp_case, seq_lens=lens)) for name, lens in CP_CASES.items()]
    )


@pytest.mark.parametrize("name", list(CP_CASES))
def test_cp2_prefill_equals_per_sequence_causal_attention(cp2, name):
    results = values(cp2, name)
    for result in results:
        assert result["kv_restored"], "gathered K/V are not the natural-order K/V"
        assert result["rel_l2"] < FP32_TOL, result
    # Every token is owned by exactly one rank.
    assert sum(r["local_tokens"] for r in results) == sum(CP_CASES[name])


# ---------------------------------------------------------------------------------------------
# Metadata: the worked example of the reference notes (cp_size 2, lens [6, 10]).


def test_worked_example_metadata():
    rank0 = build_zigzag_metadata([6, 10], 0, 2)
    rank1 = build_zigzag_metadata([6, 10], 1, 2)
    for meta in (rank0, rank1):
        assert meta.split_list == [2, 2, 1, 1, 3, 3, 2, 2]
        assert meta.reverse_split_len == [2, 3, 1, 2, 2, 3, 1, 2]
        assert meta.cp_reverse_index == [0, 4, 6, 2, 1, 5, 7, 3]
        assert meta.per_rank_actual_token == [8, 8] and meta.max_rank_len == 8
        assert meta.actual_seq_q_prev == [2, 3] and meta.actual_seq_q_next == [1, 2]
        assert meta.total_q_prev_tokens == 5 and meta.local_tokens - meta.total_q_prev_tokens == 3
    assert rank0.zigzag_index == [0, 4, 3, 7] and rank1.zigzag_index == [1, 5, 2, 6]
    assert rank0.kv_len_prev == [2, 3] and rank0.kv_len_next == [6, 10]
    assert rank1.kv_len_prev == [4, 6] and rank1.kv_len_next == [5, 8]


def test_worked_example_local_tokens():
    tokens = torch.arange(16)  # s0 = 0..5, s1 = 6..15
    s0, s1 = tokens[:6], tokens[6:]
    rank0 = zigzag_split(tokens, build_zigzag_metadata([6, 10], 0, 2))
    rank1 = zigzag_split(tokens, build_zigzag_metadata([6, 10], 1, 2))
    # rank 0: s0[0,1], s1[0,1,2], s0[5], s1[8,9]; rank 1: s0[2,3], s1[3,4,5], s0[4], s1[6,7]
    assert rank0.tolist() == [*s0[[0, 1]], *s1[[0, 1, 2]], s0[5], *s1[[8, 9]]]
    assert rank1.tolist() == [*s0[[2, 3]], *s1[[3, 4, 5]], s0[4], *s1[[6, 7]]]


@pytest.mark.parametrize(("seq_lens", "cp_size"), [([6, 10], 2), ([5, 17, 9], 2), ([7, 17, 9], 3), ([4], 1)])
def test_gathered_stream_restores_natural_order(seq_lens, cp_size):
    metas = [build_zigzag_metadata(seq_lens, r, cp_size) for r in range(cp_size)]
    tokens = torch.arange(sum(seq_lens))
    assert torch.equal(
        restore_natural_order(pad_ranks([zigzag_split(tokens, m) for m in metas], metas), metas[0]), tokens
    )


# ---------------------------------------------------------------------------------------------
# Attention, every rank emulated in one process.


@pytest.mark.parametrize(
    ("seq_lens", "cp_size", "prefix_lens"),
    [([5, 17, 9], 2, None), ([7, 17, 9], 3, None), ([5, 17, 9], 1, None), ([5, 17, 9], 2, [3, 0, 4])],
)
def test_all_ranks_together_equal_per_sequence_causal_attention(seq_lens, cp_size, prefix_lens):
    q, k, v = packed_qkv(seq_lens, prefix_lens=prefix_lens)
    metas = [build_zigzag_metadata(seq_lens, r, cp_size, prefix_lens) for r in range(cp_size)]
    outs = [zigzag_cp_attention(zigzag_split(q, m), k, v, m) for m in metas]
    for meta, out in zip(metas, outs):
        assert out.shape == (meta.local_tokens, q.shape[1], q.shape[2])
    out = restore_natural_order(pad_ranks(outs, metas), metas[0])
    assert rel_l2(out, causal_reference(q, k, v, seq_lens, prefix_lens)) < FP32_TOL


# ---------------------------------------------------------------------------------------------
# Ascend plumbing, checked against the torch_npu emulation.


def test_npu_path_calls_fia_tnd_with_cumulative_lengths(fake_npu):
    seq_lens, cp_size = [5, 17, 9], 2
    q, k, v = packed_qkv(seq_lens, heads=4, kv_heads=2, head_dim=128, dtype=torch.bfloat16)
    metas = [build_zigzag_metadata(seq_lens, r, cp_size) for r in range(cp_size)]
    outs = [zigzag_cp_attention(zigzag_split(q, m), k, v, m, platform="npu") for m in metas]
    out = restore_natural_order(pad_ranks(outs, metas), metas[0])
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, causal_reference(q, k, v, seq_lens)) < BF16_TOL

    calls = [c for c in fake_npu.calls if c[0] == "npu_fused_infer_attention_score"]
    assert len(calls) == 2 * cp_size  # a prev and a next call per rank
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    for _, args, kwargs in calls:
        assert kwargs["input_layout"] == "TND" and kwargs["sparse_mode"] == 3
        assert kwargs["atten_mask"].dtype == torch.bool and torch.equal(kwargs["atten_mask"], mask)
        assert kwargs["num_heads"] == 4 and kwargs["num_key_value_heads"] == 2
        for name in ("actual_seq_lengths", "actual_seq_lengths_kv"):
            assert all(type(n) is int for n in kwargs[name]), f"{name} must be a list of Python ints"
        q_arg, k_arg = args[0], args[1]
        assert q_arg.shape[0] == kwargs["actual_seq_lengths"][-1]
        assert k_arg.shape[0] == kwargs["actual_seq_lengths_kv"][-1]

    # Rank 1 of [5, 17, 9]: blocks [2,1,1,1], [5,4,4,4], [3,2,2,2]; it owns blocks 1 and 2.
    # prev queries [1,4,2] see keys [3,9,5]; next queries [1,4,2] see keys [4,13,7] (cumulative).
    rank1_prev, rank1_next = calls[2][2], calls[3][2]
    assert rank1_prev["actual_seq_lengths"] == [1, 5, 7]
    assert rank1_prev["actual_seq_lengths_kv"] == [3, 12, 17]
    assert rank1_next["actual_seq_lengths"] == [1, 5, 7]
    assert rank1_next["actual_seq_lengths_kv"] == [4, 17, 24]
    # The prev half of rank 1 gets exactly the first 3, 9 and 5 keys of the three sequences.
    starts = list(itertools.accumulate([0, *seq_lens]))
    expected_k = torch.cat([k[starts[s] : starts[s] + n] for s, n in enumerate([3, 9, 5])])
    assert torch.equal(calls[2][1][1], expected_k)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_sequence_shorter_than_two_blocks_per_rank_is_an_error():
    with pytest.raises(ValueError, match=r"cp_size=2 cuts every sequence into 4 blocks.*\[5, 3\]"):
        build_zigzag_metadata([5, 3], 0, 2)


@pytest.mark.parametrize(("rank", "size"), [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_is_an_error(rank, size):
    with pytest.raises(ValueError, match="cp_rank must be in"):
        build_zigzag_metadata([8, 8], rank, size)


def test_wrong_token_counts_are_errors():
    meta = build_zigzag_metadata([6, 10], 0, 2)
    q, k, v = packed_qkv([6, 10])
    with pytest.raises(ValueError, match="rank 0 holds 8 query tokens; q has 16"):
        zigzag_cp_attention(q, k, v, meta)
    with pytest.raises(ValueError, match=r"k/v must hold all 16 tokens \(prefixes included\); got 15"):
        zigzag_cp_attention(zigzag_split(q, meta), k[:15], v[:15], meta)
    with pytest.raises(ValueError, match="expected 16 packed tokens"):
        zigzag_split(q[:10], meta)
