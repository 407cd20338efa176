"""The client's one backoff: exponential with full jitter, a value with one ``delay(attempt)``."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter.

    The n-th retry in a row (n = 0, 1, 2, ...) waits a uniformly random time in
    ``[0, min(max, initial * multiplier**n)]``. The count starts again at 0
    after a session in which the server answered (unless it closed with 1011 or
    1013, which say it is in trouble).
    """

    initial: float = 0.5
    max: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        for name in ("initial", "max", "multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"Backoff.{name} must be a finite number, not {value!r}")
        if not self.initial > 0:
            raise ValueError(f"Backoff.initial must be positive, not {self.initial!r}")
        if self.max < self.initial:
            raise ValueError(f"Backoff.max ({self.max!r}) must be at least Backoff.initial ({self.initial!r})")
        if self.multiplier < 1:
            raise ValueError(f"Backoff.multiplier must be at least 1, not {self.multiplier!r}")

    def cap(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (0 for the first): never more than ``max``."""
        cap = float(self.initial)
        for _ in range(attempt):
            cap *= self.multiplier
            if cap >= self.max:
                return float(self.max)
        return min(cap, float(self.max))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """A random wait in ``[0, cap(attempt)]``; ``rng`` returns a float in ``[0, 1)``."""
        return rng() * self.cap(attempt)
