"""The ``vsa`` backend: tiling, per-call tile buffers, options and top-k arithmetic, and outputs
against float64 references.

Tolerance: float32 inputs against a float64 reference built here from loops over the grid (not
from the backend's index code): ``atol = rtol = 2e-5``; bfloat16 (GPU only): ``atol = rtol = 3e-2``.
Calls that must not interfere (two threads, two layers on one grid) are compared bit for bit with
the same call made alone.
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest
import torch

from attnbridge.attention import AttentionContext, AttentionLayer
from attnbridge.attention.backends.fa import reference_attention
from attnbridge.attention.backends.vsa import (
    VSAImpl,
    VSAOptions,
    coarse_attention,
    fine_attention,
    load_fastvideo_kernel,
    tile_qkv,
    vsa_attention,
)
from attnbridge.attention.registry import make_impl
from attnbridge.attention.sparse.vsa_tiling import tile_layout, topk_tiles

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


def on(device, *tensors):
    return tuple(x.to(device) for x in tensors)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


# ---- tiling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
def test_tile_order_matches_loops_and_untile_is_identity(grid):
    tile_layout.cache_clear()
    layout = tile_layout(grid, "cpu")
    x = randn(2, math.prod(grid), 3, 4, seed=1)
    tiled = layout.tile_into(layout.new_buffer(2, 3, 4, x.dtype), x)
    slots = slot_tokens(grid)
    real = slots >= 0
    expected = torch.zeros(2, slots.numel(), 3, 4)
    expected[:, real] = x[:, slots[real]]
    assert torch.equal(tiled, expected)
    assert torch.equal(layout.untile(tiled), x)
    # The index tensors (built by arithmetic) against the loops: each token's slot and tile, the pads.
    slot_of_token = torch.empty(math.prod(grid), dtype=torch.long)
    slot_of_token[slots[real]] = torch.arange(slots.numel())[real]
    assert torch.equal(layout.untile_combined_index, slot_of_token)
    assert torch.equal(layout.token_tile_index, slot_of_token // 64)
    assert torch.equal(layout.key_valid, real)
    assert torch.equal(layout.pad_slots.sort().values, torch.nonzero(~real).flatten())
    assert torch.equal(layout.variable_block_sizes.long(), real.view(-1, 64).sum(1))
    assert layout.num_tiles == tuple(math.ceil(d / 4) for d in grid)
    assert layout.n_tiles == slots.numel() // 64 and layout.padded_length == slots.numel()
    assert layout.total_seq_length == math.prod(grid)


def test_new_buffer_has_zero_pads_whatever_the_allocator_returns_and_tile_into_fills_real_slots(
    monkeypatch,
):
    grid = (5, 7, 9)
    layout = tile_layout(grid, "cpu")
    # Memory from the allocator holds whatever was there before: make that NaN for this buffer.
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    buf = layout.new_buffer(2, 3, 4, torch.float64)
    monkeypatch.undo()
    assert buf.shape == (2, layout.padded_length, 3, 4) and buf.dtype == torch.float64
    assert torch.all(buf[:, ~layout.key_valid] == 0)
    x = randn(2, math.prod(grid), 3, 4, seed=2, dtype=torch.float64)
    layout.tile_into(buf, x)
    slots = slot_tokens(grid)
    expected = torch.zeros(2, slots.numel(), 3, 4, dtype=torch.float64)
    expected[:, slots >= 0] = x[:, slots[slots >= 0]]
    assert torch.equal(buf, expected)  # real slots hold the tokens, pads are still zero


def test_each_call_gets_its_own_tile_buffer():
    grid = (3, 6, 5)
    layout = tile_layout(grid, "cpu")
    x = randn(2, math.prod(grid), 3, 4, seed=3)
    first = layout.tile_into(layout.new_buffer(2, 3, 4, x.dtype), x)
    second = layout.tile_into(layout.new_buffer(2, 3, 4, x.dtype), x + 1)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(layout.untile(first), x)  # the second call did not write into the first's buffer
    assert torch.equal(layout.untile(second), x + 1)
    other = layout.new_buffer(1, 5, 8, torch.float64)
    assert other.shape == (1, layout.padded_length, 5, 8) and other.dtype == torch.float64


def test_tile_layout_is_cached_per_grid_and_rebuilt_after_cache_clear():
    layout = tile_layout((3, 6, 5), "cpu")
    assert tile_layout((3, 6, 5), "cpu") is layout
    assert tile_layout((3, 6, 6), "cpu") is not layout
    tile_layout.cache_clear()
    rebuilt = tile_layout((3, 6, 5), "cpu")
    assert rebuilt is not layout
    assert torch.equal(rebuilt.untile_combined_index, layout.untile_combined_index)


def test_tile_layout_traces_under_torch_compile_without_a_graph_break():
    grid = (5, 7, 9)

    def tile_pool_untile(x):
        layout = tile_layout(grid, x.device)
        buf = layout.tile_into(layout.new_buffer(x.shape[0], x.shape[2], x.shape[3], x.dtype), x)
        return layout.pool(buf), layout.untile(buf)

    x = randn(2, math.prod(grid), 3, 4, seed=4)
    torch._dynamo.reset()
    try:
        pooled, untiled = torch.compile(tile_pool_untile, backend="eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    expected_pooled, _ = tile_pool_untile(x)
    assert torch.equal(untiled, x)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-6, rtol=1e-6)


def test_tile_rejects_a_sequence_that_is_not_the_grid():
    layout = tile_layout((4, 4, 4), "cpu")
    with pytest.raises(ValueError, match=r"does not match the latent grid \(4, 4, 4\)"):
        layout.tile_into(layout.new_buffer(1, 2, 8, torch.float32), torch.randn(1, 65, 2, 8))


@pytest.mark.parametrize("grid", [(0, 4, 4), (4, 4)])
def test_a_grid_that_is_not_three_positive_sizes_is_a_value_error(grid):
    with pytest.raises(ValueError, match=r"'vsa': grid must be three positive sizes"):
        tile_layout(grid, "cpu")


# ---- top-k arithmetic and options --------------------------------------------------------------


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
    # 5x7x9 = 315 tokens fill 4.9 tiles' worth of tokens but occupy 2*2*3 = 12 tiles: top-6 of 12.
    grid = (5, 7, 9)
    assert tile_layout(grid, "cpu").n_tiles == 12
    q = torch.zeros(1, math.prod(grid), 1, 64)
    impl = AttentionLayer("vsa", sparsity=0.5).impl_for(q.device)
    assert impl.kept_fraction(q, q, AttentionContext(grid=grid)) == 6 / 12


@pytest.mark.parametrize(
    "config",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"VSA_sparsity": 1.5},
        {"sparsity": True},
        {"sparsity": [0.5]},
        {"sparsity": "0.5"},
    ],
)
def test_sparsity_that_is_not_a_number_in_unit_interval_is_refused_when_the_layer_is_made(config):
    key = next(iter(config))
    with pytest.raises(ValueError, match=rf"backend 'vsa': {key} must be a number in \[0, 1\)"):
        AttentionLayer("vsa", **config)


def test_numpy_sparsity_is_accepted_as_that_number():
    grid = (5, 7, 9)
    q, k, v = qkv(grid, batch=1, seed=5)
    context = AttentionContext(grid=grid)
    layer = AttentionLayer("vsa", sparsity=np.float32(0.5))
    assert layer.options.sparsity == 0.5 and type(layer.options.sparsity) is float
    plain = AttentionLayer("vsa", sparsity=0.5)
    assert torch.equal(layer(q, k, v, context=context), plain(q, k, v, context=context))


@pytest.mark.parametrize("value", ["false", "true", 1])
def test_fastvideo_kernel_that_is_not_a_bool_is_refused_when_the_layer_is_made(value):
    with pytest.raises(
        ValueError, match=rf"backend 'vsa': fastvideo_kernel must be True or False; got {value!r}"
    ):
        AttentionLayer("vsa", fastvideo_kernel=value)


def test_default_sparsity_is_0875():
    assert VSAOptions().sparsity == 0.875
    layer = AttentionLayer("vsa")
    assert layer.options.effective_sparsity == 0.875
    grid = (5, 7, 9)  # 12 tiles: ceil(0.125 * 12) = 2 key tiles per query tile
    q, k, v = qkv(grid, seed=6)
    out = layer(q, k, v, context=AttentionContext(grid=grid))
    expected, _ = reference_vsa(q, k, v, grid, topk=2)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ({"VSA_sparsity": 0.5, "sparsity": 0.875}, 4),
        ({"VSA_sparsity": 0.0, "sparsity": 0.875}, 8),  # 0.0 is given: it wins, though falsy
        ({"VSA_sparsity": None, "sparsity": 0.5}, 4),
    ],
)
def test_vsa_sparsity_key_wins_over_sparsity(options, kept):
    grid = (8, 8, 8)  # 8 tiles
    layer = AttentionLayer("vsa", **options)
    q = torch.zeros(1, math.prod(grid), 1, 64)
    assert layer.impl_for(q.device).kept_fraction(q, q, AttentionContext(grid=grid)) == kept / 8


def test_cross_attention_and_gridless_calls_select_no_tiles():
    impl = AttentionLayer("vsa", sparsity=0.5).impl_for(torch.device("cpu"))
    q, text = torch.zeros(1, 64, 1, 64), torch.zeros(1, 7, 1, 64)
    assert impl.kept_fraction(q, q, AttentionContext(kind="cross", grid=(4, 4, 4))) is None
    assert impl.kept_fraction(q, q, AttentionContext(kind="self")) is None
    assert impl.kept_fraction(q, q, None) is None
    assert impl.kept_fraction(q, text, AttentionContext(grid=(4, 4, 4))) is None


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


@pytest.mark.parametrize("per_head", [False, True])
def test_gate_scales_the_coarse_term(per_head):
    grid = (3, 5, 6)
    q, k, v = qkv(grid, seed=20)
    gate = randn(*q.shape[:3], 1 if per_head else q.shape[3], seed=23)
    layer = AttentionLayer("vsa", sparsity=0.0)
    out = layer(q, k, v, context=AttentionContext(grid=grid, gate=gate))
    expected, _ = reference_vsa(q, k, v, grid, topk=4, gate=gate)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "gate_shape",
    [
        (2, 64, 2, 64),  # broadcasts, but to a larger shape than q
        (1, 63, 2, 64),  # does not broadcast at all
    ],
)
def test_gate_that_does_not_broadcast_to_q_is_a_value_error(gate_shape):
    grid = (4, 4, 4)
    q, k, v = qkv(grid, batch=1, seed=24)
    context = AttentionContext(grid=grid, gate=torch.ones(gate_shape))
    shape = ", ".join(map(str, gate_shape))
    with pytest.raises(
        ValueError, match=rf"'vsa': gate \({shape}\) does not broadcast to q \(1, 64, 2, 64\)"
    ):
        AttentionLayer("vsa")(q, k, v, context=context)


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


def test_impl_made_from_an_options_instance_and_explicit_topk_are_used():
    grid = (5, 7, 9)  # 12 tiles
    q, k, v = qkv(grid, batch=1, seed=70)
    impl = make_impl("vsa", "cpu", VSAOptions(sparsity=0.875, VSA_sparsity=0.5))
    assert isinstance(impl, VSAImpl)
    out = impl.forward(q, k, v, context=AttentionContext(grid=grid))
    expected, _ = reference_vsa(q, k, v, grid, topk=6)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    out = vsa_attention(q, k, v, tile_layout(grid, "cpu"), topk=1, scale=64**-0.5)
    expected, _ = reference_vsa(q, k, v, grid, topk=1)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("device", DEVICES)
def test_two_threads_on_one_grid_each_get_their_single_thread_results(device):
    grid, iterations = (5, 7, 9), 6
    context = AttentionContext(grid=grid)
    layer = AttentionLayer("vsa", sparsity=0.5)  # one layer (one impl) shared by both threads
    inputs = [
        [on(device, *qkv(grid, batch=1, seed=100 + 10 * thread + i)) for i in range(iterations)]
        for thread in range(2)
    ]
    alone = [[layer(*x, context=context).clone() for x in thread_inputs] for thread_inputs in inputs]
    results: list[list] = [[None] * iterations for _ in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(thread):
        try:
            start.wait()
            for i, x in enumerate(inputs[thread]):
                results[thread][i] = layer(*x, context=context)
        except BaseException as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for thread, i in itertools.product(range(2), range(iterations)):
        assert torch.equal(results[thread][i], alone[thread][i]), f"thread {thread}, iteration {i}"


def test_two_layers_on_one_grid_interleaved_match_each_alone():
    grid = (3, 5, 6)
    context = AttentionContext(grid=grid)
    # Two models on one grid: different sparsity and head counts (so tile buffers of other shapes).
    make = [lambda: AttentionLayer("vsa", sparsity=0.5), lambda: AttentionLayer("vsa", sparsity=0.0)]
    inputs = [
        [qkv(grid, seed=50 + i) for i in range(3)],
        [qkv(grid, heads=4, kv_heads=2, seed=60 + i) for i in range(3)],
    ]
    alone = [[make[m]()(*x, context=context) for x in inputs[m]] for m in range(2)]
    layers = [make[0](), make[1]()]
    interleaved: list[list] = [[], []]
    for i in range(3):
        for m in range(2):
            interleaved[m].append(layers[m](*inputs[m][i], context=context))
    # Checked after all calls: an earlier output must not have been overwritten by a later call.
    for m, i in itertools.product(range(2), range(3)):
        assert torch.equal(interleaved[m][i], alone[m][i]), f"layer {m}, call {i}"
    expected, _ = reference_vsa(*inputs[0][0], grid, topk=2)  # 4 tiles, top-2 at sparsity 0.5
    torch.testing.assert_close(interleaved[0][0].double(), expected, atol=ATOL, rtol=RTOL)


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


@pytest.mark.parametrize(
    "context",
    [
        AttentionContext(kind="joint", grid=(4, 4, 4), num_text_tokens=8),
        AttentionContext(kind="self", grid=(4, 4, 4), key_lengths=torch.tensor([60])),
    ],
    ids=["joint-with-text", "key-padding"],
)
def test_joint_attention_with_text_or_key_padding_is_a_value_error(context):
    q, k, v = qkv((4, 4, 4), batch=1, seed=65)
    with pytest.raises(ValueError, match="'vsa' runs self-attention over video tokens only"):
        AttentionLayer("vsa")(q, k, v, context=context)


def test_unsupported_head_size_is_a_value_error():
    q = torch.randn(1, 64, 2, 32)
    with pytest.raises(ValueError, match=r"'vsa' does not support head size 32; allowed: 64, 128"):
        AttentionLayer("vsa")(q, q, q, context=AttentionContext(grid=(4, 4, 4)))


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


def test_fastvideo_kernel_that_cannot_run_is_logged_once_not_silently_dropped(caplog, monkeypatch):
    from attnbridge import AttentionContext, AttentionLayer, notices

    monkeypatch.setattr(notices, "_given", set())
    layer = AttentionLayer("vsa", sparsity=0.0, fastvideo_kernel=True)
    q, k, v = (torch.randn(1, 2 * 4 * 4, 2, 64) for _ in range(3))
    context = AttentionContext(kind="self", grid=(2, 4, 4))
    with caplog.at_level("WARNING", logger="attnbridge"):
        layer(q, k, v, context=context)
        layer(q, k, v, context=context)
    assert caplog.text.count("fastvideo_kernel=True but FastVideo's kernel cannot run here") == 1
