"""Which denoising step a transformer call belongs to (for ``skip_first_steps``): in a pipeline (two
calls per step with CFG, two transformers in Wan 2.2 A14B) its scheduler's ``step_index``; for a bare
transformer, a count that advances when the timestep changes and restarts when it rises."""

from __future__ import annotations

from typing import Any

import torch

from attnbridge.adapters.forward_state import PerThread


def timestep_key(timestep: object) -> float | None:
    """One number per step: the largest timestep value (TI2V passes ``[B, seq]``, 0 on the first frame)."""
    if timestep is None or (isinstance(timestep, torch.Tensor) and timestep.numel() == 0):
        return None
    return float(timestep.detach().max()) if isinstance(timestep, torch.Tensor) else float(timestep)


class SchedulerSteps:
    """Steps of a pipeline: its scheduler's ``step_index`` (``None`` before the first ``step()``: 0)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def reset(self) -> None:
        """Nothing to do: the scheduler restarts its count on every pipeline call."""

    def observe(self, timestep: object) -> int | None:
        index = self.scheduler.step_index
        return 0 if index is None else int(index)


class TimestepSteps(PerThread):
    """Steps of a bare transformer, per thread: -1 before the first call, then 0, 1, ..."""

    @property
    def step(self) -> int:
        return getattr(self._local, "step", -1)

    def reset(self) -> None:
        self._local.step, self._local.last = -1, None

    def observe(self, timestep: object) -> int | None:
        """Record one transformer call; returns its step (``None`` if unknown)."""
        key = timestep_key(timestep)
        last = getattr(self._local, "last", None)
        if key is None:
            return self.step if self.step >= 0 else None
        if last is None or key != last:
            step = -1 if last is not None and key > last else self.step
            self._local.step, self._local.last = step + 1, key
        return self.step


def step_source(pipe: Any = None) -> SchedulerSteps | TimestepSteps:
    """How the steps of ``pipe``'s transformers (or of a bare transformer) are counted."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None and hasattr(scheduler, "step_index"):
        return SchedulerSteps(scheduler)
    return TimestepSteps()
