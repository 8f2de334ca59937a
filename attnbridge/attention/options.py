"""Backend options: a frozen dataclass per backend whose fields (:func:`option`) carry help text and
a check; :func:`parse_options` turns the user's keywords into an instance, or a ``ValueError`` naming
the backend, the option and what is allowed."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

_PARTS_PER_MILLION = 1_000_000


def option(default: Any, help: str, check: Callable[[str, str, Any], Any]) -> Any:
    """A dataclass field with its help text and ``check(backend, key, value) -> value``."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


def fraction(backend: str, key: str, value: Any) -> float:
    """A number in ``[0, 1)`` (numpy scalars included; bools and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"backend {backend!r}: {key} must be a number in [0, 1) (the fraction of attention work "
            f"skipped); got {value!r}"
        )
    return float(value)


def optional_fraction(backend: str, key: str, value: Any) -> float | None:
    return None if value is None else fraction(backend, key, value)


def count(backend: str, key: str, value: Any) -> int:
    """An integer >= 0 (numpy integers included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"backend {backend!r}: {key} must be an integer >= 0; got {value!r}")
    return int(value)


def flag(backend: str, key: str, value: Any) -> bool:
    """A bool: strings such as ``'false'`` are refused rather than read as True."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")
    if not isinstance(value, bool) and not numpy_bool:
        raise ValueError(f"backend {backend!r}: {key} must be True or False; got {value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a backend that takes none."""


def parse_options(backend: str, options: type, given: Mapping[str, Any]) -> Any:
    """``given`` checked into an instance of the frozen dataclass ``options``."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        accepted = ", ".join(fields) or "no options"
        raise ValueError(f"backend {backend!r} does not take option(s) {unknown}; it accepts: {accepted}")
    values = {key: fields[key].metadata["check"](backend, key, value) for key, value in given.items()}
    return options(**values)


def kept_count(sparsity: float, total: int) -> int:
    """``ceil((1 - sparsity) * total)`` clamped to ``[1, total]``, in integer parts per million so that
    float error (``1 - 0.85 = 0.15000000000000002``) cannot keep one block too many."""
    keep_ppm = _PARTS_PER_MILLION - round(sparsity * _PARTS_PER_MILLION)
    return max(1, min(total, -(-keep_ppm * total // _PARTS_PER_MILLION)))
