"""What the current transformer forward call looks like, for that call's attention processors. A
forward pre-hook on the transformer reads the token grid, whether the denoising step runs dense, and
the text padding once per call; the processors build their :class:`AttentionContext` from it. The
facts are kept per thread, so two threads running one patched model each see their own call. They
live in a plain ``threading.local`` read through ``getattr`` with a default: that is the form
``torch.compile`` traces correctly (a subclass of ``threading.local`` with class defaults, or a
``ContextVar``, it does not)."""

from __future__ import annotations

import threading

from attnbridge.attention.contract import AttentionContext


class PerThread:
    """Facts kept per thread in a plain ``threading.local``; a pickled copy starts with none (the
    facts of a running call are not state)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class ForwardState(PerThread):
    """The facts of the forward call running on this thread (defaults outside any call)."""

    def set(self, *, grid=None, dense_step: bool = False, key_lengths=None) -> None:
        self._local.grid, self._local.dense_step, self._local.key_lengths = grid, dense_step, key_lengths

    @property
    def grid(self):
        return getattr(self._local, "grid", None)

    @property
    def dense_step(self) -> bool:
        return getattr(self._local, "dense_step", False)

    @property
    def key_lengths(self):
        """Valid keys per sample of a joint sequence with padded text, int ``[B]`` (None: no padding)."""
        return getattr(self._local, "key_lengths", None)

    def context(self, kind: str, *, num_text_tokens: int = 0, gate=None) -> AttentionContext:
        return AttentionContext(
            kind=kind,
            grid=self.grid,
            dense_step=self.dense_step,
            num_text_tokens=num_text_tokens,
            key_lengths=self.key_lengths if kind == "joint" else None,
            gate=gate,
        )
