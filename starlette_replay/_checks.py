"""Argument checks shared by the public constructors and methods: one wording, one rule for bools."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int", "check_positive", "check_seconds"]


def check_int(name: str, value: Any, *, low: int = 1, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]`` (``True`` is not one), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ValueError(f"{name} must be an integer {bounds}, not {value!r}")
    return value


def check_positive(name: str, value: Any, *, unit: str, optional: bool = False) -> Any:
    """Return ``value`` if it is a positive number (or None when ``optional``), else raise ``ValueError``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        extra = " or None" if optional else ""
        raise ValueError(f"{name} must be a positive number of {unit}{extra}, not {value!r}")
    return value


def check_seconds(name: str, value: Any, *, optional: bool = False) -> Any:
    """:func:`check_positive` for a duration in seconds."""
    return check_positive(name, value, unit="seconds", optional=optional)
