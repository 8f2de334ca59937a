"""Checks of ``enable_npu_attention``'s parallel options: ``ring_degree`` x ``ulysses_degree`` ranks
split a DiT's token sequence; ``cp_size`` ranks share an LLM's zigzag prefill (``cp_prefill``)."""

from __future__ import annotations

import os

import torch.distributed as dist

from attnbridge.attention.parallel import ParallelConfig, init_distributed


def check_library(config: ParallelConfig, library: str) -> None:
    """The model's library versus the requested parallelism (needs no process group)."""
    if config.sequence_parallel and library != "diffusers":
        raise ValueError(
            "ring_degree/ulysses_degree split a DiT's token sequence (Wan, Qwen-Image); for causal LLMs "
            "use cp_size=N and attnbridge.parallel_prefill.cp_prefill"
        )
    if config.cp_size > 1 and library != "transformers":
        raise ValueError(
            "cp_size is zigzag context parallelism for causal LLM prefill (Qwen3-MoE); for diffusers "
            "transformers use ring_degree and/or ulysses_degree"
        )


def check_world(config: ParallelConfig, platform: str | None) -> None:
    """Start torch.distributed from a launcher's ``WORLD_SIZE`` if needed; check the world size."""
    if config.world_size == 1:
        return
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        init_distributed(platform=platform)
        initialized = True
    world = dist.get_world_size() if initialized else 1
    hint = "" if initialized else " (torch.distributed is not initialised: launch with torchrun)"
    config.check_world_size(world, hint)
