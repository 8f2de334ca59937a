"""Splitting ``--option key=value`` pairs: the command's own settings never reach the backend; the rest
goes to ``enable_npu_attention``, which checks it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Every ``--option`` key that is not a backend option, with what it does.
OPTION_KEYS = {
    "height": "pipeline output height in pixels",
    "width": "pipeline output width in pixels",
    "num_frames": "video frames (Wan)",
    "guidance_scale": "classifier-free guidance scale (Wan)",
    "true_cfg_scale": "classifier-free guidance scale (Qwen-Image)",
    "negative_prompt": "negative prompt",
    "max_sequence_length": "text tokens the prompt is padded/cut to",
    "max_new_tokens": "tokens to generate (text models)",
    "dtype": "float32 | bfloat16 | float16 (default: bfloat16 on accelerators, float32 on CPU)",
    "fps": "frames per second of the written video",
    "strict": "true: a missing kernel package is an error, not a fallback",
    "platform": "force a platform's kernels (cpu, cuda, npu, musa)",
    "ring_degree": "ranks in a ring (context parallelism; torchrun / accelerate launch)",
    "ulysses_degree": "ranks splitting heads (context parallelism)",
    "cp_size": "ranks sharing an LLM prefill",
}
#: Arguments of the pipeline call (checked against its signature) or of ``generate`` for LLMs.
CALL_OPTIONS = tuple(list(OPTION_KEYS)[:8])
RUN_OPTIONS = ("dtype", "fps")
ENABLE_OPTIONS = ("strict", "platform")
#: Parallel degrees: keywords of ``enable_npu_attention``, passed through with the backend options.
PARALLEL_OPTIONS = ("ring_degree", "ulysses_degree", "cp_size")


@dataclass
class GenerateOptions:
    call: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    enable: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)

    def backend_without_parallel(self) -> dict[str, Any]:
        return {k: v for k, v in self.backend.items() if k not in PARALLEL_OPTIONS}

    def backend_for(self, kind: str, world_size: int) -> dict[str, Any]:
        """Several diffusion processes default to Ulysses over all of them (else each repeats the work)."""
        config = dict(self.backend)
        if world_size > 1 and kind == "diffusion" and not any(k in config for k in PARALLEL_OPTIONS):
            config["ulysses_degree"] = world_size
        return config


def split_options(config: dict[str, Any]) -> GenerateOptions:
    options = GenerateOptions()
    groups = ((CALL_OPTIONS, options.call), (RUN_OPTIONS, options.run), (ENABLE_OPTIONS, options.enable))
    for key, value in config.items():
        next((group for keys, group in groups if key in keys), options.backend)[key] = value
    return options
