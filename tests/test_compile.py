"""Patched models under ``torch.compile``: no graph break, one compile per shape however many layers,
and the compiled output equal to eager.

Run on the CPU with dynamo's own backends (``aot_eager`` runs the traced graph op by op), which is
what decides graph breaks and recompiles; the GPU suite runs the same tests.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from attnbridge import enable_npu_attention
from attnbridge.tiny_models import tiny_qwen_image_transformer, tiny_wan_transformer
from tests.tiny_inputs import qwen_image_inputs, wan_inputs

#: Compiled (aot_eager) against eager: the same ops in the same order, up to fused reorderings.
TOLERANCE = 1e-5
OPTIONS = {"block_sparse": {"sparsity": 0.5}, "rain_fusion": {"sparsity": 0.5}, "vsa": {"sparsity": 0.5}}
CASES = [("wan", b) for b in ("sdpa", "fa", "block_sparse", "rain_fusion", "vsa")]
CASES += [("qwen_image", b) for b in ("sdpa", "fa", "block_sparse", "rain_fusion")]


def build(family: str, layers: int, *, wide: bool = False):
    """A tiny model with 64-wide heads and more than one 128-token block, so sparse backends skip blocks."""
    if family == "wan":
        return tiny_wan_transformer(head_dim=64, layers=layers), wan_inputs(
            frames=3, height=16, width=20 if wide else 16
        )
    return tiny_qwen_image_transformer(head_dim=64, layers=layers), qwen_image_inputs(
        grid_h=12, grid_w=14 if wide else 12
    )


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family,backend", CASES)
def test_whole_model_traces_without_a_graph_break(family, backend):
    model, inputs = build(family, layers=2)
    enable_npu_attention(model, backend, **OPTIONS.get(backend, {}))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs, return_dict=False)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    expected = run(model, inputs)
    assert (run(compiled, inputs) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("family,backend", CASES)
def test_regional_compile_compiles_once_per_shape_for_all_layers(family, backend):
    model, inputs = build(family, layers=3)
    _, wider = build(family, layers=1, wide=True)
    enable_npu_attention(model, backend, **OPTIONS.get(backend, {}))
    expected = run(model, inputs)
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=counter)
    out = run(model, inputs)
    run(model, inputs)
    assert counter.frame_count == 1, "three layers, one shape: one compile"
    assert (out - expected).abs().max() <= TOLERANCE
    run(model, wider)
    assert counter.frame_count == 2, "a second shape: one more compile"


def test_skip_first_steps_under_a_whole_model_compile_says_what_to_do():
    model, inputs = build("wan", layers=1)
    enable_npu_attention(model, "block_sparse", sparsity=0.5, skip_first_steps=2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="compile_repeated_blocks"):
        run(compiled, inputs)


def test_skip_first_steps_works_with_regional_compile():
    model, inputs = build("wan", layers=2)
    enable_npu_attention(model, "block_sparse", sparsity=0.5, skip_first_steps=1)
    eager = [run(model, {**inputs, "timestep": torch.tensor([t])}) for t in (900.0, 500.0)]
    model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend="aot_eager")
    compiled = [run(model, {**inputs, "timestep": torch.tensor([t])}) for t in (900.0, 500.0)]
    for a, b in zip(compiled, eager):
        assert (a - b).abs().max() <= TOLERANCE
