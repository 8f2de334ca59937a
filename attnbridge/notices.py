"""Warnings a user should read once per process, not once per layer or per call."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("attnbridge")
_given: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is given in this process. Skipped while
    ``torch.compile`` traces (the eager call before it, or the next one after, gives it)."""
    if torch.compiler.is_compiling() or message in _given:
        return
    _given.add(message)
    logger.warning(message)
