"""Sequence-parallel attention (ring, Ulysses, both) equals single-device dense attention.

Distributed cases run on 2 and 4 gloo processes spawned by the tests (CPU). Every rank draws the
same full q/k/v, runs its shard, gathers the output and compares it with the float64 reference.
Tolerances (relative L2): float32 1e-5 (partials are merged in float32, so only rounding differs);
bfloat16 1.5e-2 (inputs carry ~3 significant digits), as for the single-device backends.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from attnbridge.attention import AttentionLayer, attend
from attnbridge.attention.lse import merge_partials
from attnbridge.attention.parallel import (
    ParallelAttention,
    ParallelConfig,
    build_parallel_groups,
    gather_sequence,
    padded_length,
    ring_attention,
    shard_sequence,
)
from tests.emulation.reference import dense_reference, rel_l2
from tests.parallel_utils import run_cases, values

TOLERANCE = {"torch.float32": 1e-5, "torch.bfloat16": 1.5e-2}


# ---------------------------------------------------------------------------------------------
# Cases run inside the spawned ranks (module level so that spawn can pickle them).


def usp_case(
    info, *, ring, ulysses, seq, heads=4, kv_heads=4, causal=False, dtype="float32", batch=2, backend="fa"
):
    """Shard a random sequence of ``seq`` tokens, attend in parallel, gather, compare with dense."""
    dtype = getattr(torch, dtype)
    head_dim = 16
    q = torch.randn(batch, seq, heads, head_dim).to(dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim).to(dtype)
    v = torch.randn(batch, seq, kv_heads, head_dim).to(dtype)
    groups = build_parallel_groups(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    pattn = ParallelAttention(AttentionLayer(backend), groups)
    (q_local, real_len), (k_local, _), (v_local, _) = (shard_sequence(t, groups) for t in (q, k, v))
    out_local = pattn(q_local, k_local, v_local, real_len=real_len, causal=causal)
    out = gather_sequence(out_local, groups, real_len)
    ref, _ = dense_reference(q, k, v, causal=causal)
    return {
        "rel_l2": rel_l2(out, ref),
        "dtype": str(out.dtype),
        "local_len": out_local.shape[1],
        "full_shape": list(out.shape),
    }


def error_case(info, *, kind):
    """The ValueError message a misconfiguration gives on every rank (None: nothing raised)."""
    try:
        if kind == "degrees":
            build_parallel_groups(ParallelConfig(ring_degree=2, ulysses_degree=2))
        elif kind == "heads":
            pattn = ParallelAttention("fa", ParallelConfig(ulysses_degree=info.world_size))
            x = torch.randn(1, 4, 3, 8)
            pattn(x, x, x)
        elif kind == "ring_sdpa":
            ParallelAttention("sdpa", ParallelConfig(ring_degree=info.world_size))
        elif kind == "short":
            groups = build_parallel_groups(ParallelConfig(ring_degree=info.world_size))
            shard_sequence(torch.randn(1, 1, 2, 8), groups)
    except ValueError as error:
        return str(error)
    return None


def init_case(info):
    return [info.rank, info.world_size, info.backend, str(info.device)]


def _usp(name, **kwargs):
    return name, functools.partial(usp_case, **kwargs)


WORLD2_ACCURACY = [
    _usp("ring2", ring=2, ulysses=1, seq=16),
    _usp("ring2_padded", ring=2, ulysses=1, seq=13),
    _usp("ring2_gqa_padded", ring=2, ulysses=1, seq=11, heads=4, kv_heads=2),
    _usp("ring2_causal_padded", ring=2, ulysses=1, seq=13, causal=True),
    _usp("ring2_bf16", ring=2, ulysses=1, seq=15, dtype="bfloat16"),
    _usp("ulysses2", ring=1, ulysses=2, seq=16),
    _usp("ulysses2_padded", ring=1, ulysses=2, seq=13),
    _usp("ulysses2_gqa", ring=1, ulysses=2, seq=10, heads=4, kv_heads=2),
    _usp("ulysses2_mqa_padded", ring=1, ulysses=2, seq=9, heads=4, kv_heads=1),
    _usp("ulysses2_causal_padded", ring=1, ulysses=2, seq=13, causal=True),
    _usp("ulysses2_sdpa_padded", ring=1, ulysses=2, seq=13, backend="sdpa"),  # no LSE needed
]
ERROR_KINDS = ("degrees", "heads", "ring_sdpa", "short")
WORLD2_ERRORS = [(f"error_{kind}", functools.partial(error_case, kind=kind)) for kind in ERROR_KINDS]
WORLD4_ACCURACY = [
    _usp("ring2_ulysses2", ring=2, ulysses=2, seq=30),
    _usp("ring2_ulysses2_causal", ring=2, ulysses=2, seq=30, causal=True),
    _usp("ring2_ulysses2_gqa", ring=2, ulysses=2, seq=27, heads=4, kv_heads=2),
    _usp("ring4_padded", ring=4, ulysses=1, seq=13),
    _usp("ring4_causal_padded", ring=4, ulysses=1, seq=13, causal=True),
    _usp("ulysses4_padded", ring=1, ulysses=4, seq=10),
]


def groups_reused_case(info):
    """Building the groups of one layout twice must hand back the same communicators."""
    first = build_parallel_groups(ParallelConfig(ring_degree=2, ulysses_degree=1))
    second = build_parallel_groups(ParallelConfig(ring_degree=2, ulysses_degree=1))
    other = build_parallel_groups(ParallelConfig(ring_degree=1, ulysses_degree=2))
    return [first.ring_group is second.ring_group, other.ulysses_group is not first.ring_group]


@pytest.fixture(scope="module")
def world2():
    return run_cases(
        2, [("init", init_case), ("groups_reused", groups_reused_case), *WORLD2_ACCURACY, *WORLD2_ERRORS]
    )


@pytest.fixture(scope="module")
def world4():
    return run_cases(4, WORLD4_ACCURACY)


# ---------------------------------------------------------------------------------------------
# Distributed tests.


def test_process_groups_are_built_once_per_layout(world2):
    assert values(world2, "groups_reused") == [[True, True], [True, True]]


def test_init_distributed_reads_launcher_env_and_picks_gloo_on_cpu(world2):
    assert values(world2, "init") == [[0, 2, "gloo", "cpu"], [1, 2, "gloo", "cpu"]]


@pytest.mark.parametrize("name", [name for name, _ in WORLD2_ACCURACY])
def test_world2_parallel_attention_matches_dense(world2, name):
    for result in values(world2, name):
        assert result["rel_l2"] < TOLERANCE[result["dtype"]], result


@pytest.mark.parametrize("name", [name for name, _ in WORLD4_ACCURACY])
def test_world4_parallel_attention_matches_dense(world4, name):
    for result in values(world4, name):
        assert result["rel_l2"] < TOLERANCE[result["dtype"]], result


def test_padding_gives_every_rank_an_equal_chunk(world2):
    # 13 tokens on 2 ranks: padded to 14, 7 per rank; gathered back to the 13 real tokens.
    for result in values(world2, "ring2_padded"):
        assert result["local_len"] == 7 and result["full_shape"] == [2, 13, 4, 16]


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("degrees", r"ring_degree \(2\) x ulysses_degree \(2\) = 4 must equal the world size \(2\)"),
        ("heads", r"ulysses_degree=2.*query head count \(3\) is not a multiple"),
        ("ring_sdpa", r"backend 'sdpa'.*use backend 'fa'"),
        ("short", r"1 tokens cannot be split over 2 sequence-parallel ranks"),
    ],
)
def test_world2_misconfiguration_is_a_clear_error(world2, kind, match):
    for message in values(world2, f"error_{kind}"):
        assert message is not None and re.search(match, message), message


# ---------------------------------------------------------------------------------------------
# Single-process tests.


def test_merge_partials_equals_attention_over_all_keys():
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 20, 2, 8), torch.randn(2, 20, 2, 8)
    out_a, lse_a = attend(q, k[:, :7], v[:, :7], backend="fa", return_lse=True)
    out_b, lse_b = attend(q, k[:, 7:], v[:, 7:], backend="fa", return_lse=True)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = dense_reference(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert rel_l2(out, ref_out) < 1e-6
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_merge_partials_ignores_rows_that_saw_no_key():
    out_a, lse_a = torch.randn(1, 3, 2, 4), torch.randn(1, 2, 3)
    empty_out, empty_lse = torch.zeros(1, 3, 2, 4), torch.full((1, 2, 3), -math.inf)
    out, lse = merge_partials(empty_out, empty_lse, out_a, lse_a)
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = merge_partials(empty_out, empty_lse, empty_out, empty_lse)
    assert not out.isnan().any() and torch.equal(out, empty_out) and torch.isneginf(lse).all()


def test_ring_of_one_rank_equals_dense():
    q, k, v = torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    out = ring_attention(q, k, v, layer=AttentionLayer("fa"), group=None, real_len=10)
    assert rel_l2(out, dense_reference(q, k[:, :10], v[:, :10])[0]) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_single_process_parallel_attention_equals_dense(causal):
    pattn = ParallelAttention("fa")  # 1 x 1: no process group needed
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 4, 8), torch.randn(2, 9, 4, 8)
    out = pattn(q, k, v, causal=causal, real_len=7)
    assert rel_l2(out[:, :7], dense_reference(q[:, :7], k[:, :7], v[:, :7], causal=causal)[0]) < 1e-5


def test_ring_with_a_backend_without_lse_names_fa():
    with pytest.raises(ValueError, match=r"backend 'sdpa'.*use backend 'fa'"):
        ParallelAttention("sdpa", ParallelConfig(ring_degree=2))


def test_backend_without_lse_is_fine_without_ring():
    pattn = ParallelAttention("sdpa", ParallelConfig())
    q = torch.randn(1, 6, 2, 8)
    assert rel_l2(pattn(q, q, q), dense_reference(q, q, q)[0]) < 1e-5


BAD_DEGREES = [
    (dict(ring_degree=0), "ring_degree must be a positive integer; got 0"),
    (dict(ulysses_degree=2), r"ring_degree \(1\) x ulysses_degree \(2\) = 2 must equal the world size \(1\)"),
]


@pytest.mark.parametrize(("config", "match"), BAD_DEGREES)
def test_bad_degrees_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        build_parallel_groups(ParallelConfig(**config))


def test_padded_length_for_dit_token_counts():
    assert padded_length(32760, 2) == 32760 and padded_length(32760, 4) == 32760
    assert padded_length(32761, 4) == 32764 and padded_length(32761, 8) == 32768
    with pytest.raises(ValueError, match="3 tokens cannot be split over 4"):
        padded_length(3, 4)
