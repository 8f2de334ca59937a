"""``attnbridge generate``: one whole pipeline run with a backend, its output file and attention timings.
Under ``torchrun`` / ``accelerate launch`` every rank runs its share of the sequence; rank 0 writes."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attnbridge.adapters.diffusers import pipeline_transformers
from attnbridge.attention.registry import get_backend
from attnbridge.enable import enable_npu_attention
from attnbridge.generation import outputs
from attnbridge.generation.loading import LoadedModel, load_model
from attnbridge.generation.options import GenerateOptions, split_options
from attnbridge.generation.runtime import (
    launched_world_size,
    pick_device,
    pick_dtype,
    rank,
    start_distributed,
)
from attnbridge.generation.timing import AttentionTimer, format_summary, synchronize

DEFAULT_PROMPT = "a red fox running through snow"
RANDOM_WEIGHTS_NOTE = (
    "random weights: the output is noise by design; the code path, shapes, call counts and timings are real"
)


def run_generate(
    model: str = "wan-tiny",
    backend: str = "sdpa",
    steps: int = 4,
    output: str | Path = "outputs",
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    device: str | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``model`` through ``backend``; rank 0 writes its output and ``<name>.timing.json`` to ``output``.
    Returns the timing summary. ``steps``: denoising steps, or new tokens for a text model."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    options = split_options(config or {})
    get_backend(backend).parse(options.backend_without_parallel())
    launcher_device, started_group = start_distributed()
    try:
        torch_device = pick_device(device, launcher_device)
        dtype = pick_dtype(torch_device, options.run.get("dtype"))
        start = time.perf_counter()
        loaded = load_model(model, device=torch_device, dtype=dtype, seed=seed)
        load_seconds = time.perf_counter() - start
        backend_config = options.backend_for(loaded.kind, launched_world_size())
        timings, result = _run_timed(
            loaded, backend, backend_config, options, steps, prompt, seed, torch_device
        )
        summary = {
            "model": loaded.name,
            "backend": backend,
            "backend_options": backend_config,
            "run_options": {**options.call, **options.run, **options.enable},
            "device": str(torch_device),
            "dtype": str(dtype).removeprefix("torch."),
            "world_size": launched_world_size(),
            "steps": steps,
            "prompt": prompt,
            "timing_method": "wall clock" if torch_device.type == "cpu" else "device events",
            "notes": [RANDOM_WEIGHTS_NOTE] if loaded.random_weights else [],
            "load_seconds": load_seconds,
            **timings,
        }
        if rank() == 0:
            _report(summary, result, Path(output))
        return summary
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()


def _patched_models(loaded: LoadedModel) -> dict[str, torch.nn.Module]:
    """The models running the patched attention, keyed like the handle's layer names."""
    if loaded.kind == "text":
        return {"": loaded.obj}
    return {name: model for name, model, _ in pipeline_transformers(loaded.obj)}


def _run_timed(loaded, backend, backend_config, options: GenerateOptions, steps, prompt, seed, device):
    handle = enable_npu_attention(loaded.obj, backend, **options.enable, **backend_config)
    try:
        timer = AttentionTimer(handle.layers, _patched_models(loaded))
        with timer:
            start = time.perf_counter()
            if loaded.kind == "text":
                result = _generate_text(loaded, options, steps, prompt, device)
            else:
                result = _generate_diffusion(loaded, options, steps, prompt, seed)
            synchronize(device)
            total = time.perf_counter() - start
    finally:
        handle.disable()
    return timer.summary(total), result


def _generate_diffusion(loaded: LoadedModel, options: GenerateOptions, steps: int, prompt: str, seed: int):
    pipe = loaded.obj
    accepted = inspect.signature(pipe.__call__).parameters
    rejected = sorted(k for k in options.call if k not in accepted)
    if rejected:
        raise ValueError(f"option(s) {rejected} are not arguments of {type(pipe).__name__}.__call__")
    kwargs = {
        "prompt": prompt,
        "num_inference_steps": steps,
        # A CPU generator gives every rank, and every device, the same starting noise.
        "generator": torch.Generator().manual_seed(seed),
        **loaded.call_defaults,
        **options.call,
    }
    result = pipe(**{k: v for k, v in kwargs.items() if k in accepted})
    frames = getattr(result, "frames", None)
    if frames is not None:
        return {"type": "video", "data": frames[0], "fps": int(options.run.get("fps", 8))}
    images = getattr(result, "images", None)
    if images is not None:
        return {"type": "image", "data": images[0]}
    raise ValueError(
        f"{type(pipe).__name__} returned {type(result).__name__}, with neither frames nor images"
    )


def _generate_text(loaded: LoadedModel, options: GenerateOptions, steps: int, prompt: str, device):
    rejected = sorted(k for k in options.call if k != "max_new_tokens")
    if rejected:
        raise ValueError(f"option(s) {rejected} do not apply to a text model (only max_new_tokens)")
    model, tokenizer = loaded.obj, loaded.tokenizer
    new_tokens = int(options.call.get("max_new_tokens", steps))
    text = prompt
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        ids = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )
    completion = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return {"type": "text", "data": completion, "prompt": text}


def _report(summary: dict[str, Any], result: dict[str, Any], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    # Every option in the name, so a rerun with other options does not overwrite the last files.
    given = {**summary["backend_options"], **summary.get("run_options", {})}
    options = "".join(f"-{k}{v}" for k, v in sorted(given.items()))
    stem = output / f"{summary['model']}-{summary['backend']}{options}"
    if result["type"] == "video":
        written = outputs.write_video(result["data"], stem, fps=result["fps"])
    elif result["type"] == "image":
        written = outputs.write_image(result["data"], stem)
    else:
        written = outputs.write_text(result["prompt"], result["data"], stem)
        summary["completion"] = result["data"]
    summary["files"] = {result["type"]: str(written), "timing": str(outputs._named(stem, ".timing.json"))}
    outputs.write_summary(summary, stem)
    print(
        f"attnbridge generate: {summary['model']} with backend {summary['backend']!r} on "
        f"{summary['device']} ({summary['dtype']}), {summary['steps']} steps"
    )
    print(format_summary(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {written} and {summary['files']['timing']}")
