"""Sequence-parallel degrees and their process groups. ``rank = ring_rank * ulysses_degree +
ulysses_rank``: the Ulysses all-to-all (the most data) runs between contiguous ranks (one NVLink/HCCS
island), the ring (overlapped with compute) between strided ones; rank ``g`` holds chunk ``g``."""

from __future__ import annotations

import atexit
import numbers
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    """``ring_degree`` x ``ulysses_degree`` ranks split a DiT's sequence; ``cp_size`` ranks an LLM
    prefill (zigzag). The two cannot be combined."""

    ring_degree: int = 1
    ulysses_degree: int = 1
    cp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("ring_degree", "ulysses_degree", "cp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
            object.__setattr__(self, name, int(value))
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

    def describe(self) -> str:
        if self.cp_size > 1:
            return f"cp_size ({self.cp_size})"
        return f"ring_degree ({self.ring_degree}) x ulysses_degree ({self.ulysses_degree})"

    def check_world_size(self, world_size: int, hint: str = "") -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"{self.describe()} = {self.world_size} must equal the world size ({world_size}){hint}"
            )


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's view of a :class:`ParallelConfig`: its groups (``None`` where a degree is 1)."""

    config: ParallelConfig
    rank: int
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    #: The group spanning all sequence-parallel ranks (the world), ``None`` without parallelism.
    sequence_group: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.config.ulysses_degree


#: Groups per (ring, ulysses, default group): re-enabling must not create communicators that nothing destroys.
#: Emptied at exit: gloo subgroups that live on into interpreter finalisation, after
#: ``destroy_process_group``, sometimes abort the process there ("terminate called without an active
#: exception"; 2 of 12 two-rank test runs, none of 20 once emptied here).
_GROUPS: dict[tuple[int, int, int], ParallelGroups] = {}
atexit.register(_GROUPS.clear)


def build_parallel_groups(config: ParallelConfig) -> ParallelGroups:
    """The Ulysses and ring groups of ``config``: collective on first use of a layout, cached after.
    ``new_group`` must be entered by all ranks for every group in the same order, so each builds all."""
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    config.check_world_size(world_size)
    if world_size == 1:
        return ParallelGroups(config, 0, None, None, None)
    key = (config.ring_degree, config.ulysses_degree, id(dist.group.WORLD))
    if key not in _GROUPS:
        _GROUPS[key] = _new_parallel_groups(config)
    return _GROUPS[key]


def _new_parallel_groups(config: ParallelConfig) -> ParallelGroups:
    rank, ring, ulysses = dist.get_rank(), config.ring_degree, config.ulysses_degree
    ring_rank, ulysses_rank = divmod(rank, ulysses)
    ulysses_group = ring_group = None
    if ulysses > 1:  # contiguous ranks exchange heads
        for r in range(ring):
            group = dist.new_group(list(range(r * ulysses, (r + 1) * ulysses)))
            if r == ring_rank:
                ulysses_group = group
    if ring > 1:  # strided ranks pass key/value chunks around a ring
        for u in range(ulysses):
            group = dist.new_group(list(range(u, ring * ulysses, ulysses)))
            if u == ulysses_rank:
                ring_group = group
    return ParallelGroups(config, rank, ring_group, ulysses_group, dist.group.WORLD)
