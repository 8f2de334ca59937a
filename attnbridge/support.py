"""What each backend runs on each platform, and why not, read from the backend declarations and impl
attributes; ``attnbridge backends`` prints it (``scripts/support_table.py`` builds the docs' and
``test_matrix``'s backend x model family x platform table on it)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from attnbridge.attention.contract import AttentionImpl
from attnbridge.attention.registry import Unavailable, get_backend
from attnbridge.errors import BackendUnavailableError


@dataclass(frozen=True)
class KernelSupport:
    """What ``backend`` runs on ``platform``, read from its declaration and its impl class."""

    backend: str
    platform: str

    @cached_property
    def entry(self) -> type[AttentionImpl] | Unavailable:
        return get_backend(self.backend).entry(self.platform)

    @property
    def impl(self) -> type[AttentionImpl] | None:
        return None if isinstance(self.entry, Unavailable) else self.entry

    @cached_property
    def never_runs(self) -> str | None:
        """Why this can never run here whatever is installed (no kernel, or a refusal naming no package)."""
        if isinstance(self.entry, Unavailable):
            return self.entry.reason
        try:
            self.entry.check_available(self.platform)
        except BackendUnavailableError as error:
            return None if error.install else error.reason
        return None

    @property
    def fallback(self) -> str | None:
        return get_backend(self.backend).fallback

    @property
    def status(self) -> str:
        """``yes``, ``fallback`` (another backend always serves it here) or ``no``."""
        if self.never_runs is None:
            return "yes"
        return "fallback" if self.fallback else "no"

    @property
    def unavailable(self) -> str | None:
        """Why nothing serves this backend here (``None``: something does)."""
        return self.never_runs if self.status == "no" else None

    @property
    def install(self) -> tuple[str, ...]:
        return () if self.impl is None else self.impl.install


__all__ = ["KernelSupport"]
