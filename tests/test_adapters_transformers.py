"""enable_npu_attention on a real (tiny, random-weight) transformers Qwen3-MoE causal LM.

The tiny model has 4 query heads sharing 2 KV heads (GQA) and 4 experts. Tolerances (float32, max
abs difference of the logits against the unpatched model, which runs transformers' SDPA): ``sdpa``
1e-5, ``fa`` 1e-4. Padded batches run transformers' own SDPA with the padding mask, so they match
too; ``disable_npu_attention`` restores bit-identical logits.
"""

from __future__ import annotations

import pytest
import torch

from attnbridge.attention.api import AttentionLayer
from attnbridge.enable import disable_npu_attention, enable_npu_attention
from attnbridge.tiny_models import tiny_qwen3_moe

TOLERANCE = {"sdpa": 1e-5, "fa": 1e-4}
LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.fixture
def spy(monkeypatch):
    """Records (layer name, backend, causal, context, q shape, k shape) of every AttentionLayer call."""
    calls = []
    original = AttentionLayer.__call__

    def recording(self, q, k, v, **kwargs):
        calls.append(
            (self.name, self.backend, kwargs["causal"], kwargs.get("context"), tuple(q.shape), tuple(k.shape))
        )
        return original(self, q, k, v, **kwargs)

    monkeypatch.setattr(AttentionLayer, "__call__", recording)
    return calls


def _ids(batch=2, length=11, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


def _max_abs(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backend", ["sdpa", "fa"])
def test_logits_match_unpatched_causal_gqa_and_disable_restores(backend, spy):
    model = tiny_qwen3_moe()
    ids = _ids()
    reference = _logits(model, ids)

    handle = enable_npu_attention(model, backend)
    assert model.config._attn_implementation == f"attnbridge_{backend}"
    patched = _logits(model, ids)
    assert _max_abs(patched, reference) <= TOLERANCE[backend]
    # Every layer went through the backend, causal, with q [B, S, 4, 16] and k [B, S, 2, 16] (GQA).
    assert [(name, causal, q, k) for name, _, causal, _, q, k in spy] == [
        (name, True, (2, 11, 4, 16), (2, 11, 2, 16)) for name in LAYERS
    ]
    assert all(backend_ == backend for _, backend_, _, _, _, _ in spy)
    assert set(handle.layers) == set(LAYERS)

    assert disable_npu_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert all(not hasattr(m, "_attnbridge_layer") for m in model.modules())
    assert torch.equal(_logits(model, ids), reference)


def test_causality_is_respected(spy):
    """Changing the last token must not change earlier positions' logits (a non-causal bug would)."""
    model = tiny_qwen3_moe()
    enable_npu_attention(model, "fa")
    ids = _ids(batch=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % 125 + 3
    a, b = _logits(model, ids), _logits(model, changed)
    assert torch.equal(a[:, :-1], b[:, :-1]) or _max_abs(a[:, :-1], b[:, :-1]) <= 1e-6
    assert _max_abs(a[:, -1], b[:, -1]) > 1e-4


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpatched(side, device, spy):
    model = tiny_qwen3_moe().to(device)
    ids = _ids(batch=3, length=9)
    mask = torch.ones_like(ids)
    pad = [0, 3, 5]
    for row, n in enumerate(pad):
        if n:
            if side == "left":
                mask[row, :n] = 0
                ids[row, :n] = 0
            else:
                mask[row, -n:] = 0
                ids[row, -n:] = 0
    ids, mask = ids.to(device), mask.to(device)
    reference = _logits(model, ids, mask)
    enable_npu_attention(model, "fa")
    patched = _logits(model, ids, mask)
    valid = mask.bool()
    assert _max_abs(patched[valid], reference[valid]) <= TOLERANCE["fa"]
    if side == "right":
        # Right padding is valid key lengths per sample, which the backend itself serves (causal).
        assert len(spy) == 2 and all(causal for _, _, causal, _, _, _ in spy)
        assert torch.equal(spy[0][3].key_lengths.cpu(), torch.tensor([9, 6, 4], dtype=torch.int32))
    else:
        # Left padding is not a suffix of the keys: transformers' SDPA runs it, as unpatched.
        assert spy == []


def test_a_right_padded_batch_with_an_empty_prompt_runs_and_matches_unpatched():
    """A prompt with no tokens at all (an all-zero mask row) is key length 0: allowed, and the other
    samples equal the unpatched model."""
    model = tiny_qwen3_moe()
    ids = _ids(batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[1] = 0
    reference = _logits(model, ids, mask)
    enable_npu_attention(model, "fa")
    patched = _logits(model, ids, mask)
    assert _max_abs(patched[0], reference[0]) <= TOLERANCE["fa"]


def test_unpadded_mask_goes_through_the_backend(spy):
    """An all-ones attention_mask is dropped by transformers' mask builder: the backend runs, causal."""
    model = tiny_qwen3_moe()
    ids = _ids()
    reference = _logits(model, ids, torch.ones_like(ids))
    enable_npu_attention(model, "fa")
    assert _max_abs(_logits(model, ids, torch.ones_like(ids)), reference) <= TOLERANCE["fa"]
    assert len(spy) == 2 and all(causal for _, _, causal, _, _, _ in spy)


def test_greedy_generation_with_kv_cache_matches(spy):
    model = tiny_qwen3_moe()
    ids = _ids(batch=1, length=6)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        reference = model.generate(ids, **kwargs)
        enable_npu_attention(model, "fa")
        generated = model.generate(ids, **kwargs)
    assert torch.equal(generated, reference)
    # Prefill (6 queries, causal) then decode steps (1 query against the growing cache, not causal).
    shapes = [(q[1], k[1], causal) for name, _, causal, _, q, k in spy if name == LAYERS[0]]
    assert shapes[0] == (6, 6, True)
    assert shapes[1:] == [(1, 6 + i, False) for i in range(1, len(shapes))]


def test_context_is_plain_causal_self_attention(spy):
    model = tiny_qwen3_moe()
    enable_npu_attention(model, "sdpa")
    _logits(model, _ids())
    assert {name for name, _, _, _, _, _ in spy} == set(LAYERS)
    for _, _, _, context, _, _ in spy:
        assert context.kind == "self" and context.grid is None and context.key_lengths is None


def test_sparse_backend_is_refused_and_changes_nothing():
    model = tiny_qwen3_moe()
    with pytest.raises(ValueError, match="sparse video/image backend"):
        enable_npu_attention(model, "block_sparse", sparsity=0.5)
    assert model.config._attn_implementation == "sdpa"


def test_bad_option_is_refused_and_changes_nothing():
    model = tiny_qwen3_moe()
    with pytest.raises(ValueError, match="does not take option"):
        enable_npu_attention(model, "fa", sparsity=0.5)
    assert model.config._attn_implementation == "sdpa"
    assert all(not hasattr(m, "_attnbridge_layer") for m in model.modules())


def test_enable_twice_then_disable_restores_original_implementation(spy):
    model = tiny_qwen3_moe(attn_implementation="eager")
    ids = _ids()
    reference = _logits(model, ids)
    enable_npu_attention(model, "sdpa")
    enable_npu_attention(model, "fa")
    assert model.config._attn_implementation == "attnbridge_fa"
    assert _max_abs(_logits(model, ids), reference) <= TOLERANCE["fa"]
    assert {backend for _, backend, _, _, _, _ in spy} == {"fa"}
    disable_npu_attention(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_logits(model, ids), reference)


def test_unknown_transformers_model_is_refused():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    implementation = model.config._attn_implementation
    with pytest.raises(TypeError, match="Qwen3MoeForCausalLM"):
        enable_npu_attention(model, "sdpa")
    assert model.config._attn_implementation == implementation


def test_npu_platform_path_matches_unpatched(fake_npu):
    """platform="npu" with the emulated torch_npu: causal prefill through npu_fusion_attention
    (compressed causal mask), float32 logits within 1e-5."""
    model = tiny_qwen3_moe()
    ids = _ids()
    reference = _logits(model, ids)
    enable_npu_attention(model, "sdpa", platform="npu", strict=True)
    assert _max_abs(_logits(model, ids), reference) <= TOLERANCE["sdpa"]
    assert [name for name, _, _ in fake_npu.calls] == ["npu_fusion_attention"] * 2
    assert all(kwargs.get("sparse_mode") == 3 for _, _, kwargs in fake_npu.calls)
