"""The ``vsa`` backend: tiling, buffer reuse, top-k arithmetic, and outputs against float64 references.

Tolerance: float32 inputs against a float64 reference built here from loops over the grid (not
from the backend's index code): ``atol = rtol = 2e-5``; bfloat16 (GPU only): ``atol = rtol = 3e-2``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnbridge.attention import AttentionContext, AttentionLayer
from attnbridge.attention.backends.fa import reference_attention
from attnbridge.attention.backends.vsa import (
    GATE_KEY,
    FlexVSAImpl,
    VSAMetadata,
    VSAMetadataBuilder,
    coarse_attention,
    fine_attention,
    load_fastvideo_kernel,
    tile_qkv,
)
from attnbridge.attention.backends.vsa_tiling import clear_tile_layouts, tile_layout, topk_tiles

ATOL = RTOL = 2e-5
GRIDS = [(4, 4, 4), (8, 4, 8), (5, 7, 9), (1, 3, 2), (3, 6, 5)]


def randn(*shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def slot_tokens(grid):
    """Token id at each padded slot (-1 at pads): tiles in raster order, raster inside a tile."""
    t_len, h_len, w_len = grid
    order = []
    for tt, th, tw in itertools.product(*(range(math.ceil(d / 4)) for d in grid)):
        for a, b, c in itertools.product(range(4), repeat=3):
            t, h, w = 4 * tt + a, 4 * th + b, 4 * tw + c
            inside = t < t_len and h < h_len and w < w_len
            order.append((t * h_len + h) * w_len + w if inside else -1)
    return torch.tensor(order)


def reference_coarse(q, k, v, grid):
    """Coarse stage in float64 from loops over the tiles: (coarse term per token [B,S,H,D], tile
    scores [B,H,n_tiles,n_tiles], tile of each token [S])."""
    q, k, v = (x.double() for x in (q, k, v))
    batch, seq, heads, dim = q.shape
    groups = heads // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    slots = slot_tokens(grid).view(-1, 64)  # [n_tiles, 64]
    n_tiles = slots.shape[0]
    tile_of = torch.empty(seq, dtype=torch.long)
    pooled = []
    for x in (q, k, v):
        tiles = torch.zeros(batch, n_tiles, heads, dim, dtype=torch.float64)
        for i in range(n_tiles):
            real = slots[i][slots[i] >= 0]
            tile_of[real] = i
            tiles[:, i] = x[:, real].mean(dim=1)  # mean over the tile's true size
        pooled.append(tiles.transpose(1, 2))
    scores = pooled[0] @ pooled[1].transpose(-1, -2) * dim**-0.5
    coarse = (torch.softmax(scores, -1) @ pooled[2]).transpose(1, 2)  # [B, n_tiles, H, D]
    return coarse[:, tile_of], scores, tile_of


def reference_vsa(q, k, v, grid, topk, gate=None):
    """VSA in float64: fine attention over each query tile's top-k key tiles plus the coarse term."""
    coarse_tok, scores, tile_of = reference_coarse(q, k, v, grid)
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    chosen = scores.topk(topk, dim=-1).indices  # [B, H, n_tiles, topk]
    allowed_tiles = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, chosen, True)
    allowed = allowed_tiles[:, :, tile_of][:, :, :, tile_of]  # [B, H, S, S]
    fine_scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    fine = (torch.softmax(fine_scores, -1) @ v).transpose(1, 2)
    return fine + (coarse_tok if gate is None else coarse_tok * gate.double()), scores


def qkv(grid, *, batch=2, heads=2, kv_heads=None, dim=64, seed=0):
    seq = math.prod(grid)
    kv_heads = kv_heads or heads
    q = randn(batch, seq, heads, dim, seed=seed)
    k = randn(batch, seq, kv_heads, dim, seed=seed + 1)
    v = randn(batch, seq, kv_heads, dim, seed=seed + 2)
    return q, k, v


# ---- tiling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_tile_order_matches_loops_and_untile_is_identity(grid):
    clear_tile_layouts()
    layout = tile_layout(grid, "cpu")
    x = randn(2, math.prod(grid), 3, 4, seed=1)
    tiled = layout.tile(x)
    slots = slot_tokens(grid)
    expected = torch.zeros(2, slots.numel(), 3, 4)
    expected[:, slots >= 0] = x[:, slots[slots >= 0]]
    assert torch.equal(tiled, expected)
    assert torch.equal(layout.untile(tiled), x)
    assert torch.equal(
        layout.untile_combined_index, layout.non_pad_index[layout.reverse_tile_partition_indices]
    )
    sizes = (slots.view(-1, 64) >= 0).sum(1)
    assert torch.equal(layout.variable_block_sizes.long(), sizes)


def test_tile_buffer_is_reused_and_pads_stay_zero():
    clear_tile_layouts()
    grid = (5, 7, 9)
    layout = tile_layout(grid, "cpu")
    assert tile_layout(grid, "cpu") is layout  # metadata cached per (grid, device)
    x = randn(2, math.prod(grid), 3, 4, seed=2)
    first = layout.tile(x)
    ptr = first.data_ptr()
    second = layout.tile(x + 1)
    assert second.data_ptr() == ptr and layout.tile_buf is second
    assert torch.equal(layout.untile(second), x + 1)
    assert torch.all(second[:, ~layout.key_valid] == 0)
    assert second[:, layout.key_valid].ne(0).all()  # real slots were overwritten with x + 1


def test_tile_buffer_is_reallocated_when_shape_or_dtype_changes():
    clear_tile_layouts()
    grid = (3, 6, 5)
    layout = tile_layout(grid, "cpu")
    x = randn(2, math.prod(grid), 3, 4, seed=3)
    buf = layout.tile(x)
    smaller = layout.tile(x[:1])
    assert smaller.shape[0] == 1 and smaller is not buf
    assert torch.equal(layout.untile(smaller), x[:1])
    as_double = layout.tile(x.double())
    assert as_double.dtype == torch.float64 and as_double is layout.tile_buf
    other = tile_layout((3, 6, 6), "cpu")
    assert other is not layout and other.tile_buf is None


def test_tile_rejects_a_sequence_that_is_not_the_grid():
    layout = tile_layout((4, 4, 4), "cpu")
    with pytest.raises(ValueError, match=r"does not match the latent grid \(4, 4, 4\)"):
        layout.tile(torch.randn(1, 65, 2, 8))


# ---- top-k arithmetic and config ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sparsity", "n_tiles", "topk"),
    [
        (0.875, 35, 5),
        (0.85, 20, 3),
        (0.0, 35, 35),
        (0.9, 10, 1),
        (0.5, 7, 4),
        (0.9999, 3, 1),
        (0.75, 624, 156),
    ],
)
def test_topk_arithmetic(sparsity, n_tiles, topk):
    assert topk_tiles(sparsity, n_tiles) == topk


def test_topk_counts_padded_tiles():
    # 5x7x9 = 315 tokens fill 4.9 tiles' worth of tokens but occupy 2*2*3 = 12 tiles.
    md = VSAMetadataBuilder().build(AttentionContext(grid=(5, 7, 9)), sparsity=0.5)
    assert md.topk == 6


@pytest.mark.parametrize(
    "config", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"VSA_sparsity": 1.5}, {"sparsity": True}]
)
def test_sparsity_outside_unit_interval_is_a_value_error(config):
    key = next(iter(config))
    with pytest.raises(ValueError, match=rf"'vsa': {key} must be a number in \[0, 1\)"):
        FlexVSAImpl(**config)
    with pytest.raises(ValueError, match=rf"'vsa': {key} must be a number in \[0, 1\)"):
        VSAMetadataBuilder().build(AttentionContext(grid=(4, 4, 4)), **config)


def test_vsa_sparsity_key_wins_over_sparsity():
    md = VSAMetadataBuilder().build(AttentionContext(grid=(8, 8, 8)), VSA_sparsity=0.5, sparsity=0.875)
    assert md.topk == 4


def test_cross_attention_and_no_grid_build_no_metadata():
    builder = VSAMetadataBuilder()
    assert builder.build(AttentionContext(kind="cross", grid=(4, 4, 4)), sparsity=0.5) is None
    assert builder.build(AttentionContext(kind="self"), sparsity=0.5) is None


# ---- outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("grid", "kv_heads"), [((3, 5, 6), 2), ((4, 4, 8), 2), ((3, 5, 6), 1)])
def test_all_tiles_kept_equals_dense_plus_coarse(grid, kv_heads):
    q, k, v = qkv(grid, kv_heads=kv_heads, seed=10)
    out = AttentionLayer("vsa", sparsity=0.0)(q, k, v, context=AttentionContext(grid=grid))
    dense = reference_attention(
        q.double(), k.double(), v.double(), causal=False, scale=64**-0.5, return_lse=False
    )
    coarse_tok, _, _ = reference_coarse(q, k, v, grid)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), dense + coarse_tok, atol=ATOL, rtol=RTOL)


def test_gate_scales_the_coarse_term():
    grid = (3, 5, 6)
    q, k, v = qkv(grid, seed=20)
    gate = randn(*q.shape, seed=23)
    out = AttentionLayer("vsa")(q, k, v, context=AttentionContext(grid=grid, extra={GATE_KEY: gate}))
    expected, _ = reference_vsa(q, k, v, grid, topk=4, gate=gate)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


def test_sparse_output_matches_float64_reference():
    grid = (5, 7, 9)  # 12 tiles, top-6 at sparsity 0.5
    q, k, v = qkv(grid, seed=30)
    out = AttentionLayer("vsa", sparsity=0.5)(q, k, v, context=AttentionContext(grid=grid))
    expected, _ = reference_vsa(q, k, v, grid, topk=6)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


def test_coarse_stage_picks_the_top_scoring_tiles_and_fine_stage_masks_the_rest():
    grid, topk = (5, 7, 9), 3
    q, k, v = qkv(grid, seed=40)
    layout = tile_layout(grid, "cpu")
    qt, kt, vt = tile_qkv(layout, q, k, v)
    coarse, kv_indices = coarse_attention(layout, qt, kt, vt, scale=64**-0.5, topk=topk)
    _, scores = reference_vsa(q, k, v, grid, topk=topk)
    picked = scores.gather(-1, kv_indices.long())
    kth = scores.topk(topk, dim=-1).values[..., -1:]
    assert kv_indices.dtype == torch.int32 and kv_indices.shape == (2, 2, 12, topk)
    assert (picked >= kth - 1e-6).all()
    assert (kv_indices.sort(-1).values.diff(dim=-1) > 0).all()  # no tile picked twice

    fine = fine_attention(layout, qt, kt, vt, kv_indices, scale=64**-0.5)
    # Masked dense float64 reference on the padded layout: selected tiles only, pad keys excluded.
    allowed = torch.zeros(2, 2, 12, 12, dtype=torch.bool).scatter_(-1, kv_indices.long(), True)
    allowed = allowed.repeat_interleave(64, 2).repeat_interleave(64, 3) & layout.key_valid
    s = qt.double().transpose(1, 2) @ kt.double().transpose(1, 2).transpose(-1, -2) * 64**-0.5
    ref = (torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vt.double().transpose(1, 2)).transpose(
        1, 2
    )
    real = layout.key_valid
    torch.testing.assert_close(fine[:, real].double(), ref[:, real], atol=ATOL, rtol=RTOL)


def test_forward_reuses_one_tile_buffer_across_calls_and_layers():
    clear_tile_layouts()
    grid = (3, 5, 6)
    context = AttentionContext(grid=grid)
    layers = [AttentionLayer("vsa", sparsity=0.5), AttentionLayer("vsa", sparsity=0.5)]
    q, k, v = qkv(grid, seed=50)
    layers[0](q, k, v, context=context)
    layout = tile_layout(grid, "cpu")
    ptr = layout.tile_buf.data_ptr()
    layers[1](q * 2, k, v, context=context)
    layers[0](q, k, v, context=context)
    assert layout.tile_buf.data_ptr() == ptr
    assert torch.all(layout.tile_buf[:, ~layout.key_valid] == 0)


def test_cross_attention_and_gridless_calls_run_dense_fa():
    grid = (3, 5, 6)
    q, _, _ = qkv(grid, seed=60)
    k, v = randn(2, 7, 2, 64, seed=61), randn(2, 7, 2, 64, seed=62)
    layer = AttentionLayer("vsa", sparsity=0.5)
    expected = reference_attention(
        q.double(), k.double(), v.double(), causal=False, scale=0.125, return_lse=False
    )
    out = layer(q, k, v, context=AttentionContext(kind="cross", grid=grid))
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    q2, k2, v2 = qkv(grid, seed=63)
    out = layer(q2, k2, v2)
    expected = reference_attention(
        q2.double(), k2.double(), v2.double(), causal=False, scale=0.125, return_lse=False
    )
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


def test_joint_attention_with_text_is_a_value_error():
    q, k, v = qkv((4, 4, 4), batch=1, seed=65)
    context = AttentionContext(kind="joint", grid=(4, 4, 4), num_text_tokens=8)
    with pytest.raises(ValueError, match="'vsa' runs self-attention over video tokens only"):
        AttentionLayer("vsa")(q, k, v, context=context)


def test_unsupported_head_size_is_a_value_error():
    q = torch.randn(1, 64, 2, 32)
    with pytest.raises(ValueError, match=r"'vsa' does not support head size 32; allowed: \[64, 128\]"):
        AttentionLayer("vsa")(q, q, q, context=AttentionContext(grid=(4, 4, 4)))


def test_explicit_metadata_is_used():
    grid = (4, 4, 4)
    q, k, v = qkv(grid, batch=1, seed=70)
    md = VSAMetadata(grid=grid, sparsity=0.0, topk=1)
    out = FlexVSAImpl().forward(q, k, v, metadata=md)
    expected, _ = reference_vsa(q, k, v, grid, topk=1)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_bfloat16_matches_float64_reference(dim):
    grid = (5, 7, 9)
    q, k, v = (x.bfloat16() for x in qkv(grid, batch=1, heads=2, dim=dim, seed=90))
    expected, _ = reference_vsa(q, k, v, grid, topk=6)
    out = AttentionLayer("vsa", sparsity=0.5)(
        *(x.cuda() for x in (q, k, v)), context=AttentionContext(grid=grid)
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().cpu(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(
    not torch.cuda.is_available() or load_fastvideo_kernel() is None,
    reason="FastVideo's vsa kernel package does not import here (needs CUDA 12)",
)
def test_fastvideo_kernel_matches_flex_path():
    grid = (8, 8, 8)
    q, k, v = (x.cuda().bfloat16() for x in qkv(grid, batch=1, heads=2, dim=128, seed=80))
    context = AttentionContext(grid=grid)
    flex = AttentionLayer("vsa", sparsity=0.5)(q, k, v, context=context)
    fused = AttentionLayer("vsa", sparsity=0.5, fastvideo_kernel=True)(q, k, v, context=context)
    torch.testing.assert_close(fused.float(), flex.float(), atol=3e-2, rtol=3e-2)


def test_fastvideo_kernel_that_cannot_run_is_logged_once_not_silently_dropped(caplog):
    from attnbridge import AttentionContext, AttentionLayer

    layer = AttentionLayer("vsa", sparsity=0.0, fastvideo_kernel=True)
    q, k, v = (torch.randn(1, 2 * 4 * 4, 2, 64) for _ in range(3))
    context = AttentionContext(kind="self", grid=(2, 4, 4))
    with caplog.at_level("WARNING", logger="attnbridge"):
        layer(q, k, v, context=context)
        layer(q, k, v, context=context)
    assert caplog.text.count("fastvideo_kernel=True but FastVideo's kernel cannot run here") == 1
