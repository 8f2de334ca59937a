"""``enable_npu_attention``'s parallel options, checked before anything is patched.

* ``ring_degree`` x ``ulysses_degree`` (diffusers DiTs: Wan, Qwen-Image): the token sequence is
  split across that many ranks (rank ``g`` holds chunk ``g``), self/joint attention runs through
  :class:`~attnbridge.attention.parallel.ParallelAttention`, cross-attention stays local.
* ``cp_size`` (transformers LLMs: Qwen3-MoE): zigzag context parallelism for packed prefill, run
  with :func:`attnbridge.parallel_prefill.cp_prefill`.

The product of the degrees must be the world size of the default process group; when it is not
initialised yet and a launcher set ``WORLD_SIZE`` (torchrun, ``accelerate launch``), it is
initialised here with the platform's collective library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from attnbridge.attention.parallel import (
    ParallelConfig,
    ParallelGroups,
    build_parallel_groups,
    init_distributed,
)
from attnbridge.attention.registry import BackendSpec

#: The only backend that returns the softmax LSE on every platform, which ring merging needs.
RING_BACKEND = "fa"


@dataclass(frozen=True)
class ParallelSettings:
    ring_degree: int = 1
    ulysses_degree: int = 1
    cp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("ring_degree", "ulysses_degree", "cp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.cp_size > 1 and self.sequence_parallel:
            raise ValueError(
                "cp_size (zigzag prefill for LLMs) and ring_degree/ulysses_degree (DiT sequence "
                "parallelism) cannot be combined"
            )

    @property
    def sequence_parallel(self) -> bool:
        return self.ring_degree * self.ulysses_degree > 1

    @property
    def world_size(self) -> int:
        return self.cp_size * self.ring_degree * self.ulysses_degree

    @property
    def config(self) -> ParallelConfig:
        return ParallelConfig(ring_degree=self.ring_degree, ulysses_degree=self.ulysses_degree)


def check_settings(settings: ParallelSettings, spec: BackendSpec, library: str) -> None:
    """Errors that need no process group: backend and model kind versus the requested parallelism."""
    if settings.ring_degree > 1 and spec.name != RING_BACKEND:
        raise ValueError(
            f"ring_degree={settings.ring_degree} needs backend {RING_BACKEND!r} (ring attention merges "
            f"partial results through the softmax LSE, which backend {spec.name!r} does not return); "
            "use backend='fa', or ulysses_degree alone with this backend"
        )
    if settings.sequence_parallel and library != "diffusers":
        raise ValueError(
            "ring_degree/ulysses_degree split a DiT's token sequence (Wan, Qwen-Image); for causal LLMs "
            "use cp_size=N and attnbridge.parallel_prefill.cp_prefill"
        )
    if settings.cp_size > 1 and library != "transformers":
        raise ValueError(
            "cp_size is zigzag context parallelism for causal LLM prefill (Qwen3-MoE); for diffusers "
            "transformers use ring_degree and/or ulysses_degree"
        )


def check_world(settings: ParallelSettings, platform: str | None) -> None:
    """Initialise torch.distributed from the launcher's environment if needed; the degrees' product
    must equal its world size."""
    if settings.world_size == 1:
        return
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        init_distributed(platform=platform)
        initialized = True
    world = dist.get_world_size() if initialized else 1
    if world != settings.world_size:
        what = (
            f"cp_size ({settings.cp_size})"
            if settings.cp_size > 1
            else f"ring_degree ({settings.ring_degree}) x ulysses_degree ({settings.ulysses_degree})"
        )
        hint = "" if initialized else " (torch.distributed is not initialised: launch with torchrun)"
        raise ValueError(f"{what} = {settings.world_size} must equal the world size ({world}){hint}")


def check_heads(where: str, heads: int, ulysses_degree: int) -> None:
    if heads % ulysses_degree != 0:
        raise ValueError(
            f"{where} has {heads} attention heads, which ulysses_degree={ulysses_degree} does not "
            "divide (Ulysses gives each rank an equal share of the heads)"
        )


def build_groups(settings: ParallelSettings) -> ParallelGroups:
    """The ring / Ulysses process groups (a collective call: every rank enables the same way)."""
    return build_parallel_groups(settings.config)
