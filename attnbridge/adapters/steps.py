"""Which denoising step a transformer call belongs to.

Pipelines call the transformer once per step, or twice with classifier-free guidance (cond and
uncond, same timestep), and Wan 2.2 A14B switches between two transformers mid-run. Counting calls
would be wrong in all but the first case, so the counter advances when the timestep value changes
and is shared by every transformer of one pipeline.
"""

from __future__ import annotations

import torch


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


class StepTracker:
    """Step index of the current generation: -1 before the first call, then 0, 1, ...

    ``reset()`` starts a new generation (the pipeline wrapper calls it on every ``pipe(...)``). A
    rising timestep also starts one, since denoising only ever lowers it: that covers bare
    transformers driven by the user's own loop.
    """

    def __init__(self) -> None:
        self.step = -1
        self._last: float | None = None

    def reset(self) -> None:
        self.step = -1
        self._last = None

    def observe(self, timestep: object) -> int | None:
        """Record one transformer call; returns its step index (``None`` if no step is known)."""
        key = timestep_key(timestep)
        if key is None:
            return self.step if self.step >= 0 else None
        if self._last is None or key != self._last:
            if self._last is not None and key > self._last:
                self.step = -1
            self.step += 1
            self._last = key
        return self.step
