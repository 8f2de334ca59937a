"""Model-level parallelism through ``enable_npu_attention``: tiny real diffusers / transformers
models on 2 spawned gloo ranks (CPU) give the single-process output.

* Wan (ring 2, Ulysses 2; T2V, I2V, per-token timestep) and Qwen-Image (ring 2, Ulysses 2): the
  transformer output on every rank equals the unpatched model's, max abs difference <= 1e-5 in
  float32 (outputs are O(1); partials are merged in float32, so only the summation order changes:
  observed ~5e-7). Token counts are odd, so the padding path runs; each rank must
  really hold about half of the tokens (checked at ``blocks.0``).
* Qwen3-MoE, cp_size 2, packed batch [5, 17, 9]: the natural-order logits equal each sequence's
  unpatched logits, max abs difference <= 1e-5.
* Misconfigurations are ``ValueError`` naming the cause, and leave the model untouched;
  ``disable_npu_attention`` gives the original processors back and bit-identical outputs.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from attnbridge.enable import HANDLE_ATTR, disable_npu_attention, enable_npu_attention
from attnbridge.tiny_models import tiny_qwen3_moe, tiny_qwen_image_transformer, tiny_wan_transformer
from tests.parallel_utils import run_cases, values
from tests.tiny_inputs import qwen_image_inputs, wan_inputs

TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Helpers and cases run inside the spawned ranks (module level so that spawn can pickle them).


@torch.no_grad()
def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _snapshot(model):
    return dict(model.attn_processors), _hook_count(model)


def _unchanged(model, snapshot) -> bool:
    processors, hooks = snapshot
    now = model.attn_processors
    return (
        now.keys() == processors.keys()
        and all(now[k] is processors[k] for k in processors)
        and _hook_count(model) == hooks
        and HANDLE_ATTR not in model.__dict__
    )


def _local_tokens(block):
    """Records the sequence length of the hidden states entering ``block`` (this rank's chunk)."""
    seen = []
    handle = block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(_hidden(args, kwargs)), with_kwargs=True
    )
    return seen, handle


def _hidden(args, kwargs):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return hidden.shape[1]


def diffusers_case(info, *, family, ring, ulysses, variant="t2v"):
    """Reference (unpatched) vs sequence-parallel output on this rank, then disable."""
    if family == "wan":
        model = tiny_wan_transformer(image_dim=8 if variant == "i2v" else None)
        inputs = wan_inputs(frames=3, height=6, width=6, image_tokens=4 if variant == "i2v" else 0)
        tokens = 27  # patched grid (3, 3, 3): odd, so the last rank's chunk is padded
        if variant == "per_token_timestep":  # Wan 2.2 TI2V passes [B, tokens]
            inputs["timestep"] = torch.linspace(100.0, 900.0, tokens)[None]
        block = model.blocks[0]
    else:
        model = tiny_qwen_image_transformer()
        inputs = qwen_image_inputs(grid_h=3, grid_w=5, text_tokens=5)
        tokens = 15
        block = model.transformer_blocks[0]
    snapshot = _snapshot(model)
    reference = _run(model, inputs)

    handle = enable_npu_attention(model, "fa", ring_degree=ring, ulysses_degree=ulysses)
    seen, hook = _local_tokens(block)
    out = _run(model, inputs)
    hook.remove()
    parallel = {"ring": handle.parallel.ring_degree, "ulysses": handle.parallel.ulysses_degree}

    disable_npu_attention(model)
    restored = _run(model, inputs)
    return {
        "max_abs": (out - reference).abs().max().item(),
        "checksum": out.double().sum().item(),
        "local_tokens": seen,
        "expected_local": math.ceil(tokens / info.world_size),
        "parallel": parallel,
        "restored_bitwise": torch.equal(restored, reference),
        "unchanged_after_disable": _unchanged(model, snapshot),
    }


def wan_pipeline_case(info):
    """A whole (tiny) WanPipeline run, 2 steps, with the transformer's sequence split over the ranks."""
    from attnbridge.tiny_models import tiny_wan_pipeline
    from tests.tiny_inputs import wan_pipeline_kwargs

    pipe = tiny_wan_pipeline()
    reference = pipe(**wan_pipeline_kwargs(steps=2, cfg=False)).frames
    enable_npu_attention(pipe, "fa", ring_degree=info.world_size)
    out = pipe(**wan_pipeline_kwargs(steps=2, cfg=False)).frames
    disable_npu_attention(pipe)
    return {"max_abs": (out - reference).abs().max().item()}


def qwen3_moe_case(info, *, seq_lens):
    from attnbridge.parallel_prefill import cp_prefill

    model = tiny_qwen3_moe()
    gen = torch.Generator().manual_seed(5)
    sequences = [torch.randint(3, 128, (n,), generator=gen) for n in seq_lens]
    with torch.no_grad():
        reference = [model(input_ids=ids[None]).logits[0] for ids in sequences]
    implementation = model.config._attn_implementation

    enable_npu_attention(model, "fa", cp_size=info.world_size)
    logits = cp_prefill(model, sequences)
    enabled_implementation = model.config._attn_implementation
    disable_npu_attention(model)
    return {
        "shapes": [list(x.shape) for x in logits],
        "max_abs": max((a - b).abs().max().item() for a, b in zip(logits, reference)),
        "implementation_kept": enabled_implementation == "attnbridge_fa",
        "implementation_restored": model.config._attn_implementation == implementation,
    }


def error_case(info, *, kind):
    """The ValueError message on this rank and whether the model is still as it was."""
    from attnbridge.parallel_prefill import cp_prefill

    model = tiny_qwen3_moe() if kind.startswith("cp_") else tiny_wan_transformer(layers=1)
    snapshot = None if kind.startswith("cp_") else _snapshot(model)
    message = None
    try:
        if kind == "degrees":
            enable_npu_attention(model, "fa", ring_degree=2, ulysses_degree=2)
        elif kind == "ring_sdpa":
            enable_npu_attention(model, "sdpa", ring_degree=2)
        elif kind == "cp_short":
            enable_npu_attention(model, "fa", cp_size=2)
            cp_prefill(model, [torch.arange(3, 8), torch.arange(3, 6)])
        elif kind == "cp_not_enabled":
            cp_prefill(model, [torch.arange(3, 11)])
    except ValueError as error:
        message = str(error)
    if kind.startswith("cp_"):
        disable_npu_attention(model)
        return {"message": message, "unchanged": True}
    return {"message": message, "unchanged": _unchanged(model, snapshot)}


def short_sequence_case(info):
    """A Wan latent of one token cannot be split; the error comes at the forward, and the enabled
    model keeps working for a valid input afterwards."""
    model = tiny_wan_transformer(layers=1)
    valid = wan_inputs(frames=1, height=4, width=4)
    reference = _run(model, valid)
    enable_npu_attention(model, "fa", ring_degree=2)
    message = None
    try:
        _run(model, wan_inputs(frames=1, height=2, width=2))
    except ValueError as error:
        message = str(error)
    after = _run(model, valid)
    disable_npu_attention(model)
    return {"message": message, "still_works": (after - reference).abs().max().item() <= TOL}


MODEL_CASES = {
    "wan_ring2": dict(family="wan", ring=2, ulysses=1),
    "wan_ulysses2": dict(family="wan", ring=1, ulysses=2),
    "wan_i2v_ring2": dict(family="wan", ring=2, ulysses=1, variant="i2v"),
    "wan_per_token_timestep_ring2": dict(family="wan", ring=2, ulysses=1, variant="per_token_timestep"),
    "qwen_image_ring2": dict(family="qwen_image", ring=2, ulysses=1),
    "qwen_image_ulysses2": dict(family="qwen_image", ring=1, ulysses=2),
}
ERROR_KINDS = {
    "degrees": r"ring_degree \(2\) x ulysses_degree \(2\) = 4 must equal the world size \(2\)",
    "ring_sdpa": r"ring attention \(ring_degree > 1\) merges partial results through the softmax LSE, which backend 'sdpa' does not return",
    "cp_short": r"cp_size=2 cuts every sequence into 4 blocks.*\[5, 3\]",
    "cp_not_enabled": r"not enabled for context parallelism: call enable_npu_attention\(model, 'fa', cp_size=N\)",
}


@pytest.fixture(scope="module")
def world2():
    cases = [(name, functools.partial(diffusers_case, **kw)) for name, kw in MODEL_CASES.items()]
    cases.append(("qwen3_moe_cp2", functools.partial(qwen3_moe_case, seq_lens=[5, 17, 9])))
    cases += [(f"error_{kind}", functools.partial(error_case, kind=kind)) for kind in ERROR_KINDS]
    cases.append(("short_sequence", short_sequence_case))
    cases.append(("wan_pipeline_ring2", wan_pipeline_case))
    return run_cases(2, cases)


def joint_case(info, *, ring, ulysses, text=5, image=13):
    """Qwen-Image's joint attention with replicated text and a sharded image sequence, against the
    float64 dense attention of ``[text, image]`` (no model: the 4-rank spawn stays fast)."""
    from attnbridge.adapters.joint_parallel import joint_attention_replicated_text
    from attnbridge.attention import AttentionLayer
    from attnbridge.attention.parallel import (
        ParallelConfig,
        build_parallel_groups,
        gather_sequence,
        shard_sequence,
    )
    from tests.emulation.reference import dense_reference, rel_l2

    q, k, v = (torch.randn(2, text + image, 4, 16) for _ in range(3))
    groups = build_parallel_groups(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    image_local = tuple(shard_sequence(t[:, text:], groups)[0] for t in (q, k, v))
    txt_out, img_local = joint_attention_replicated_text(
        AttentionLayer("fa"), groups, (q[:, :text], k[:, :text], v[:, :text]), image_local, real_len=image
    )
    out = torch.cat([txt_out, gather_sequence(img_local, groups, image)], dim=1)
    return {"rel_l2": rel_l2(out, dense_reference(q, k, v)[0]), "local_image": img_local.shape[1]}


WORLD4_CASES = {
    "joint_ring2_ulysses2": dict(ring=2, ulysses=2),
    "joint_ring4": dict(ring=4, ulysses=1),
    "joint_ulysses4": dict(ring=1, ulysses=4),
}


@pytest.fixture(scope="module")
def world4():
    return run_cases(4, [(name, functools.partial(joint_case, **kw)) for name, kw in WORLD4_CASES.items()])


# ---------------------------------------------------------------------------------------------
# Distributed tests.


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_sequence_parallel_model_equals_unpatched(world2, name):
    results = values(world2, name)
    for rank, result in enumerate(results):
        assert result["max_abs"] <= TOL, (rank, result)
        # The sequence really was split: blocks.0 saw this rank's chunk only.
        assert result["local_tokens"] == [result["expected_local"]], result
        assert result["restored_bitwise"] and result["unchanged_after_disable"], result
    # Outputs are gathered, so every rank returns the same tensor.
    assert len({r["checksum"] for r in results}) == 1


@pytest.mark.parametrize("name", list(WORLD4_CASES))
def test_joint_attention_with_replicated_text_on_4_ranks_equals_dense(world4, name):
    for result in values(world4, name):
        assert result["rel_l2"] < 1e-5, result  # float32 vs the float64 reference
        assert result["local_image"] == 4, result  # 13 image tokens padded to 16 over 4 ranks


def test_wan_pipeline_with_ring_equals_unpatched(world2):
    for result in values(world2, "wan_pipeline_ring2"):
        assert result["max_abs"] <= TOL, result


def test_qwen3_moe_cp_prefill_equals_per_sequence_logits(world2):
    for result in values(world2, "qwen3_moe_cp2"):
        assert result["shapes"] == [[5, 128], [17, 128], [9, 128]]
        assert result["max_abs"] <= TOL, result
        assert result["implementation_kept"] and result["implementation_restored"], result


@pytest.mark.parametrize("kind", list(ERROR_KINDS))
def test_world2_misconfiguration_is_a_clear_error_and_changes_nothing(world2, kind):
    for result in values(world2, f"error_{kind}"):
        assert result["message"] is not None and re.search(ERROR_KINDS[kind], result["message"]), result
        assert result["unchanged"], result


def test_sequence_too_short_for_the_ranks_is_a_clear_error(world2):
    for result in values(world2, "short_sequence"):
        assert re.search(r"sequence of 1 tokens cannot be split over 2", result["message"] or ""), result
        assert result["still_works"], result


# ---------------------------------------------------------------------------------------------
# Single process: checks that need no process group.


@pytest.fixture
def no_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize(
    ("make", "kwargs", "match"),
    [
        (
            tiny_wan_transformer,
            dict(ring_degree=2),
            r"= 2 must equal the world size \(1\).*launch with torchrun",
        ),
        (tiny_wan_transformer, dict(ring_degree=0), "ring_degree must be a positive integer; got 0"),
        (tiny_wan_transformer, dict(ring_degree=2, backend="sdpa"), "backend 'sdpa' does not return"),
        (tiny_wan_transformer, dict(ring_degree=2, backend="block_sparse"), "splits the keys across ranks"),
        (tiny_wan_transformer, dict(cp_size=2), "cp_size is zigzag context parallelism for causal LLM"),
        (tiny_qwen3_moe, dict(ulysses_degree=2), r"for causal LLMs use cp_size=N"),
        (tiny_qwen3_moe, dict(cp_size=2, ring_degree=2), "cannot be combined"),
    ],
)
def test_bad_parallel_options_raise_before_patching(no_launcher, make, kwargs, match):
    model = make()
    kwargs = {"backend": "fa", **kwargs}
    modules = {
        name: (module.get_processor() if hasattr(module, "get_processor") else None)
        for name, module in model.named_modules()
    }
    implementation = getattr(model.config, "_attn_implementation_internal", None)
    hooks = _hook_count(model)
    with pytest.raises(ValueError, match=match):
        enable_npu_attention(model, **kwargs)
    assert _hook_count(model) == hooks and HANDLE_ATTR not in model.__dict__
    for name, module in model.named_modules():
        if modules[name] is not None:
            assert module.get_processor() is modules[name]
    assert getattr(model.config, "_attn_implementation_internal", None) == implementation


def test_degrees_of_one_are_the_single_device_path(no_launcher):
    model = tiny_wan_transformer(layers=1)
    handle = enable_npu_attention(model, "fa", ring_degree=1, ulysses_degree=1)
    assert not handle.parallel.sequence_parallel
    assert all(p.shards is None for p in model.attn_processors.values())
