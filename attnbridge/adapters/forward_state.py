"""The facts of the current forward call (token grid, dense step, key padding), set by a pre-hook, per
thread, in a plain ``threading.local`` read through ``getattr`` with a default: the form
``torch.compile`` traces correctly (not a ``threading.local`` subclass with defaults or a ``ContextVar``)."""

from __future__ import annotations

import threading

from attnbridge.attention.contract import AttentionContext


class PerThread:
    """Facts kept per thread; a pickled copy starts with none (a running call's facts are not state)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _fact(name: str, default: object = None) -> property:
    """A fact of this thread's call, read through ``getattr`` with a default (see the module docstring)."""
    return property(lambda self: getattr(self._local, name, default))


class ForwardState(PerThread):
    """The facts of this thread's forward call (defaults outside any call)."""

    def set(
        self, *, grid=None, dense_step: bool = False, key_lengths=None, seq_len: int = 0, kept_text=None
    ) -> None:
        self._local.grid, self._local.dense_step, self._local.key_lengths = grid, dense_step, key_lengths
        self._local.seq_len, self._local.kept_text = seq_len, kept_text

    grid = _fact("grid")
    dense_step = _fact("dense_step", False)
    #: Valid keys per sample, int ``[B]`` (None: no padding).
    key_lengths = _fact("key_lengths")
    #: Text tokens joint attention keeps (a host int); the rest is padding in every sample.
    kept_text = _fact("kept_text")
    #: Length of the 2-D mask ``key_lengths`` was read from (transformers).
    seq_len = _fact("seq_len", 0)

    def context(self, kind: str, *, num_text_tokens: int = 0) -> AttentionContext:
        return AttentionContext(
            kind=kind,
            grid=self.grid,
            dense_step=self.dense_step,
            num_text_tokens=num_text_tokens,
            key_lengths=self.key_lengths if kind == "joint" else None,
        )
