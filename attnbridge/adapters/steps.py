"""Which denoising step a transformer call belongs to (read only when ``skip_first_steps`` needs
it). Pipelines call the transformer once per step, or twice with classifier-free guidance, and Wan
2.2 A14B switches between two transformers mid-run: in a pipeline the scheduler's ``step_index``
says the step (``None`` until its first ``step()``: step 0). A bare transformer in the user's own
loop has no scheduler in reach; the step then advances when the timestep changes and restarts when
it rises, since denoising only ever lowers it."""

from __future__ import annotations

from typing import Any

import torch

from attnbridge.adapters.forward_state import PerThread


def timestep_key(timestep: object) -> float | None:
    """One number per step: the largest timestep value (TI2V passes ``[B, seq]`` with 0 on the
    conditioning frame and ``t`` elsewhere; cond and uncond calls pass the same values)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().max())
    return float(timestep)


class SchedulerSteps:
    """Steps of a pipeline: its scheduler's ``step_index``."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def reset(self) -> None:
        """Nothing to do: the scheduler restarts its count on every pipeline call."""

    def observe(self, timestep: object) -> int | None:
        index = self.scheduler.step_index
        return 0 if index is None else int(index)


class TimestepSteps(PerThread):
    """Steps of a bare transformer, from its timesteps: -1 before the first call, then 0, 1, ...;
    per thread, so two threads' loops do not advance each other's count."""

    @property
    def step(self) -> int:
        return getattr(self._local, "step", -1)

    def reset(self) -> None:
        self._local.step, self._local.last = -1, None

    def observe(self, timestep: object) -> int | None:
        """Record one transformer call; returns its step index (``None`` if no step is known)."""
        key = timestep_key(timestep)
        last = getattr(self._local, "last", None)
        if key is None:
            return self.step if self.step >= 0 else None
        if last is None or key != last:
            step = -1 if last is not None and key > last else self.step
            self._local.step, self._local.last = step + 1, key
        return self.step


def step_source(pipe: Any = None) -> SchedulerSteps | TimestepSteps:
    """How the steps of the transformers of ``pipe`` (or of a bare transformer) are counted."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None and hasattr(scheduler, "step_index"):
        return SchedulerSteps(scheduler)
    return TimestepSteps()
