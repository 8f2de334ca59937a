"""Warnings a user should read once per process, not once per layer or per call."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("attnbridge")
_given: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning once per process; skipped while ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or message in _given:
        return
    _given.add(message)
    logger.warning(message)
