"""``attnbridge generate`` entry point (the CLI imports :func:`run_generate` from here)."""

from attnbridge.generation import run_generate

__all__ = ["run_generate"]
