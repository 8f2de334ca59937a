"""``block_sparse``'s block selection: estimated block mass, a fixed or an error-driven budget, and
where the budget goes.

* the documented rule, written here with plain loops in float64, keeps exactly the blocks the
  selector keeps, and the output is float64 attention over them;
* a head keeps ``kept_count(1 - sparsity)`` block pairs, forced ones included; with ``mass``, the
  sum over its query blocks of the fewest key blocks reaching the threshold, within
  ``[min_kept, max_kept]``;
* the text of joint attention stays dense both ways; NaN queries and keys reach the output;
* ``mass`` and its bounds are checked when the layer is made;
* at the same mean kept fraction, ``mass=0.9`` is as close to dense as ``sparsity`` on the
  structured generator of ``scripts/bench_sparse.py``;
* selection traces into one graph (no host sync, no Python loop over blocks).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from attnbridge import AttentionLayer, attend
from attnbridge.attention.backends import block_sparse
from attnbridge.attention.backends.block_sparse import BlockSparseOptions, select_block_sparse
from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.options import kept_count
from attnbridge.attention.registry import get_backend
from attnbridge.attention.sparse.layout import resolve_layout
from attnbridge.attention.sparse.selection import (
    EVEN_SHARE,
    MASS_ESTIMATE,
    RANK_ESTIMATE,
    estimated_block_mass,
    mass_counts,
    select_by_mass,
)
from tests.emulation.reference import dense_reference, rel_l2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_sparse import structured_qkv  # noqa: E402

BLOCK, SUB = 128, 32
GRID = (9, 8, 12)  # 864 tokens: 7 blocks, the last with 96 tokens (3 sub-blocks)


def _qkv(batch, seq, heads, kv_heads, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, seq, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))


def _select(q, k, context, **options):
    layout = resolve_layout("block_sparse", q, context)
    return layout, select_block_sparse(q, k, q.shape[-1] ** -0.5, BlockSparseOptions(**options), layout)


# ---------------------------------------------------------------------------------------------
# The documented rule, written out with loops


def documented_estimate(q, k, temperature, spread):
    """float64 ``[B, H, nb, nb]``: 32-token sub-blocks with mean ``m`` and per-dimension variance
    ``s2 = (mean |x|^2 - |m|^2) / D``; the logit of (a, b) is ``t c mq·mk`` (``c = 1/sqrt(D)``), with
    the spread term ``+ c^2 / 2 (s2q |mk|^2 + s2k |mq|^2 + D s2q s2k)``, ``+ log(size of b)``; each
    query sub-block's softmax over the key sub-blocks, summed into block pairs with the query
    sub-blocks weighted by their size; rows normalized."""
    batch, seq, heads, dim = q.shape
    group, c = heads // k.shape[2], 1 / math.sqrt(dim)
    ns, nb = math.ceil(seq / SUB), math.ceil(seq / BLOCK)
    sizes = [min(SUB, seq - a * SUB) for a in range(ns)]

    def stats(x, a):
        part = x[:, a * SUB : (a + 1) * SUB].double()
        mean = part.mean(1)  # [B, H, D]
        return mean, (part.pow(2).sum(-1).mean(1) - mean.pow(2).sum(-1)) / dim

    q_stats = [stats(q, a) for a in range(ns)]
    k_stats = [stats(k, a) for a in range(ns)]
    est = torch.zeros(batch, heads, nb, nb, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for a in range(ns):
                mq, s2q = q_stats[a][0][b, h], float(q_stats[a][1][b, h])
                logits = []
                for o in range(ns):
                    mk, s2k = k_stats[o][0][b, h // group], float(k_stats[o][1][b, h // group])
                    logit = temperature * c * float(mq @ mk) + math.log(sizes[o])
                    if spread:
                        variance = s2q * float(mk @ mk) + s2k * float(mq @ mq) + dim * s2q * s2k
                        logit += c * c / 2 * variance
                    logits.append(logit)
                probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                for o in range(ns):
                    est[b, h, a * SUB // BLOCK, o * SUB // BLOCK] += sizes[a] * probs[o]
    return est / est.sum(-1, keepdim=True)


def documented_mask(est, budget, forced):
    """Each row's blocks in order (forced first, then by estimated mass). Always kept: the forced
    blocks and each row's first ``max(1, floor(3/4 (budget - forced pairs) / nq))``. Then the
    r-th block's gain is ``p (2 d + p)`` with ``d`` the mass still outside after it; per head, the
    ``max(budget, always kept)`` pairs of largest gain."""
    batch, heads, nq, nk = est.shape
    n_forced = sum(sum(row) for row in forced)
    mask = torch.zeros(batch, heads, nq, nk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            floor = max(1, math.floor(EVEN_SHARE * (budget[b][h] - n_forced) / nq))
            entries = []
            for i in range(nq):
                order = sorted(range(nk), key=lambda j: (not forced[i][j], -float(est[b, h, i, j])))
                outside = 1.0
                for r, j in enumerate(order):
                    p = float(est[b, h, i, j])
                    outside = max(outside - p, 0.0)
                    gain = math.inf if forced[i][j] or r < floor else p * (2 * outside + p)
                    entries.append((gain, i, j))
            always = sum(1 for e in entries if e[0] == math.inf)
            for _, i, j in sorted(entries, key=lambda e: -e[0])[: max(budget[b][h], always)]:
                mask[b, h, i, j] = True
    return mask


def block_masked_reference(q, k, v, mask):
    """float64 attention where query i sees key j iff block (i // 128, j // 128) is kept."""
    seq, group = q.shape[1], q.shape[2] // k.shape[2]
    visible = mask.repeat_interleave(BLOCK, -2)[..., :seq, :].repeat_interleave(BLOCK, -1)[..., :seq]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v64)


@pytest.mark.parametrize("options", [{"sparsity": 0.5}, {"sparsity": 0.8}, {"mass": 0.9}])
def test_output_is_attention_over_the_blocks_of_the_documented_rule(options):
    """GQA, a partial tail block, two samples; structured inputs so the estimate has something to
    find. Forced: nothing (self-attention of a video: no first-frame or diagonal prior)."""
    q, k, v = structured_qkv(GRID, 4, 32, device="cpu", dtype=torch.float32, seed=3)
    q2, k2, v2 = structured_qkv(GRID, 4, 32, device="cpu", dtype=torch.float32, seed=4)
    q, k, v = torch.cat([q, q2]), torch.cat([k, k2])[:, :, ::2], torch.cat([v, v2])[:, :, ::2]
    context = AttentionContext(kind="self", grid=GRID, step=1)
    out = attend(q, k, v, backend="block_sparse", context=context, **options)
    nb, forced = 7, [[False] * 7 for _ in range(7)]
    est = documented_estimate(q, k, *RANK_ESTIMATE)
    if "mass" in options:
        ordered = documented_estimate(q, k, *MASS_ESTIMATE).sort(-1, descending=True).values
        before = ordered.cumsum(-1) - ordered  # mass of the blocks ahead of each one
        budget = (before < options["mass"]).sum(dim=(-1, -2)).tolist()
    else:
        budget = [[kept_count(options["sparsity"], nb * nb)] * 4] * 2
    mask = documented_mask(est, budget, forced)
    _, selection = _select(q, k, context, **options)
    assert torch.equal(selection.mask(), mask)
    assert not mask.all() and (mask.sum(-1) >= 1).all()
    assert rel_l2(out, block_masked_reference(q, k, v, mask)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(3, 8, 40), (9, 8, 12), (4, 16, 36)])
def test_each_head_keeps_its_budget_of_pairs(grid, sparsity):
    q, k, _ = _qkv(2, math.prod(grid), 4, 2, 32)
    layout, selection = _select(q, k, AttentionContext(grid=grid, step=5), sparsity=sparsity)
    nb = layout.num_blocks
    kept = selection.mask().sum(dim=(-1, -2))
    # every query block keeps its best block, even where the budget is smaller than the rows
    assert (kept == max(kept_count(sparsity, nb * nb), nb)).all()
    assert torch.equal(selection.counts, selection.mask().sum(-1, dtype=torch.int32))
    assert (selection.counts >= 1).all()


def test_joint_text_stays_dense_both_ways_and_is_paid_from_the_budget():
    grid, n_text = (1, 20, 20), 150  # blocks 3-4 hold text (block 3 mixes image and text)
    q, k, v = _qkv(1, 550, 2, 2, 32)
    context = AttentionContext(kind="joint", grid=grid, step=2, num_text_tokens=n_text)
    for options in ({"sparsity": 0.2}, {"mass": 0.5}):
        layout, selection = _select(q, k, context, **options)
        mask = selection.mask()
        assert layout.text_start_block == 3 and mask[..., 3:, :].all() and mask[..., :, 3:].all()
        assert not mask.all()
        if "sparsity" in options:
            assert (mask.sum(dim=(-1, -2)) == kept_count(0.2, 25)).all()  # text: 16 of the 20
    out = attend(q, k, v, backend="block_sparse", context=context, sparsity=0.2)
    ref, _ = dense_reference(q, k, v)
    assert rel_l2(out[:, 384:], ref[:, 384:]) < 1e-5  # text queries see everything


def test_forced_blocks_beyond_the_budget_are_kept_anyway():
    forced = torch.zeros(4, 4, dtype=torch.bool)
    forced[3, :] = forced[:, 3] = True  # a text block: 7 pairs, against a budget of 2
    log_mass = torch.randn(1, 1, 4, 4).log_softmax(-1)
    selection = select_by_mass(log_mass, torch.tensor([[2]]), forced)
    mask = selection.mask()[0, 0]
    assert mask[3].all() and mask[:, 3].all() and int(mask.sum()) == 7  # the other rows: text only


def test_mass_budget_is_the_sum_of_the_rows_needs_within_min_and_max_kept():
    q, k, _ = _qkv(1, 864, 2, 2, 32)
    context = AttentionContext(grid=GRID, step=5)
    layout = resolve_layout("block_sparse", q, context)
    (counting,), _ = estimated_block_mass(q, k, BLOCK, 32**-0.5, estimates=(MASS_ESTIMATE,))
    no_forced = torch.zeros(7, 7, dtype=torch.bool)
    for mass in (0.5, 0.9):
        _, selection = _select(q, k, context, mass=mass)
        needed = mass_counts(counting, mass, no_forced).sum(-1)
        assert torch.equal(selection.counts.sum(-1), needed)
    assert layout.num_blocks == 7
    _, capped = _select(q, k, context, mass=0.99, max_kept=0.3)
    assert (capped.counts.sum(-1) == kept_count(0.7, 49)).all()
    _, floored = _select(q, k, context, mass=0.05, min_kept=0.5)
    assert (floored.counts.sum(-1) == kept_count(0.5, 49)).all()


def test_mass_counts_the_fewest_blocks_reaching_the_threshold():
    probs = torch.tensor(
        [
            [0.5, 0.3, 0.1, 0.1],
            [0.25, 0.25, 0.25, 0.25],
            [0.05, 0.05, 0.9, 0.0],
            [0.6, 0.3, 0.1, 0.0],
        ]
    )[None, None]
    no_forced = torch.zeros(4, 4, dtype=torch.bool)
    assert mass_counts(probs.log(), 0.79, no_forced)[0, 0].tolist() == [2, 4, 1, 2]
    assert mass_counts(probs.log(), 0.74, no_forced)[0, 0].tolist() == [2, 3, 1, 2]
    assert mass_counts(probs.log(), 0.99, no_forced)[0, 0].tolist() == [4, 4, 3, 3]
    # A forced block counts first, with its own mass: row 3 takes 2 (0.1), then 0 (0.6): 0.7.
    forced = torch.zeros(4, 4, dtype=torch.bool)
    forced[3, 2] = True
    assert mass_counts(probs.log(), 0.65, forced)[0, 0].tolist() == [2, 3, 1, 2]
    assert mass_counts(probs.log(), 0.74, forced)[0, 0].tolist() == [2, 3, 1, 3]


def test_placement_gives_spread_rows_more_blocks_than_concentrated_ones():
    """Budget 5 on a concentrated row and a spread one, no even share: each keeps its best block,
    then the 3 largest gains ``p (2 d + p)``: spread 0.3125, 0.1875, 0.0625 before concentrated
    0.05. With the even share (3/4 of 5, over 2 rows: 1 each) the same."""
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])[None, None]
    no_forced = torch.zeros(2, 4, dtype=torch.bool)
    for share in (0.0, EVEN_SHARE):
        selection = select_by_mass(probs.log(), torch.tensor([[5]]), no_forced, even_share=share)
        assert selection.counts[0, 0].tolist() == [1, 4]
        assert selection.indices[0, 0, 0, 0] == 0 and selection.indices[0, 0, 1].tolist() == [0, 1, 2, 3]
    # An even share of all of it: 2 and 3 (the fifth pair by gain: spread 0.1875 > 0.03).
    selection = select_by_mass(probs.log(), torch.tensor([[5]]), no_forced, even_share=1.0)
    assert selection.counts[0, 0].tolist() == [2, 3]


# ---------------------------------------------------------------------------------------------
# NaN is not hidden


def test_a_nan_query_gives_nan_in_its_own_output_row_only():
    q, k, v = _qkv(1, 960, 4, 2, 32)
    q[0, 500, 3, 7] = float("nan")
    for options in ({"sparsity": 0.75}, {"mass": 0.9}):
        out = attend(
            q, k, v, backend="block_sparse", context=AttentionContext(grid=(3, 8, 40), step=3), **options
        )
        assert out[0, 500, 3].isnan().all()
        finite = torch.ones(960, 4, dtype=torch.bool)
        finite[500, 3] = False
        assert torch.isfinite(out[0][finite]).all()


def test_a_nan_key_is_attended_by_every_row_of_its_heads():
    q, k, v = _qkv(1, 960, 4, 2, 32)
    k[0, 500, 1, 3] = float("nan")  # kv head 1: query heads 2-3
    context = AttentionContext(grid=(3, 8, 40), step=3)
    for options in ({"sparsity": 0.9}, {"mass": 0.5}):
        out = attend(q, k, v, backend="block_sparse", context=context, **options)
        _, selection = _select(q, k, context, **options)
        assert selection.mask()[0, 2:, :, 500 // BLOCK].all()
        assert out[:, :, 2:].isnan().all() and torch.isfinite(out[:, :, :2]).all()


# ---------------------------------------------------------------------------------------------
# Options


def test_the_backend_declares_its_own_options():
    assert get_backend("block_sparse").options is BlockSparseOptions
    layer = AttentionLayer("block_sparse", mass=0.9)
    assert layer.options == BlockSparseOptions(mass=0.9) and layer.options.sparsity == 0.75
    assert AttentionLayer("block_sparse", mass=0.8, sparsity=0.75).options.mass == 0.8  # the default: fine
    assert AttentionLayer("block_sparse", mass=1).options.mass == 1.0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mass": 0.0}, r"mass must be a number in \(0, 1\] or None"),
        ({"mass": 1.5}, r"mass must be a number in \(0, 1\] or None"),
        ({"mass": "0.9"}, r"mass must be a number in \(0, 1\] or None"),
        ({"mass": True}, r"mass must be a number in \(0, 1\] or None"),
        ({"mass": 0.9, "sparsity": 0.5}, r"mass or sparsity, not both \(got mass=0.9, sparsity=0.5\)"),
        ({"mass": 0.9, "min_kept": -0.1}, r"min_kept must be a number in \[0, 1\]"),
        ({"mass": 0.9, "max_kept": 1.5}, r"max_kept must be a number in \[0, 1\]"),
        (
            {"mass": 0.9, "min_kept": 0.6, "max_kept": 0.5},
            r"min_kept \(0.6\) must not exceed max_kept \(0.5\)",
        ),
        ({"max_kept": 0.5}, "min_kept and max_kept bound the budget of mass; they need mass"),
        ({"masss": 0.9}, r"it accepts: sparsity, skip_first_steps, mass, min_kept, max_kept"),
    ],
)
def test_bad_mass_options_name_the_backend_and_the_options(options, match):
    with pytest.raises(ValueError, match=f"'block_sparse'.*{match}"):
        AttentionLayer("block_sparse", **options)


# ---------------------------------------------------------------------------------------------
# Quality and traceability


def test_mass_is_as_close_to_dense_as_sparsity_at_the_same_kept_fraction():
    """Same placement, a budget set per head by the input instead of a fixed one: on this
    generator's heads (alike), within 5% either way."""
    grid = (8, 16, 32)  # 4096 tokens, 32 blocks
    q, k, v = structured_qkv(grid, 4, 64, device="cpu", dtype=torch.float32)
    context = AttentionContext(kind="self", grid=grid, step=3)
    ref = attend(q, k, v, backend="fa")
    layer = AttentionLayer("block_sparse", mass=0.9)
    kept = layer.impl_for(q.device).kept_fraction(q, k, context)
    assert 0.05 < kept < 0.95
    fixed = AttentionLayer("block_sparse", sparsity=round(1 - kept, 4))
    assert abs(fixed.impl_for(q.device).kept_fraction(q, k, context) - kept) < 0.01
    mass_err = rel_l2(layer(q, k, v, context=context), ref)
    fixed_err = rel_l2(fixed(q, k, v, context=context), ref)
    assert mass_err <= 1.05 * fixed_err, (mass_err, fixed_err)


def test_selection_traces_into_one_graph():
    """What ``compiled_on_gpu`` compiles: no graph break (a host sync or a Python branch on tensor
    values would make one), and the same lists as eager."""
    q, k, _ = _qkv(1, 864, 4, 2, 32)
    lengths = torch.tensor([800])
    traced = torch.compile(block_sparse._selection_lists, fullgraph=True, backend="eager")
    for mass in (None, 0.9):
        args = (q, k, 32**-0.5, 0.75, mass, 0.0, 1.0, 6, BLOCK, lengths)
        for got, want in zip(traced(*args), block_sparse._selection_lists(*args)):
            assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_selection_replayed_from_a_cuda_graph_equals_the_compiled_selection():
    """On CUDA the compiled selection replays from a graph per signature: the lists equal the compiled
    function's on fresh inputs (tail blocks, per-sample key lengths, ``mass``), a result survives
    later calls, and another stream or two threads selecting at once each get their own."""
    from concurrent.futures import ThreadPoolExecutor

    from attnbridge.attention.sparse.layout import compiled_on_gpu

    lists = block_sparse._selection_lists
    replayed, compiled = compiled_on_gpu(lists, torch.device("cuda")), torch.compile(lists, dynamic=False)

    def case(seed, seq, lengths, mass):
        q, k, _ = (x.cuda() for x in _qkv(len(lengths or [1]), seq, 4, 2, 32, seed=seed))
        key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda", dtype=torch.int32)
        args = (q, k, 32**-0.5, 0.75, mass, 0.0, 1.0, seq // BLOCK, BLOCK, key_lengths)
        return replayed(*args), compiled(*args)

    cases = [
        (0, 864, None, None),
        (1, 1000, [700, 1000], None),
        (2, 1000, [990, 640], 0.9),
        (3, 864, None, None),
    ]
    results = [case(*c) for c in cases]
    with torch.cuda.stream(torch.cuda.Stream()):  # another stream: a graph of its own
        results.append(case(6, 864, None, None))
    torch.cuda.synchronize()
    with ThreadPoolExecutor(2) as pool:
        results += list(
            pool.map(lambda c: case(*c), [(4, 1000, [1000, 333], None), (5, 1000, [512, 900], None)])
        )
    for got, want in results:
        for name, g, w in zip(("indices", "counts", "mask"), got, want):
            assert torch.equal(g, w), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["block_sparse", "rain_fusion"])
def test_eager_selection_code_is_capturable_in_a_cuda_graph(backend):
    """Past its recompile limit ``torch.compile`` runs the selection eagerly, and the graph then captures
    eager code: it must copy nothing from the host, and replay the eager lists."""
    from attnbridge.attention.backends import rain_fusion
    from attnbridge.attention.sparse.graphs import replayed

    for seed, seq, lengths in ((0, 1000, None), (1, 1000, [990, 640])):
        q, k, _ = (x.cuda() for x in _qkv(len(lengths or [1]), seq, 4, 2, 32, seed=seed))
        key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda", dtype=torch.int32)
        if backend == "block_sparse":
            lists = block_sparse._selection_lists
            args = (
                q,
                k,
                32**-0.5,
                0.75,
                0.9 if lengths else None,
                0.0,
                1.0,
                seq // BLOCK,
                BLOCK,
                key_lengths,
            )
        else:
            lists = rain_fusion._threshold_lists
            args = (q, k, 32**-0.5, 0.75, 0, seq // BLOCK, BLOCK, key_lengths)
        for name, got, want in zip(("indices", "counts", "mask"), replayed(lists)(*args), lists(*args)):
            assert torch.equal(got, want), name
