"""Errors users see, each naming its cause."""

from __future__ import annotations


class BackendUnavailableError(ImportError):
    """A backend cannot run on this platform; the message names the package to install or the reason."""

    def __init__(self, backend: str, platform: str, reason: str, install: str | None = None) -> None:
        self.backend = backend
        self.platform = platform
        self.reason = reason
        self.install = install
        message = f"attention backend {backend!r} is unavailable on platform {platform!r}: {reason}"
        if install:
            message += f" (install it with: {install})"
        super().__init__(message)
