"""The sparse video backends (block_sparse, rain_fusion) and laser, on the CPU/CUDA FlexAttention path.

What a user relies on, each against an independent float64 reference:

* the block-sparse executor attends exactly the listed blocks, tail blocks and pad keys included
  (relative L2 <= 1e-5 in float32, <= 1.5e-2 in bfloat16; LSE to 1e-5); a row that lists no block
  gives 0 and LSE -inf;
* sparsity 0 and dense steps (``step < skip_first_steps`` or ``dense_step=True``) give the dense
  result, dense steps bit for bit the ``fa`` backend's output; cross-attention and bare calls are
  dense; the default is sparsity 0.75 from the first step;
* selection keeps what it must (rain_fusion's first frame, the text of joint attention, which
  comes last) and picks the expected blocks on hand-made scores; RainFusion's 8x8 reordering is
  the documented one (block_sparse's estimated-mass rule: tests/test_block_selection.py);
* NaN is not hidden: a NaN key or query gives NaN in every row that attends it;
* block_sparse, rain_fusion, vsa and fa run one after another in one process, each matching its
  float64 reference (CPU, and CUDA where present);
* bad options fail when the layer is made, naming the backend and the allowed range.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from attnbridge import AttentionLayer, attend, notices
from attnbridge.attention.backends.block_sparse import select_block_sparse
from attnbridge.attention.backends.laser import range_shift, uses_laser_kernel
from attnbridge.attention.backends.rain_fusion import rain_fusion_order, select_rain_fusion
from attnbridge.attention.contract import AttentionContext
from attnbridge.attention.options import kept_count
from attnbridge.attention.registry import get_backend
from attnbridge.attention.sparse import triton_kernel
from attnbridge.attention.sparse.flex import block_sparse_attention
from attnbridge.attention.sparse.layout import is_dense_step, reorders, resolve_layout
from attnbridge.attention.sparse.selection import (
    RANK_ESTIMATE,
    indices_to_mask,
    mask_to_selection,
    pool_blocks,
    threshold_mask,
)
from tests.emulation.reference import dense_reference, rel_l2
from tests.scripts_path import dense_rows, select_top_blocks
from tests.test_block_selection import documented_estimate, documented_mask

FP32_TOL = 1e-5
BF16_TOL = 1.5e-2
FP16_TOL = 3e-3  # laser computes from fp16-rounded inputs
SPARSE_BACKENDS = ["block_sparse", "rain_fusion"]
SELECTORS = {"block_sparse": select_block_sparse, "rain_fusion": select_rain_fusion}
IMAGE_ORDERS = {"block_sparse": None, "rain_fusion": rain_fusion_order}
GRID = (3, 8, 40)  # 960 tokens: 320 per frame, first frame = 3 blocks, last block half full
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def _qkv(batch, seq, heads, kv_heads, dim, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(batch, seq, heads, dim, dtype=dtype, device=device),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype, device=device),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype, device=device),
    )


def block_masked_reference(q, k, v, block_mask, block_size, key_valid=None):
    """float64 attention where query i sees key j iff block (i // bs, j // bs) is kept (and
    ``key_valid[j]``); a row that sees no key gives 0 and LSE -inf."""
    s_q, s_kv = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    visible = block_mask.repeat_interleave(block_size, -2)[..., :s_q, :]
    visible = visible.repeat_interleave(block_size, -1)[..., :s_kv]
    if key_valid is not None:
        visible = visible & key_valid
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v64), torch.logsumexp(scores, -1)


def _random_block_mask(batch, heads, nq, nk):
    mask = torch.rand(batch, heads, nq, nk) < 0.4
    return mask | torch.eye(nq, nk, dtype=torch.bool)  # every row keeps a block


def _selection_mask(backend, q, k, context, sparsity):
    """(layout, kept-block mask in mask order) the backend's selector gives for this call."""
    layout = resolve_layout(backend, q, context, IMAGE_ORDERS[backend])
    qs, ks = layout.to_mask_order(q), layout.to_mask_order(k)
    selection = SELECTORS[backend](
        qs, ks, q.shape[-1] ** -0.5, get_backend(backend).options(sparsity=sparsity), layout
    )
    return layout, selection.mask()


# ---------------------------------------------------------------------------------------------
# The block-sparse executor (shared with the VSA backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_executor_attends_exactly_the_listed_blocks_with_a_partial_tail(dtype):
    q, k, v = _qkv(2, 300, 4, 2, 32, dtype)  # 300 = 2 full blocks + a 44-token tail; GQA
    mask = _random_block_mask(2, 4, 3, 3)
    selection = mask_to_selection(mask)
    indices = selection.indices.clone()
    indices[selection.counts[..., None] <= torch.arange(3)] = 2  # junk past the count is ignored
    out, lse = block_sparse_attention(q, k, v, indices, selection.counts, block_size=128, return_lse=True)
    ref_out, ref_lse = block_masked_reference(q, k, v, mask, 128)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, 4, 300)
    assert rel_l2(out, ref_out) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_executor_gives_pad_keys_no_weight_with_64_token_blocks():
    q, k, v = _qkv(1, 200, 2, 2, 16)  # 4 blocks of 64, the last with 8 tokens
    key_valid = torch.rand(200) < 0.8
    key_valid[::64] = True
    mask = _random_block_mask(1, 2, 4, 4)
    selection = mask_to_selection(mask)
    out = block_sparse_attention(
        q, k, v, selection.indices[..., :3], selection.counts.clamp(max=3), block_size=64, key_valid=key_valid
    )
    narrowed = indices_to_mask(selection.indices[..., :3], selection.counts.clamp(max=3), 4)
    ref_out, _ = block_masked_reference(q, k, v, narrowed, 64, key_valid)
    assert rel_l2(out, ref_out) < FP32_TOL


def test_executor_broadcast_lists_and_a_row_that_sees_nothing():
    """Lists with batch and head 1 apply to every sample and head (GQA); a row with no listed
    block gives 0 and LSE -inf (no NaN); a partial last block."""
    q, k, v = _qkv(2, 300, 4, 2, 32)  # 3 blocks of 128, the last with 44 tokens
    mask = _random_block_mask(1, 1, 3, 3)
    mask[:, :, 0] = True  # a dense row
    mask[0, 0, 1] = False  # a row that sees nothing
    selection = mask_to_selection(mask)
    out, lse = block_sparse_attention(
        q, k, v, selection.indices, selection.counts, block_size=128, return_lse=True
    )
    ref_out, ref_lse = block_masked_reference(q, k, v, mask.expand(2, 4, 3, 3), 128)
    seen = torch.isfinite(ref_lse)
    assert out.shape == q.shape and lse.shape == (2, 4, 300) and not out.isnan().any()
    assert rel_l2(out, ref_out) < FP32_TOL
    assert torch.allclose(lse.double()[seen], ref_lse[seen], atol=1e-5)
    assert torch.equal(torch.isneginf(lse), ~seen) and torch.all(out[:, 128:256] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", ["none", "whole block", "tail"])
def test_executor_with_pad_keys_and_broadcast_lists_matches_the_reference(dtype, pad):
    """Pad keys (key_valid), a whole block of them included, with batch- and head-broadcast lists."""
    q, k, v = _qkv(2, 300, 4, 4, 32, dtype)
    key_valid = torch.ones(300, dtype=torch.bool)
    if pad == "whole block":
        key_valid[128:256] = False
    elif pad == "tail":
        key_valid[290:] = False
    mask = _random_block_mask(1, 1, 3, 3)
    mask[:, :, 2] = True
    selection = mask_to_selection(mask)
    out = block_sparse_attention(
        q,
        k,
        v,
        selection.indices,
        selection.counts,
        block_size=128,
        key_valid=None if pad == "none" else key_valid,
    )
    ref_out, _ = block_masked_reference(q, k, v, mask.expand(2, 4, 3, 3), 128, key_valid)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_l2(out, ref_out) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


def test_executor_gives_the_padded_keys_of_each_sample_no_weight():
    """``key_lengths`` (int [B]): keys from there on are that sample's padding."""
    q, k, v = _qkv(2, 300, 2, 2, 32)
    mask = _random_block_mask(2, 2, 3, 3)
    mask[..., 0] = True
    selection = mask_to_selection(mask)
    lengths = torch.tensor([300, 170])
    out = block_sparse_attention(
        q, k, v, selection.indices, selection.counts, block_size=128, key_lengths=lengths
    )
    for b, length in enumerate(lengths.tolist()):
        key_valid = torch.arange(300) < length
        ref_out, _ = block_masked_reference(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1], 128, key_valid
        )
        assert rel_l2(out[b : b + 1], ref_out) < FP32_TOL


def test_executor_rejects_index_lists_that_do_not_fit():
    q, k, v = _qkv(1, 256, 2, 2, 16)
    with pytest.raises(ValueError, match="does not fit q"):
        block_sparse_attention(
            q,
            k,
            v,
            torch.zeros(1, 2, 3, 2, dtype=torch.int32),
            torch.ones(1, 2, 3, dtype=torch.int32),
            block_size=128,
        )


# ---------------------------------------------------------------------------------------------
# Dense where the rules say dense


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_sparsity_zero_equals_dense(backend):
    q, k, v = _qkv(1, 960, 2, 1, 32)
    context = AttentionContext(kind="self", grid=GRID, step=3)
    out, lse = attend(q, k, v, backend=backend, context=context, sparsity=0.0, return_lse=True)
    ref_out, ref_lse = dense_reference(q, k, v)
    assert rel_l2(out, ref_out) < FP32_TOL
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_dense_steps_are_exactly_the_fa_output_and_later_steps_are_sparse(backend):
    q, k, v = _qkv(1, 960, 2, 2, 32)
    layer = AttentionLayer(backend, sparsity=0.75, skip_first_steps=5)
    dense = attend(q, k, v, backend="fa")
    for step in (0, 4):
        out = layer(q, k, v, context=AttentionContext(kind="self", grid=GRID, step=step))
        assert torch.equal(out, dense)
    # The adapter may say so directly, whatever the step.
    assert torch.equal(layer(q, k, v, context=AttentionContext(grid=GRID, step=40, dense_step=True)), dense)
    sparse = layer(q, k, v, context=AttentionContext(kind="self", grid=GRID, step=5))
    assert rel_l2(sparse, dense) > 1e-3  # random inputs: dropping blocks must change the output


def test_dense_step_rule():
    assert is_dense_step(AttentionContext(step=4), 5) and not is_dense_step(AttentionContext(step=5), 5)
    assert is_dense_step(AttentionContext(step=9, dense_step=True), 0)
    assert not is_dense_step(AttentionContext(), 5)  # no step: past the dense steps
    assert not is_dense_step(None, 5)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_default_options_are_sparsity_075_from_the_first_step(backend):
    layer = AttentionLayer(backend)
    assert (layer.options.sparsity, layer.options.skip_first_steps) == (0.75, 0)
    q, k, v = _qkv(1, 960, 2, 2, 32)
    context = AttentionContext(grid=GRID, step=0)
    out = layer(q, k, v, context=context)
    assert torch.equal(out, attend(q, k, v, backend=backend, context=context, sparsity=0.75))
    assert rel_l2(out, attend(q, k, v, backend="fa")) > 1e-3


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_cross_attention_and_bare_calls_are_dense(backend):
    q, _, _ = _qkv(1, 960, 2, 2, 32)
    _, k, v = _qkv(1, 77, 2, 2, 32)
    cross = AttentionContext(kind="cross", grid=GRID, step=9)
    out = attend(q, k, v, backend=backend, context=cross, sparsity=0.9)
    assert torch.equal(out, attend(q, k, v, backend="fa"))
    q, k, v = _qkv(1, 960, 2, 2, 32)
    assert torch.equal(attend(q, k, v, backend=backend, sparsity=0.9), attend(q, k, v, backend="fa"))


def documented_rain_fusion_order(grid):
    """RainFusion's token order written out from its description, one token at a time: each frame's
    8x8 patches as 64 consecutive tokens; if H or W is not a multiple of 8, frame 0 stays raster and
    later frames list their tiled region, then the bottom rows, then the right strip."""
    frames, height, width = grid
    top, left = height - height % 8, width - width % 8
    order = []
    for f in range(frames):
        base = f * height * width
        if f == 0 and (top, left) != (height, width):
            order += range(base, base + height * width)
            continue
        for r0 in range(0, top, 8):
            for c0 in range(0, left, 8):
                order += [base + r * width + c for r in range(r0, r0 + 8) for c in range(c0, c0 + 8)]
        order += [base + r * width + c for r in range(top, height) for c in range(width)]
        order += [base + r * width + c for r in range(top) for c in range(left, width)]
    return torch.tensor(order)


def documented_block_mask(q, k, sparsity, dense_blocks):
    """rain_fusion's kept blocks by its documented rule, with plain loops over rows (q, k in mask
    order, float64 pooling): no code shared with the selector under test. A block's probability is
    the softmax over its row of the pooled scores; a row keeps the blocks at or above its
    ``ceil(nb * (1 - s))``-th largest, plus the dense rows and columns."""
    batch, seq, heads, dim = q.shape
    nb = math.ceil(seq / 128)
    group = heads // k.shape[2]
    q_bar = torch.stack([q[:, i * 128 : (i + 1) * 128].double().mean(1) for i in range(nb)], 1)
    k_bar = torch.stack([k[:, i * 128 : (i + 1) * 128].double().mean(1) for i in range(nb)], 1)
    mask = torch.zeros(batch, heads, nb, nb, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(nb):
                scores = [float(q_bar[b, i, h] @ k_bar[b, j, h // group]) / math.sqrt(dim) for j in range(nb)]
                if i in dense_blocks:
                    kept = set(range(nb))
                else:
                    probs = torch.softmax(torch.tensor(scores), 0)
                    threshold = probs.sort(descending=True).values[math.ceil(nb * (1 - sparsity)) - 1]
                    kept = {j for j in range(nb) if probs[j] >= threshold} | set(dense_blocks)
                mask[b, h, i, sorted(kept)] = True
    return mask


def documented_sparse_reference(backend, q, k, v, grid, sparsity):
    """float64 attention over the blocks the documented rule keeps, in the caller's token order:
    rain_fusion's threshold above (patch order, first frame dense), block_sparse's estimated mass
    and budget placement from tests/test_block_selection.py (caller order, nothing forced)."""
    frames, height, width = grid
    q, k, v = (x.cpu() for x in (q, k, v))
    if backend == "block_sparse":
        nb = math.ceil(q.shape[1] / 128)
        budget = [[kept_count(sparsity, nb * nb)] * q.shape[2]] * q.shape[0]
        forced = [[False] * nb for _ in range(nb)]
        mask = documented_mask(documented_estimate(q, k, *RANK_ESTIMATE), budget, forced)
        ref, _ = block_masked_reference(q, k, v, mask, 128)
        return ref, mask
    order = documented_rain_fusion_order(grid)
    qs, ks, vs = (x[:, order] for x in (q, k, v))
    first_frame = math.ceil(height * width / 128) if frames > 1 else 0
    mask = documented_block_mask(qs, ks, sparsity, dense_blocks=list(range(first_frame)))
    ref_sorted, _ = block_masked_reference(qs, ks, vs, mask, 128)
    ref = torch.empty_like(ref_sorted)
    ref[:, order] = ref_sorted
    return ref, mask


#: 9 frames of 8x12 = 864 tokens: 7 blocks (the last 96 tokens), the first frame is block 0, and
#: RainFusion's patches (frames 1-8: one 8x8 patch then an 8x4 strip) straddle block boundaries.
SELECTION_GRID = (9, 8, 12)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_sparse_output_is_exact_attention_over_the_documented_blocks(backend):
    """End to end (reordering included): the output is the float64 attention over the blocks the
    documented rule keeps, derived here independently of the selectors, in the caller's order."""
    q, k, v = _qkv(1, 864, 4, 2, 32)
    context = AttentionContext(grid=SELECTION_GRID, step=1)
    out = attend(q, k, v, backend=backend, context=context, sparsity=0.5)
    ref, mask = documented_sparse_reference(backend, q, k, v, SELECTION_GRID, 0.5)
    forced = (torch.arange(7) == 0)[:, None] | (torch.arange(7) == 0)  # rain_fusion's first frame
    assert (mask & ~forced).any() and not mask.all()  # the scores decide some blocks, and some go
    assert rel_l2(out, ref) < FP32_TOL


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize(
    "grid", [(1, 16, 24), (1, 20, 20)], ids=["image-fills-blocks", "text-shares-a-block"]
)
def test_joint_attention_keeps_text_dense_both_ways(backend, grid):
    """Qwen-Image style: a one-frame image, then 150 text tokens LAST. Every block holding a text
    token is a dense row (those queries see everything, image tokens sharing the block included)
    and a dense column (every query sees all text); the image part is sparse."""
    n_text, n_image = 150, math.prod(grid)
    seq = n_image + n_text
    q, k, v = _qkv(1, seq, 2, 2, 32)
    context = AttentionContext(kind="joint", grid=grid, step=2, num_text_tokens=n_text)
    out = attend(q, k, v, backend=backend, context=context, sparsity=0.75)
    layout, mask = _selection_mask(backend, q, k, context, 0.75)
    text_start = n_image // 128  # 3 in both: blocks 3-4 hold text (400 image tokens: block 3 mixes)
    assert layout.first_frame_blocks == 0  # an image has no first frame to protect
    assert layout.text_start_block == text_start and dense_rows(layout) == (text_start, text_start + 1)
    assert mask[..., text_start:, :].all() and mask[..., :, text_start:].all()
    assert not mask.all()  # the image part is sparse
    ref, _ = dense_reference(q, k, v)
    dense_from = text_start * 128
    assert rel_l2(out[:, dense_from:], ref[:, dense_from:]) < FP32_TOL  # text queries see everything
    sparse_ref, _ = block_masked_reference(q, k, v, mask, 128)
    assert rel_l2(out, sparse_ref) < FP32_TOL


def test_joint_text_that_does_not_fit_is_an_error():
    q, k, v = _qkv(1, 384, 2, 2, 32)
    context = AttentionContext(kind="joint", grid=(1, 16, 24), step=1, num_text_tokens=384)
    with pytest.raises(
        ValueError, match="joint attention with 384 text tokens does not fit a sequence of 384"
    ):
        attend(q, k, v, backend="block_sparse", context=context, sparsity=0.5)


# ---------------------------------------------------------------------------------------------
# Selection


def test_pooling_averages_each_block_and_only_the_real_tail_tokens():
    x = torch.randn(2, 300, 3, 8)
    pooled = pool_blocks(x, 128)
    assert pooled.shape == (2, 3, 3, 8) and pooled.dtype == torch.float32
    assert torch.allclose(pooled[:, 1], x[:, 128:256].mean(1), atol=1e-6)
    assert torch.allclose(pooled[:, 2], x[:, 256:].mean(1), atol=1e-6)


def test_top_k_picks_the_highest_scoring_blocks_plus_forced_ones():
    scores = torch.tensor(
        [
            [0.0, 9.0, 1.0, 5.0, 2.0, 0.0],
            [8.0, 0.0, 7.0, 1.0, 0.0, 3.0],
            [0.0, 1.0, 0.0, 2.0, 9.0, 8.0],
            [4.0, 0.0, 3.0, 0.0, 1.0, 2.0],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        ]
    )[None, None]
    no_dense = torch.zeros(6, dtype=torch.bool)
    # keep ceil(6 * 0.5) = 3 per row: the diagonal (forced) + the 2 best others
    mask = select_top_blocks(scores, 0.5, no_dense, 0).mask()[0, 0]
    expected = [{0, 1, 3}, {0, 1, 2}, {2, 4, 5}, {0, 2, 3}, {4, 5, 3}, {5, 0, 1}]
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask] == expected
    # block 0 dense (a first frame): row 0 keeps all 6 and every row keeps column 0. The budget
    # is per head: at sparsity 1/3, 24 of 36 pairs, so the other 5 rows keep (24 - 6) // 5 = 3.
    first = torch.tensor([True, False, False, False, False, False])
    mask = select_top_blocks(scores, 1 / 3, first, 1).mask()[0, 0]
    assert mask[0].all() and mask[:, 0].all()
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask[1:]] == [
        {0, 1, 2},
        {0, 2, 4},
        {0, 2, 3},
        {0, 4, 5},
        {0, 5, 1},
    ]


def test_block_budget_is_one_minus_sparsity_per_head_first_frame_included():
    nb, first = 64, 4  # as in Wan 480p, where the first frame is 13 of 256 blocks
    dense = torch.arange(nb) < first
    for sparsity in (0.5, 0.75):
        mask = select_top_blocks(torch.randn(2, 3, nb, nb), sparsity, dense, first).mask()
        kept = mask.float().mean(dim=(-1, -2))
        assert ((kept <= 1 - sparsity) & (kept > 1 - sparsity - 1 / nb)).all()
        assert mask[..., :first, :].all() and mask[..., :, :first].all()


def test_rain_fusion_keeps_the_first_frame_dense_both_ways():
    """block_sparse forces nothing in self-attention (tests/test_block_selection.py)."""
    q, k, _ = _qkv(2, 960, 4, 2, 32)
    context = AttentionContext(kind="self", grid=GRID, step=7)
    layout, mask = _selection_mask("rain_fusion", q, k, context, 0.9)
    assert layout.first_frame_blocks == 3  # ceil(8 * 40 / 128)
    assert dense_rows(layout) == (0, 1, 2) and layout.text_start_block == layout.num_blocks == 8
    assert mask[..., :3, :].all() and mask[..., :, :3].all()


def test_rain_fusion_threshold_keeps_ties_and_forced_blocks():
    scores = torch.log(torch.tensor([[0.1, 0.4, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1]]))[None, None]
    scores = torch.cat([scores, scores], dim=2)  # 4 x 4
    mask = threshold_mask(scores, 0.75, torch.zeros(4, dtype=torch.bool))[0, 0]
    assert mask[0].tolist() == [False, True, True, False]  # keep 1, the tie keeps 2
    assert mask[1].tolist() == [True, False, False, False]
    forced = threshold_mask(scores, 0.75, torch.tensor([False, False, False, True]))[0, 0]
    assert forced[3].all() and forced[:, 3].all()


def test_rain_fusion_threshold_keeps_every_block_of_a_nan_row():
    scores = torch.randn(1, 2, 4, 4)
    scores[0, 1, 2, 3] = float("nan")
    mask = threshold_mask(scores, 0.75, torch.zeros(4, dtype=torch.bool))
    assert mask[0, 1, 2].all()  # the NaN reaches the output instead of being dropped
    assert mask[0, 0].sum(-1).eq(1).all() and mask[0, 1, [0, 1, 3]].sum(-1).eq(1).all()


def test_rain_fusion_order_tiles_8x8_patches():
    order = rain_fusion_order((2, 16, 16)).tolist()  # aligned: every frame tiled
    assert order[:16] == list(range(8)) + list(range(16, 24))  # patch (0, 0): rows 0-1 of it
    assert order[64:72] == list(range(8, 16))  # patch (0, 1) starts the second 64 tokens
    assert order[256:264] == list(range(256, 264))  # frame 1, patch (0, 0)
    order = rain_fusion_order((2, 10, 12)).tolist()  # unaligned: frame 0 raster
    assert order[:120] == list(range(120))
    frame1 = [t - 120 for t in order[120:]]
    tiled = [r * 12 + c for r in range(8) for c in range(8)]
    bottom = [r * 12 + c for r in range(8, 10) for c in range(12)]
    right = [r * 12 + c for r in range(8) for c in range(8, 12)]
    assert frame1 == tiled + bottom + right
    assert rain_fusion_order((1, 16, 16)) is None and rain_fusion_order((4, 6, 16)) is None


def test_layout_permutation_is_built_once_per_grid():
    q = torch.randn(1, 960, 2, 32)
    context = AttentionContext(grid=GRID, step=3)
    first = resolve_layout("rain_fusion", q, context, rain_fusion_order)
    again = resolve_layout("rain_fusion", q, context, rain_fusion_order)
    assert first.perm is again.perm and torch.equal(first.perm, documented_rain_fusion_order(GRID))
    assert torch.equal(first.perm[first.inverse], torch.arange(960))
    other = resolve_layout("rain_fusion", q, AttentionContext(grid=(3, 16, 20), step=3), rain_fusion_order)
    assert other.perm is not first.perm and torch.equal(other.perm, documented_rain_fusion_order((3, 16, 20)))
    assert resolve_layout("block_sparse", q, context).perm is None  # raster order: no gather


def test_whether_an_order_moves_tokens_is_asked_once_per_grid():
    """A sparse call asks whether its token order moves the grid's tokens; the order, built on the
    host, is computed once per grid in eager mode."""
    calls = []

    def order(grid):
        calls.append(grid)
        return rain_fusion_order(grid)

    assert reorders(order, GRID) and reorders(order, GRID)
    assert not reorders(order, (1, 16, 16)) and not reorders(order, (1, 16, 16))
    assert not reorders(None, GRID)
    assert calls == [GRID, (1, 16, 16)]


# ---------------------------------------------------------------------------------------------
# NaN is not hidden


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_a_nan_key_gives_nan_in_every_row_that_attends_it(backend):
    """One NaN in one key of kv head 1 (query heads 2-3 read it): its block's pooled score is NaN,
    which every row of those heads keeps (top-k ranks NaN first; RainFusion keeps every block of a
    NaN row), so every query of those heads is NaN; heads 0-1 stay finite and right."""
    q, k, v = _qkv(1, 960, 4, 2, 32)
    k[0, 500, 1, 3] = float("nan")
    context = AttentionContext(grid=GRID, step=3)
    out = attend(q, k, v, backend=backend, context=context, sparsity=0.75)
    layout, mask = _selection_mask(backend, q, k, context, 0.75)
    nan_block = int(layout.inverse[500]) // 128 if layout.inverse is not None else 500 // 128
    assert mask[0, 2:, :, nan_block].all()  # every row of heads 2-3 attends the NaN key's block
    assert out[:, :, 2:].isnan().all(dim=-1).all()
    assert torch.isfinite(out[:, :, :2]).all()
    qs, ks, vs = (layout.to_mask_order(x) for x in (q, k, v))
    ref, _ = block_masked_reference(qs[:, :, :2], ks[:, :, :1], vs[:, :, :1], mask[:, :2], 128)
    assert rel_l2(layout.to_mask_order(out)[:, :, :2], ref) < FP32_TOL
    # dense steps run fa, which does not hide NaN either
    dense = attend(q, k, v, backend=backend, context=AttentionContext(grid=GRID, step=3, dense_step=True))
    assert dense[:, :, 2:].isnan().all() and torch.isfinite(dense[:, :, :2]).all()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_a_nan_query_gives_nan_in_its_own_row_only(backend):
    q, k, v = _qkv(1, 960, 4, 2, 32)
    q[0, 500, 3, 7] = float("nan")
    context = AttentionContext(grid=GRID, step=3)
    out = attend(q, k, v, backend=backend, context=context, sparsity=0.75)
    assert out[0, 500, 3].isnan().all()
    finite = torch.ones(960, 4, dtype=torch.bool)
    finite[500, 3] = False
    assert torch.isfinite(out[0][finite]).all()
    if backend == "rain_fusion":  # the NaN query's block row keeps every block
        layout, mask = _selection_mask(backend, q, k, context, 0.75)
        assert mask[0, 3, int(layout.inverse[500]) // 128].all()


# ---------------------------------------------------------------------------------------------
# Options and errors


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": "0.5"}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": 0.5, "skip_first_steps": -1}, "skip_first_steps must be an integer >= 0"),
        ({"skip_first_steps": 1.5}, "skip_first_steps must be an integer >= 0"),
        (
            {"sparsty": 0.5},
            r"does not take option\(s\) \['sparsty'\]; it accepts: sparsity, skip_first_steps",
        ),
    ],
)
def test_bad_options_name_backend_and_range(backend, options, match):
    """Checked once, when the layer is made (before any call), and by ``attend``."""
    with pytest.raises(ValueError, match=f"'{backend}'.*{match}"):
        AttentionLayer(backend, **options)
    q, k, v = _qkv(1, 960, 2, 2, 32)
    with pytest.raises(ValueError, match=f"'{backend}'.*{match}"):
        attend(q, k, v, backend=backend, context=AttentionContext(grid=GRID, step=0), **options)


def test_sparsity_zero_warns_once_per_process_that_dense_is_better(caplog, monkeypatch):
    monkeypatch.setattr(notices, "_given", set())
    q, k, v = _qkv(1, 960, 2, 2, 32)
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        for _ in range(3):  # three layers (a model's blocks), each called twice
            layer = AttentionLayer("block_sparse", sparsity=0.0)
            for step in range(2):
                layer(q, k, v, context=AttentionContext(grid=GRID, step=step))
        AttentionLayer("block_sparse", sparsity=0.5).impl_for(CPU)
        assert caplog.text.count("dense backend") == 1 and "'block_sparse' with sparsity=0" in caplog.text
        AttentionLayer("rain_fusion", sparsity=0.0).impl_for(CPU)  # once per backend
    assert caplog.text.count("dense backend") == 2 and "'rain_fusion' with sparsity=0" in caplog.text


def test_grid_that_does_not_match_the_sequence_is_an_error():
    q, k, v = _qkv(1, 960, 2, 2, 32)
    with pytest.raises(
        ValueError, match=r"grid \(3, 8, 41\) holds 984 tokens but the call has 960 image tokens"
    ):
        attend(
            q, k, v, backend="block_sparse", context=AttentionContext(grid=(3, 8, 41), step=1), sparsity=0.5
        )


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_causal_is_refused(backend):
    q, k, v = _qkv(1, 256, 2, 2, 32)
    with pytest.raises(ValueError, match=f"'{backend}' does not support causal"):
        attend(q, k, v, backend=backend, causal=True, sparsity=0.5)


# ---------------------------------------------------------------------------------------------
# Every sparse backend and fa in one process, each against its float64 reference


def vsa_sparse_reference(q, k, v, grid, sparsity):
    """VSA from its definition, in float64: tokens grouped into 4x4x4 tiles of the grid (edge tiles
    partial); coarse = softmax attention between the tiles' means (over their real tokens),
    broadcast to every token of the query tile; each query tile keeps its ceil((1 - sparsity) *
    n_tiles) best key tiles by coarse score; fine = exact attention over the tokens of those tiles;
    out = fine + coarse. (tests/test_matrix.py's ``vsa_reference`` is the case that keeps every tile.)"""
    frames, height, width = grid
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    tiles_h, tiles_w = math.ceil(height / 4), math.ceil(width / 4)
    tile = (((t // 4) * tiles_h + h // 4) * tiles_w + w // 4).flatten()
    n_tiles = math.ceil(frames / 4) * tiles_h * tiles_w
    members = torch.nn.functional.one_hot(tile, n_tiles).double()  # [S, n_tiles]
    group = q.shape[2] // k.shape[2]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)

    def pool(x):
        return torch.einsum("sn,bshd->bnhd", members, x) / members.sum(0)[None, :, None, None]

    scale = q.shape[-1] ** -0.5
    tile_scores = torch.einsum("bihd,bjhd->bhij", pool(q64), pool(k64)) * scale
    coarse = torch.einsum("bhij,bjhd->bihd", torch.softmax(tile_scores, -1), pool(v64))
    top = tile_scores.topk(math.ceil((1 - sparsity) * n_tiles), dim=-1).indices
    kept = torch.zeros_like(tile_scores, dtype=torch.bool).scatter_(-1, top, True)
    visible = kept[:, :, tile][:, :, :, tile]  # [B, H, S, S]
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    fine = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores.masked_fill(~visible, -math.inf), -1), v64)
    return fine + coarse[:, tile]


#: (grid, sparsity): 1152 tokens = 9 full blocks; 864 = 7 blocks, the last with 96 tokens. Both
#: have a one-block first frame; block_sparse's other rows keep 4 and 3 blocks (2 and 1 chosen).
ONE_PROCESS_SHAPES = [(9, 8, 16), (9, 8, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_backends_in_one_process_match_references(device, dtype):
    """block_sparse, rain_fusion, vsa and fa one after another at two shapes (one not a multiple of
    128), as a model with mixed layers would run them: shared compiled kernels and caches must not
    leak from one backend or shape into the next. Each output against its float64 reference."""
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for grid in ONE_PROCESS_SHAPES:
        seq = math.prod(grid)
        q, k, v = _qkv(1, seq, 4, 2, 64, dtype, device)
        context = AttentionContext(grid=grid, step=1)
        for backend in ("block_sparse", "rain_fusion", "vsa", "fa"):
            out = attend(
                q, k, v, backend=backend, context=context, **({} if backend == "fa" else {"sparsity": 0.5})
            )
            assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
            if backend == "fa":
                ref, _ = dense_reference(q.cpu(), k.cpu(), v.cpu())
            elif backend == "vsa":
                ref = vsa_sparse_reference(q.cpu(), k.cpu(), v.cpu(), grid, 0.5)
            else:
                ref, mask = documented_sparse_reference(backend, q, k, v, grid, 0.5)
                assert not mask.all()
            assert rel_l2(out.cpu(), ref) < tol, (backend, grid)


# ---------------------------------------------------------------------------------------------
# laser off Ascend: the Laser contract on the dense kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_laser_reference_pads_and_masks_the_padding(dtype):
    q, k, v = _qkv(1, 2100, 2, 1, 64, dtype)  # S -> 2304 (pre_tokens 204), head_dim 64 -> 128, GQA
    out = attend(q, k, v, backend="laser")
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_l2(out, dense_reference(q, k, v)[0]) < FP16_TOL


def test_laser_reference_keeps_bf16_values_beyond_the_fp16_range():
    """bf16 ~1e5 (past fp16's 65504) stays finite and right to bf16 rounding: q, k, v are scaled
    by 1/256 before the fp16 cast. Channel 0 of every key is the same 1e5, which shifts a query's
    scores equally (softmax ignores it), so the attention stays well conditioned."""
    q, k, v = _qkv(1, 2100, 2, 2, 64, torch.bfloat16)
    k[..., 0] = 1e5
    v = (v.float() * 1e5).bfloat16()
    assert not torch.isfinite(k.half()).all() and not torch.isfinite(v.half()).all()  # plain cast: inf
    out = attend(q, k, v, backend="laser")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_l2(out, dense_reference(q, k, v)[0]) < BF16_TOL


def test_laser_range_shift_keeps_the_kernel_scale_within_fp16():
    """bf16 is divided by the largest power of two <= 256 with scale * shift**2 <= 65504 (the
    kernel holds its scale in fp16); fp16 is not shifted; a scale no shift fits runs dense fa."""
    assert range_shift(torch.bfloat16, 1 / 8) == 256  # 8192
    assert range_shift(torch.bfloat16, 1.0) == 128  # 256**2 = 65536 > 65504
    assert range_shift(torch.bfloat16, 4.0) == 64
    assert range_shift(torch.float16, 1.0) == 1 and range_shift(torch.float16, 60000.0) == 1
    assert range_shift(torch.bfloat16, 1e5) is None and range_shift(torch.float16, 1e5) is None
    q = torch.randn(1, 2304, 2, 64).bfloat16()
    assert uses_laser_kernel(q, q, causal=False, return_lse=False, scale=1.0, context=None)
    assert not uses_laser_kernel(q, q, causal=False, return_lse=False, scale=1e5, context=None)


def test_laser_reference_serves_key_padding_per_sample(monkeypatch):
    """The Laser contract on the CPU: sample 0 (2070 of 2100 keys) goes through the kernel's
    ``pre_tokens`` tail (2304 - 2070 = 234 keys), sample 1 (1900) past it to dense ``fa``; each
    equals exact attention over its valid keys."""
    from attnbridge.attention.backends.laser import LaserReferenceImpl

    seen = []
    kernel = LaserReferenceImpl.run_kernel
    monkeypatch.setattr(
        LaserReferenceImpl, "run_kernel", lambda self, *a: seen.append(a[3]) or kernel(self, *a)
    )
    lengths = [2070, 1900]
    q, k, v = _qkv(2, 2100, 2, 2, 64, torch.bfloat16)
    for b, n in enumerate(lengths):
        k[b, n:], v[b, n:] = 30.0, 1e4  # would swamp the output if seen
    out = attend(q, k, v, backend="laser", context=AttentionContext(key_lengths=torch.tensor(lengths)))
    assert seen == [2304 - 2070]
    for b, n in enumerate(lengths):
        want = dense_reference(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n])[0]
        assert rel_l2(out[b : b + 1], want) < BF16_TOL, b


def test_laser_reference_takes_a_prescaled_bf16_query_with_scale_1():
    """q already multiplied by 1/sqrt(D), scale=1.0: the shift drops to 128 (256 would put the
    kernel's scale at 65536, past fp16); the result is finite and right."""
    q, k, v = _qkv(1, 2100, 2, 2, 64, torch.bfloat16)
    q = (q.float() / 8).bfloat16()
    out = attend(q, k, v, backend="laser", scale=1.0)
    assert torch.isfinite(out).all()
    assert rel_l2(out, dense_reference(q, k, v, scale=1.0)[0]) < BF16_TOL


def test_laser_reference_is_dense_fa_below_2048_tokens_and_for_cross_attention():
    q, k, v = _qkv(1, 1000, 2, 2, 64)
    assert torch.equal(attend(q, k, v, backend="laser"), attend(q, k, v, backend="fa"))
    q2 = torch.randn(1, 2304, 2, 64)
    assert torch.equal(attend(q2, k, v, backend="laser"), attend(q2, k, v, backend="fa"))


# ---------------------------------------------------------------------------------------------
# CUDA: the Triton kernel (the product path) and FlexAttention (the reference) on the GPU

CUDA_KERNELS = {"flex": block_sparse_attention, "triton": triton_kernel.block_sparse_attention}


@cuda
@pytest.mark.parametrize("kernel", list(CUDA_KERNELS))
@pytest.mark.parametrize("block_size", [128, 64])
def test_cuda_compiled_executor_matches_reference(block_size, kernel):
    block_sparse_attention = CUDA_KERNELS[kernel]
    q, k, v = _qkv(2, 1000, 4, 2, 64, torch.bfloat16, "cuda")
    n = math.ceil(1000 / block_size)
    mask = _random_block_mask(2, 4, n, n).cuda()
    selection = mask_to_selection(mask)
    key_valid = torch.rand(1000, device="cuda") < 0.9
    key_valid[::block_size] = True
    for valid in (None, key_valid):
        out, lse = block_sparse_attention(
            q,
            k,
            v,
            selection.indices,
            selection.counts,
            block_size=block_size,
            key_valid=valid,
            return_lse=True,
        )
        ref_out, ref_lse = block_masked_reference(
            q.cpu(), k.cpu(), v.cpu(), mask.cpu(), block_size, None if valid is None else valid.cpu()
        )
        assert rel_l2(out.cpu(), ref_out) < BF16_TOL
        assert torch.allclose(lse.cpu().double(), ref_lse, atol=2e-2)


@cuda
@pytest.mark.parametrize("kernel", list(CUDA_KERNELS))
def test_cuda_compiled_executor_with_key_lengths_matches_reference(kernel):
    block_sparse_attention = CUDA_KERNELS[kernel]
    q, k, v = _qkv(2, 1000, 4, 4, 64, torch.float32, "cuda")
    mask = _random_block_mask(1, 4, 8, 8).cuda()
    mask[:, :, :2] = True  # dense rows, as a first frame makes
    selection = mask_to_selection(mask)
    lengths = torch.tensor([1000, 700], device="cuda")
    out = block_sparse_attention(
        q, k, v, selection.indices, selection.counts, block_size=128, key_lengths=lengths
    )
    for b, length in enumerate(lengths.tolist()):
        key_valid = torch.arange(1000) < length
        ref, _ = block_masked_reference(*(x[b : b + 1].cpu() for x in (q, k, v)), mask.cpu(), 128, key_valid)
        assert rel_l2(out[b : b + 1].cpu(), ref) < FP32_TOL


@cuda
def test_cuda_fresh_masks_do_not_recompile():
    from torch._dynamo.utils import counters

    q, k, v = _qkv(1, 1000, 4, 4, 64, torch.bfloat16, "cuda")
    layer = AttentionLayer("block_sparse", sparsity=0.75)
    context = AttentionContext(grid=(1, 20, 50), step=1)
    layer(q, k, v, context=context)
    before = counters["stats"]["unique_graphs"]
    for _ in range(4):
        q, k, v = _qkv(1, 1000, 4, 4, 64, torch.bfloat16, "cuda")
        layer(q, k, v, context=context)
    assert counters["stats"]["unique_graphs"] == before


@cuda
def test_cuda_fresh_pad_masks_do_not_recompile():
    """The VSA path: key_valid (pad keys) changes every call."""
    from torch._dynamo.utils import counters

    block_sparse_attention = triton_kernel.block_sparse_attention
    q, k, v = _qkv(1, 640, 2, 2, 64, torch.bfloat16, "cuda")

    def call():
        mask = _random_block_mask(1, 2, 10, 10).cuda()
        selection = mask_to_selection(mask)
        key_valid = torch.rand(640, device="cuda") < 0.9
        return block_sparse_attention(
            q, k, v, selection.indices, selection.counts, block_size=64, key_valid=key_valid
        )

    call()
    before = counters["stats"]["unique_graphs"]
    for _ in range(3):
        call()
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("backend", ["block_sparse", "rain_fusion"])
def test_padded_keys_change_nothing_in_a_sparse_call_over_several_blocks(backend):
    """Key padding at sparsity 0.5 over 5 blocks, the last one partly padded: whatever the padded keys
    and values hold (junk, NaN), neither the selection nor the kernel sees them; and the call did
    skip blocks (it differs from dense)."""
    q, k, v = _qkv(2, 640, 2, 2, 64)
    context = AttentionContext(key_lengths=torch.tensor([640, 520]), grid=(1, 20, 32), step=5)
    out = attend(q, k, v, backend=backend, sparsity=0.5, context=context)
    for junk in (100 * torch.randn(120, 2, 64), torch.full((120, 2, 64), float("nan"))):
        k_junk, v_junk = k.clone(), v.clone()
        k_junk[1, 520:], v_junk[1, 520:] = junk, 1e4
        assert torch.equal(attend(q, k_junk, v_junk, backend=backend, sparsity=0.5, context=context), out)
    dense = attend(q, k, v, backend="sdpa", context=context)
    assert (out - dense).abs().max() > 1e-3


def test_a_reordering_backend_says_once_that_padded_calls_run_dense(caplog, monkeypatch):
    """rain_fusion reorders the tokens of a grid of several frames, which would move padded keys off
    the end: such calls run dense ``fa``, and the user is told once."""
    monkeypatch.setattr(notices, "_given", set())
    q, k, v = _qkv(2, 640, 2, 2, 64)
    context = AttentionContext(key_lengths=torch.tensor([640, 520]), grid=(2, 20, 16), step=5)
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        for _ in range(2):
            out = attend(q, k, v, backend="rain_fusion", sparsity=0.5, context=context)
    assert caplog.text.count("would move the padded keys off the end") == 1, caplog.text
    assert torch.equal(out, attend(q, k, v, backend="fa", context=context))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize(
    ("grid", "kept_text", "tail", "key_lengths"),
    [
        ((1, 16, 20), 40, 24, None),  # the tail ends the keys' last (partial) block
        ((1, 16, 20), 40, 300, None),  # the tail adds query blocks of its own
        ((1, 12, 24), 20, 37, [300, 250]),  # 2 samples, padded keys
    ],
)
def test_a_joint_call_with_text_queries_past_its_keys_equals_the_split_calls(
    backend, device, grid, kept_text, tail, key_lengths
):
    """A joint call whose last ``tail`` text queries have no keys (text padding left out of them) runs in one
    kernel call: the queries with keys attend the blocks a call without the tail selects, the tail
    attends every key, as ``fa`` gives it; at sparsity 0.75, on fresh inputs."""
    s_kv = math.prod(grid) + kept_text
    batch = 1 if key_lengths is None else len(key_lengths)
    q, k, v = _qkv(batch, s_kv + tail, 4, 2, 32, device=device)
    k, v = k[:, :s_kv].contiguous(), v[:, :s_kv].contiguous()
    lengths = None if key_lengths is None else torch.tensor(key_lengths, dtype=torch.int32, device=device)
    context = AttentionContext(kind="joint", grid=grid, num_text_tokens=kept_text, key_lengths=lengths)
    layer = AttentionLayer(backend, sparsity=0.75)
    assert layer.impl_for(q.device).serves_text_tail(context)
    got = layer(q, k, v, context=context)
    head = layer(q[:, :s_kv], k, v, context=context)
    rest = attend(
        q[:, s_kv:], k, v, backend="fa", context=AttentionContext(kind="cross", key_lengths=lengths)
    )
    want = torch.cat([head, rest], dim=1)
    assert got.shape == q.shape and (got - want).abs().max() <= 1e-5
    dense_context = AttentionContext(kind="joint", grid=grid, dense_step=True, key_lengths=lengths)
    dense = layer(q[:, :s_kv], k, v, context=dense_context)
    assert rel_l2(head, dense) > 1e-3  # the head is sparse: the comparison above is not of dense calls
