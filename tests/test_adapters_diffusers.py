"""enable_npu_attention on real (tiny, random-weight) diffusers Wan and Qwen-Image models.

Tolerances (float32, max abs difference of the transformer output against the unpatched model):
``sdpa`` 1e-5 (the same torch kernel, only the call path changes), ``fa`` 1e-4 (a different
float32 summation order). ``disable_npu_attention`` must restore bit-identical outputs.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from attnbridge.attention.api import AttentionLayer
from attnbridge.enable import disable_npu_attention, enable_npu_attention
from attnbridge.tiny_models import (
    tiny_qwen_image_pipeline,
    tiny_qwen_image_transformer,
    tiny_wan_pipeline,
    tiny_wan_transformer,
)
from tests.tiny_inputs import qwen_image_inputs, qwen_image_pipeline_kwargs, wan_inputs, wan_pipeline_kwargs

TOLERANCE = {"sdpa": 1e-5, "fa": 1e-4}
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture
def spy(monkeypatch):
    """Records (layer name, backend, context, q shape, k shape) of every AttentionLayer call."""
    calls = []
    original = AttentionLayer.__call__

    def recording(self, q, k, v, **kwargs):
        calls.append((self.name, self.backend, kwargs.get("context"), tuple(q.shape), tuple(k.shape)))
        return original(self, q, k, v, **kwargs)

    monkeypatch.setattr(AttentionLayer, "__call__", recording)
    return calls


def _processors(model):
    return dict(model.attn_processors)


@torch.no_grad()
def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _max_abs(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- outputs match the upstream model


@pytest.mark.parametrize("backend", ["sdpa", "fa"])
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_wan_output_matches_unpatched_and_disable_restores(backend, variant, spy):
    model = tiny_wan_transformer(image_dim=8 if variant == "i2v" else None)
    inputs = wan_inputs(image_tokens=4 if variant == "i2v" else 0)
    before = _processors(model)
    reference = _run(model, inputs)

    handle = enable_npu_attention(model, backend)
    patched = _run(model, inputs)
    assert spy, "the backend layer was never called"
    assert _max_abs(patched, reference) <= TOLERANCE[backend]
    # Each of 2 blocks: attn1 (self), attn2 on text, and on I2V attn2 on the 4 image tokens too.
    assert len(spy) == 2 * (3 if variant == "i2v" else 2)

    disable_npu_attention(model)
    assert not handle.enabled
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch.equal(_run(model, inputs), reference)


@pytest.mark.parametrize("backend", ["sdpa", "fa"])
def test_qwen_image_output_matches_unpatched_and_disable_restores(backend, spy):
    model = tiny_qwen_image_transformer()
    inputs = qwen_image_inputs()
    before = _processors(model)
    reference = _run(model, inputs)

    enable_npu_attention(model, backend)
    assert _max_abs(_run(model, inputs), reference) <= TOLERANCE[backend]
    assert len(spy) == 2

    disable_npu_attention(model)
    after = _processors(model)
    assert all(after[k] is before[k] for k in before)
    assert torch.equal(_run(model, inputs), reference)


PADDED_BATCH_TOLERANCE = {
    "sdpa": 1e-5,
    "fa": 1e-4,
    "sage": 1e-4,
    "laser": 1e-4,
    "block_sparse": 1e-4,
    "rain_fusion": 1e-4,
}


#: On CUDA in float32; ``sage`` is left out there: its kernel takes only float16 and bfloat16.
CUDA_PADDED = [pytest.param(b, "cuda", marks=CUDA_ONLY) for b in PADDED_BATCH_TOLERANCE if b != "sage"]


@pytest.mark.parametrize(("backend", "device"), [(b, "cpu") for b in PADDED_BATCH_TOLERANCE] + CUDA_PADDED)
def test_qwen_image_padded_text_batch_runs_the_backend_and_matches_unpatched(backend, device, spy):
    """A batch whose second prompt has 2 padding tokens: the backend itself serves the padding (as
    valid key lengths of the [image, text] sequence), per sample equal to the unpatched model."""
    model = tiny_qwen_image_transformer().to(device)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    inputs = qwen_image_inputs(batch=2, text_mask=mask)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    reference = _run(model, inputs)
    options = {"sparsity": 0.0} if backend in ("block_sparse", "rain_fusion") else {}
    enable_npu_attention(model, backend, **options)
    patched = _run(model, inputs)
    for sample in range(2):
        assert _max_abs(patched[sample], reference[sample]) <= PADDED_BATCH_TOLERANCE[backend], sample
    assert len(spy) == 2 and all(call[1] == backend for call in spy)
    assert torch.equal(spy[0][2].key_lengths.cpu(), torch.tensor([12 + 5, 12 + 3], dtype=torch.int32))
    spy.clear()
    inputs["encoder_hidden_states_mask"] = torch.ones(2, 5, dtype=torch.long, device=device)
    _run(model, inputs)
    assert len(spy) == 2 and spy[0][2].key_lengths is None  # no padding: no mask at all


@pytest.mark.parametrize(
    ("mask", "kept", "key_lengths"),
    [
        ([[1, 1, 1, 0, 0]], 3, None),  # one padded prompt: no mask left once its padding is dropped
        ([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], 4, [12 + 4, 12 + 2]),  # both padded, unequally
    ],
)
@pytest.mark.parametrize(("backend", "device"), [(b, "cpu") for b in PADDED_BATCH_TOLERANCE] + CUDA_PADDED)
def test_qwen_image_text_padded_in_every_prompt_is_left_out_of_the_keys(
    backend, device, mask, kept, key_lengths, spy
):
    """Text past the batch's longest prompt is padding in every sample: the joint call leaves it out of
    the keys, its queries still get their rows (in the joint call; laser, whose kernel wants
    S_q == S_kv, in a second call over the same keys), and the output equals the unpatched model's
    per sample."""
    mask = torch.tensor(mask)
    batch, text = mask.shape
    model = tiny_qwen_image_transformer().to(device)
    inputs = qwen_image_inputs(batch=batch, text_tokens=text, text_mask=mask)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    reference = _run(model, inputs)
    options = {"sparsity": 0.0} if backend in ("block_sparse", "rain_fusion") else {}
    enable_npu_attention(model, backend, **options)
    patched = _run(model, inputs)
    for sample in range(batch):
        assert _max_abs(patched[sample], reference[sample]) <= PADDED_BATCH_TOLERANCE[backend], sample
    calls = 2 if backend == "laser" else 1  # per layer
    assert len(spy) == 2 * calls and all(call[1] == backend for call in spy)
    _, _, joint, joint_q, joint_k = spy[0]
    assert joint.kind == "joint" and joint.num_text_tokens == kept and joint_k[1] == 12 + kept
    contexts = [joint]
    if calls == 1:
        assert joint_q[1] == 12 + text
    else:
        _, _, tail, tail_q, tail_k = spy[1]
        assert joint_q[1] == 12 + kept
        assert tail.kind == "cross" and tail_q[1] == text - kept and tail_k == joint_k
        contexts.append(tail)
    for context in contexts:
        if key_lengths is None:
            assert context.key_lengths is None
        else:
            assert context.key_lengths.cpu().tolist() == key_lengths


@pytest.mark.parametrize("family", ["qwen_image", "wan"])
def test_a_backend_that_runs_padded_calls_dense_says_so_once_at_enable(family, caplog):
    """``laser`` on CUDA runs padded calls dense (its per-sample lengths would sync): a model whose
    batches can be padded (Qwen-Image) is told so when patched, once, and not per call; Wan's inputs
    are never padded: nothing is said."""
    model = tiny_qwen_image_transformer() if family == "qwen_image" else tiny_wan_transformer()
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        enable_npu_attention(model, "laser", platform="cuda")
    said = caplog.text.count("which would sync on CUDA, so calls with padded keys")
    assert said == (1 if family == "qwen_image" else 0), caplog.text
    if family == "qwen_image" and torch.cuda.is_available():
        caplog.clear()
        inputs = qwen_image_inputs(batch=2, text_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
        with caplog.at_level(logging.WARNING, logger="attnbridge"):
            _run(model.cuda(), {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()})
        assert "padded" not in caplog.text


def test_laser_on_the_cpu_serves_padding_and_says_nothing_at_enable(caplog):
    model = tiny_qwen_image_transformer()
    with caplog.at_level(logging.WARNING, logger="attnbridge"):
        enable_npu_attention(model, "laser", platform="cpu")
    assert "padded keys" not in caplog.text


def test_qwen_image_padding_in_the_middle_of_a_prompt_is_refused():
    model = tiny_qwen_image_transformer()
    inputs = qwen_image_inputs(batch=2, text_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]]))
    enable_npu_attention(model, "fa")
    with pytest.raises(ValueError, match="real tokens first and its padding last"):
        _run(model, inputs)


def test_wan_fused_projections_match_unpatched():
    model = tiny_wan_transformer()
    model.fuse_qkv_projections()
    inputs = wan_inputs()
    reference = _run(model, inputs)
    enable_npu_attention(model, "fa")
    assert _max_abs(_run(model, inputs), reference) <= TOLERANCE["fa"]


@pytest.mark.parametrize("two_stage", [False, True])
def test_wan_pipeline_output_matches_and_disable_restores_class(two_stage):
    pipe = tiny_wan_pipeline(two_stage=two_stage)
    pipeline_class = type(pipe)
    reference = pipe(**wan_pipeline_kwargs()).frames

    handle = enable_npu_attention(pipe, "sdpa")
    assert isinstance(pipe, pipeline_class)
    patched = pipe(**wan_pipeline_kwargs()).frames
    assert _max_abs(patched, reference) <= TOLERANCE["sdpa"]
    components = {name.split(".")[0] for name in handle.layers}
    assert components == ({"transformer", "transformer_2"} if two_stage else {"transformer"})

    disable_npu_attention(pipe)
    assert type(pipe) is pipeline_class
    assert torch.equal(pipe(**wan_pipeline_kwargs()).frames, reference)


# ------------------------------------------------------------------- context seen by the backend


def test_wan_context_grid_kind_and_token_counts(spy):
    model = tiny_wan_transformer(image_dim=8)
    enable_npu_attention(model, "sdpa")
    _run(model, wan_inputs(frames=3, height=8, width=6, image_tokens=4))
    grid = (3, 4, 3)
    by_layer = {}
    for name, _, context, q_shape, k_shape in spy:
        by_layer.setdefault(name, []).append((context, q_shape, k_shape))
        assert context.grid == grid
        assert q_shape[1] == math.prod(grid)
    assert set(by_layer) == {f"blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)}
    for i in range(2):
        ((self_ctx, _, self_k),) = by_layer[f"blocks.{i}.attn1"]
        assert self_ctx.kind == "self" and self_k[1] == math.prod(grid)
        cross_keys = sorted(k[1] for _, _, k in by_layer[f"blocks.{i}.attn2"])
        assert all(ctx.kind == "cross" for ctx, _, _ in by_layer[f"blocks.{i}.attn2"])
        assert cross_keys == [4, 512]  # the image tokens, then the text


def test_qwen_image_context_is_joint_with_text_last(spy):
    model = tiny_qwen_image_transformer()
    enable_npu_attention(model, "sdpa")
    _run(model, qwen_image_inputs(grid_h=3, grid_w=4, text_tokens=5))
    assert len(spy) == 2
    for _, _, context, q_shape, _ in spy:
        assert context.kind == "joint" and context.grid == (1, 3, 4)
        assert context.num_text_tokens == 5 and q_shape[1] == 12 + 5  # [image, text]


def test_qwen_image_edit_style_shapes_stack_frames(spy):
    """Two same-size images (target + condition) stack along T so the grid covers every image token."""
    model = tiny_qwen_image_transformer()
    inputs = qwen_image_inputs(grid_h=2, grid_w=3)
    inputs["hidden_states"] = torch.randn(1, 12, 16)
    inputs["img_shapes"] = [[(1, 2, 3), (1, 2, 3)]]
    enable_npu_attention(model, "sdpa")
    _run(model, inputs)
    assert spy[0][2].grid == (2, 2, 3)


def test_qwen_image_mixed_size_images_get_a_raster_grid_sparse_backends_can_use():
    """Edit-style inputs with images of two sizes have no common spatial grid: the image tokens are
    one raster row, and block_sparse (sparsity 0 keeps every block) still equals dense."""
    model = tiny_qwen_image_transformer()
    inputs = qwen_image_inputs(grid_h=2, grid_w=3)
    inputs["hidden_states"] = torch.randn(1, 12, 16)
    inputs["img_shapes"] = [[(1, 2, 3), (1, 3, 2)]]
    reference = _run(model, inputs)
    enable_npu_attention(model, "block_sparse", sparsity=0.0, skip_first_steps=0)
    assert _max_abs(_run(model, inputs), reference) <= TOLERANCE["fa"]


def _dense_steps(spy, name):
    return [ctx.dense_step for layer, _, ctx, _, _ in spy if layer == name]


#: A sparse backend that keeps every block, so only the step count (dense_step) differs.
COUNTING = {"backend": "block_sparse", "sparsity": 0.0}


def test_wan_pipeline_step_advances_once_per_step_and_resets(spy):
    pipe = tiny_wan_pipeline()
    enable_npu_attention(pipe, skip_first_steps=1, **COUNTING)
    pipe(**wan_pipeline_kwargs(steps=3, cfg=True))
    # 3 steps x 2 CFG calls; only step 0 runs dense.
    assert _dense_steps(spy, "blocks.0.attn1") == [True, True, False, False, False, False]
    spy.clear()
    pipe(**wan_pipeline_kwargs(steps=2, cfg=False))
    assert _dense_steps(spy, "blocks.0.attn1") == [True, False]


def test_wan22_two_stage_pipeline_counts_steps_across_both_transformers():
    from attnbridge.attention import observe

    pipe = tiny_wan_pipeline(two_stage=True)
    handle = enable_npu_attention(pipe, skip_first_steps=2, **COUNTING)
    names = {id(layer): name for name, layer in handle.layers.items()}
    seen = []

    def record(layer, q, k, context):
        if names[id(layer)].endswith("blocks.0.attn1"):
            seen.append((names[id(layer)].split(".")[0], context.dense_step))

    with observe(record):
        pipe(**wan_pipeline_kwargs(steps=4, cfg=True))
    assert [dense for _, dense in seen] == [True] * 4 + [False] * 4
    components = [component for component, _ in seen]
    assert components[0] == "transformer" and components[-1] == "transformer_2"
    assert components == sorted(components)  # high-noise expert first, then the low-noise one


def test_qwen_image_pipeline_steps_with_true_cfg(spy):
    pipe = tiny_qwen_image_pipeline()
    enable_npu_attention(pipe, skip_first_steps=1, **COUNTING)
    pipe(**qwen_image_pipeline_kwargs(steps=3, cfg=True))
    first = [
        (ctx.dense_step, ctx.num_text_tokens, ctx.grid)
        for name, _, ctx, _, _ in spy
        if name == "transformer_blocks.0.attn"
    ]
    # cond (5 text tokens) then uncond (3) at every step, on the (1, 4, 4) packed grid.
    assert first == [(s == 0, n, (1, 4, 4)) for s in range(3) for n in (5, 3)]
    spy.clear()
    pipe(**qwen_image_pipeline_kwargs(steps=2, cfg=False))
    assert _dense_steps(spy, "transformer_blocks.0.attn") == [True, False]


def test_bare_transformer_step_restarts_when_timestep_rises(spy):
    model = tiny_wan_transformer(layers=1)
    handle = enable_npu_attention(model, skip_first_steps=1, **COUNTING)
    inputs = wan_inputs()
    for t in (900.0, 900.0, 500.0, 100.0, 900.0):  # steps 0, 0, 1, 2, 0
        inputs["timestep"] = torch.tensor([t])
        _run(model, inputs)
    assert _dense_steps(spy, "blocks.0.attn1") == [True, True, False, False, True]
    spy.clear()
    handle.reset_steps()
    inputs["timestep"] = torch.tensor([100.0])
    _run(model, inputs)
    assert spy[0][2].dense_step


def test_steps_are_not_read_without_skip_first_steps(spy):
    """Reading the timestep costs a host sync: a backend that needs no step count never does it."""
    model = tiny_wan_transformer(layers=1)
    handle = enable_npu_attention(model, **COUNTING)
    _run(model, wan_inputs())
    assert spy[0][2].step is None and not spy[0][2].dense_step
    assert handle._patch.steps.step == -1


# ----------------------------------------------------------------------------- errors change nothing


def test_unknown_object_raises_type_error_and_changes_nothing():
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        enable_npu_attention(linear, "sdpa")
    assert not disable_npu_attention(linear)
    with pytest.raises(TypeError, match="does not support builtins.str"):
        enable_npu_attention("wan", "sdpa")


def test_pipeline_without_supported_transformer_raises_and_changes_nothing():
    from diffusers import DDPMScheduler, DiffusionPipeline

    class ToyPipeline(DiffusionPipeline):
        def __init__(self, scheduler, unet):
            super().__init__()
            self.register_modules(scheduler=scheduler, unet=unet)

    pipe = ToyPipeline(scheduler=DDPMScheduler(), unet=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="has no transformer attnbridge supports"):
        enable_npu_attention(pipe, "sdpa")
    assert type(pipe) is ToyPipeline


@pytest.mark.parametrize(
    ("backend", "config", "match"),
    [
        ("nope", {}, "unknown attention backend 'nope'"),
        ("block_sparse", {"sparsity": 1.5}, r"sparsity must be a number in \[0, 1\)"),
        ("rain_fusion", {"skip_first_steps": -1}, "skip_first_steps must be an integer >= 0"),
        ("sdpa", {"sparsity": 0.5}, "does not take option"),
    ],
)
def test_bad_backend_or_config_raises_before_patching(backend, config, match):
    model = tiny_wan_transformer(layers=1)
    before = _processors(model)
    with pytest.raises(ValueError, match=match):
        enable_npu_attention(model, backend, **config)
    assert all(model.attn_processors[k] is before[k] for k in before)
    assert not model._forward_pre_hooks


def test_bad_platform_raises_before_patching():
    model = tiny_wan_transformer(layers=1)
    with pytest.raises(ValueError, match="unknown platform 'tpu'"):
        enable_npu_attention(model, "sdpa", platform="tpu")
    assert not model._forward_pre_hooks


def test_custom_processor_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_wan_transformer(layers=1)
    custom = AttnProcessor2_0()
    model.blocks[0].attn1.set_processor(custom)
    with pytest.raises(ValueError, match="blocks.0.attn1 uses attention processor AttnProcessor2_0"):
        enable_npu_attention(model, "sdpa")
    assert model.blocks[0].attn1.processor is custom
    assert not isinstance(model.blocks[0].attn2.processor, type(custom))


def test_enable_twice_replaces_and_disable_restores_the_first_originals(spy):
    model = tiny_wan_transformer(layers=1)
    inputs = wan_inputs()
    before = _processors(model)
    reference = _run(model, inputs)
    first = enable_npu_attention(model, "sdpa")
    second = enable_npu_attention(model, "fa")
    assert not first.enabled and second.enabled
    assert len(model._forward_pre_hooks) == 1
    _run(model, inputs)
    assert {backend for _, backend, _, _, _ in spy} == {"fa"}
    disable_npu_attention(model)
    assert all(model.attn_processors[k] is before[k] for k in before)
    assert torch.equal(_run(model, inputs), reference)


def test_handle_as_context_manager_restores():
    model = tiny_wan_transformer(layers=1)
    before = _processors(model)
    with enable_npu_attention(model, "sdpa") as handle:
        assert handle.enabled and len(handle.layers) == 2
    assert all(model.attn_processors[k] is before[k] for k in before)


def test_sparse_backend_keeps_cross_attention_dense():
    pytest.importorskip("attnbridge.attention.backends.block_sparse")
    model = tiny_wan_transformer(layers=1)
    handle = enable_npu_attention(model, "block_sparse", sparsity=0.5)
    backends = {name: layer.backend for name, layer in handle.layers.items()}
    assert backends == {"blocks.0.attn1": "block_sparse", "blocks.0.attn2": "fa"}
    assert handle.layers["blocks.0.attn1"].options.sparsity == 0.5


@pytest.mark.parametrize("family", ["wan", "qwen_image"])
def test_block_sparse_sees_the_right_grid_and_step(family):
    """End to end through the CPU block-sparse backend, which rejects a grid that does not hold
    exactly the sequence's image tokens (text first). sparsity=0 keeps every 128-token block, so it
    equals dense; at sparsity 0.5 the output changes unless step 0 < skip_first_steps keeps it dense."""
    pytest.importorskip("attnbridge.attention.backends.block_sparse")
    if family == "wan":
        model, inputs = tiny_wan_transformer(), wan_inputs(frames=3, height=32, width=32)  # 768 tokens
    else:
        model, inputs = tiny_qwen_image_transformer(), qwen_image_inputs(grid_h=16, grid_w=16)  # 5 + 256
    reference = _run(model, inputs)
    enable_npu_attention(model, "block_sparse", sparsity=0.0, skip_first_steps=0)
    assert _max_abs(_run(model, inputs), reference) <= TOLERANCE["fa"]
    enable_npu_attention(model, "block_sparse", sparsity=0.5, skip_first_steps=1)
    assert _max_abs(_run(model, inputs), reference) <= TOLERANCE["fa"]
    enable_npu_attention(model, "block_sparse", sparsity=0.5, skip_first_steps=0)
    assert _max_abs(_run(model, inputs), reference) > 1e-3


def test_positional_call_still_gives_the_grid(spy):
    model = tiny_wan_transformer(layers=1)
    inputs = wan_inputs(frames=2, height=8, width=6)
    enable_npu_attention(model, "sdpa")
    with torch.no_grad():
        model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])
    assert spy[0][2].grid == (2, 4, 3)


@pytest.mark.parametrize("family", ["wan", "qwen_image"])
def test_npu_platform_path_matches_unpatched(family, fake_npu):
    """platform="npu" with the emulated torch_npu: the Ascend sdpa kernel (npu_fusion_attention,
    float64 inside the emulation) serves every attention call; float32 output within 1e-5."""
    if family == "wan":
        model, inputs, calls_per_run = tiny_wan_transformer(image_dim=8), wan_inputs(image_tokens=4), 6
    else:
        model, inputs, calls_per_run = tiny_qwen_image_transformer(), qwen_image_inputs(), 2
    reference = _run(model, inputs)
    enable_npu_attention(model, "sdpa", platform="npu", strict=True)
    assert _max_abs(_run(model, inputs), reference) <= TOLERANCE["sdpa"]
    assert [name for name, _, _ in fake_npu.calls] == ["npu_fusion_attention"] * calls_per_run


def test_enabled_model_can_still_be_garbage_collected():
    import gc
    import weakref

    model = tiny_wan_transformer(layers=1)
    enable_npu_attention(model, "sdpa")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_vsa_on_joint_attention_is_refused_at_enable_and_changes_nothing():
    model = tiny_qwen_image_transformer()
    before = _processors(model)
    with pytest.raises(ValueError, match=r"backend 'vsa' .* does not serve joint attention"):
        enable_npu_attention(model, "vsa", sparsity=0.5)
    assert all(model.attn_processors[k] is before[k] for k in before)
