"""The ``attnbridge generate`` command's machinery: loading, timing, writing outputs."""

from attnbridge.generation.run import run_generate

__all__ = ["run_generate"]
