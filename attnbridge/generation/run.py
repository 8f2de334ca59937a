"""``attnbridge generate``: one whole pipeline run with a backend, its output file and attention timings.
Under ``torchrun`` / ``accelerate launch`` every rank runs its share of the sequence; rank 0 writes."""

from __future__ import annotations

import importlib.util
import inspect
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attnbridge.adapters.diffusers import pipeline_transformers
from attnbridge.attention.parallel.distributed import init_distributed, launched_world_size
from attnbridge.attention.registry import get_backend
from attnbridge.enable import enable_npu_attention
from attnbridge.generation.loading import LoadedModel, load_model
from attnbridge.generation.options import GenerateOptions, split_options
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
        written = write_video(result["data"], stem, fps=result["fps"])
    elif result["type"] == "image":
        written = write_image(result["data"], stem)
    else:
        written = write_text(result["prompt"], result["data"], stem)
        summary["completion"] = result["data"]
    summary["files"] = {result["type"]: str(written), "timing": str(_named(stem, ".timing.json"))}
    write_summary(summary, stem)
    print(
        f"attnbridge generate: {summary['model']} with backend {summary['backend']!r} on "
        f"{summary['device']} ({summary['dtype']}), {summary['steps']} steps"
    )
    print(format_summary(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {written} and {summary['files']['timing']}")


# Where the run computes: the process group (under a launcher), the device and the dtype.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def start_distributed() -> tuple[torch.device | None, bool]:
    """``(this rank's device, whether we started the group)``; ``(None, False)`` without a launcher."""
    if launched_world_size() <= 1:
        return None, False
    started = not (dist.is_available() and dist.is_initialized())
    return init_distributed().device, started


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def pick_device(requested: str | None, launcher_device: torch.device | None = None) -> torch.device:
    """``requested``, else the launcher's device for this rank, else the accelerator found, else CPU."""
    if requested:
        if requested.startswith("npu"):
            from attnbridge.platforms.npu import TORCH_NPU_INSTALL, load_torch_npu

            try:
                load_torch_npu()  # registers the "npu" device type
            except ImportError as error:
                raise ValueError(
                    f"--device {requested!r}: torch_npu cannot be imported ({error.__cause__}); "
                    f"install it with: {TORCH_NPU_INSTALL}"
                ) from None
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"--device {requested!r} is not a device torch knows ({error})") from None
        module = getattr(torch, device.type, None) if device.type != "cpu" else None
        if device.type != "cpu" and not (module is not None and module.is_available()):
            raise ValueError(f"--device {requested!r}: no {device.type} device is available on this machine")
        return device
    if launcher_device is not None:
        return launcher_device
    from attnbridge.platforms import detect_platform

    platform = detect_platform()
    return torch.device("cpu" if platform.name == "cpu" else platform.device_type)


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """bfloat16 on accelerators, float32 on CPU (bf16 matmuls there are slow), or ``requested``."""
    if requested is not None:
        try:
            return DTYPES[str(requested)]
        except KeyError:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}") from None
    return torch.float32 if device.type == "cpu" else torch.bfloat16


# Writing the video, image or text and the timing summary.


def _named(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` (``with_suffix`` would eat a dotted model name such as ``Wan2.1``)."""
    return stem.with_name(stem.name + suffix)


def _to_uint8_frames(frames: Any) -> list[np.ndarray]:
    """``[F, H, W, C]`` floats in [0, 1] (diffusers' ``np`` output) or PIL images -> uint8 arrays."""
    if isinstance(frames, np.ndarray) and frames.dtype != np.uint8:
        return [(np.clip(f, 0.0, 1.0) * 255).round().astype(np.uint8) for f in frames]
    return [np.asarray(f, dtype=np.uint8) for f in frames]


def write_video(frames: Any, stem: Path, fps: int = 8) -> Path:
    """MP4 when imageio and imageio-ffmpeg are installed, else an animated GIF through Pillow."""
    frames = _to_uint8_frames(frames)
    if all(importlib.util.find_spec(name) is not None for name in ("imageio", "imageio_ffmpeg")):
        from diffusers.utils import export_to_video

        path = _named(stem, ".mp4")
        export_to_video([f.astype(np.float32) / 255.0 for f in frames], str(path), fps=fps)
        return path
    from PIL import Image

    path = _named(stem, ".gif")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def write_image(image: Any, stem: Path) -> Path:
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(_to_uint8_frames(np.asarray(image)[None])[0])
    path = _named(stem, ".png")
    image.save(path)
    return path


def write_text(prompt: str, completion: str, stem: Path) -> Path:
    path = _named(stem, ".txt")
    path.write_text(f"{prompt}{completion}\n", encoding="utf-8")
    return path


def write_summary(summary: dict[str, Any], stem: Path) -> Path:
    path = _named(stem, ".timing.json")
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path
