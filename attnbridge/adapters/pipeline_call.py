"""Run a callback at the start of every ``pipe(...)`` call (a new generation resets the step count).

``pipe(...)`` looks ``__call__`` up on the class, so an instance attribute cannot wrap it. The
pipeline instance is moved to a one-off subclass with the same name whose ``__call__`` runs the
callback and then the original; removing the patch moves it back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class PipelineCallPatch:
    def __init__(self, pipe: Any, on_call: Callable[[], None]) -> None:
        self.pipe = pipe
        self.on_call = on_call
        self.original_class: type = type(pipe)
        self.wrapped_class: type | None = None

    def apply(self) -> None:
        original = self.original_class
        on_call = self.on_call

        @functools.wraps(original.__call__)
        def __call__(pipe_self, *args, **kwargs):
            on_call()
            return original.__call__(pipe_self, *args, **kwargs)

        namespace = {
            "__call__": __call__,
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "__doc__": original.__doc__,
        }
        self.wrapped_class = type(original.__name__, (original,), namespace)
        object.__setattr__(self.pipe, "__class__", self.wrapped_class)

    def remove(self) -> None:
        if self.wrapped_class is not None and type(self.pipe) is self.wrapped_class:
            object.__setattr__(self.pipe, "__class__", self.original_class)
        self.wrapped_class = None
