"""Counting a cohort's cases as they finish: the fraction done, the rate and the time left."""

from __future__ import annotations

import time

from .store import FAILED, CaseResult


class CohortMeter:
    """Cases done out of ``total``; the rate counts only the cases finished by this run.

    Args:
        total: cases in the cohort.
        done_before: cases complete from an earlier run (they count as done, not in the rate).
    """

    def __init__(self, total: int, done_before: int = 0) -> None:
        self.total = total
        self.done_before = done_before
        self.finished = 0
        self.failed = 0
        self._started = time.monotonic()

    def add(self, result: CaseResult) -> None:
        """Count one case finished by this run (ok or failed)."""
        self.finished += 1
        self.failed += result.status == FAILED

    @property
    def fraction(self) -> float:
        return (self.done_before + self.finished) / self.total if self.total else 1.0

    def per_minute(self) -> float | None:
        """Cases finished per minute by this run so far (None before the first)."""
        elapsed = time.monotonic() - self._started
        return 60.0 * self.finished / elapsed if self.finished and elapsed > 0 else None

    def message(self) -> str:
        """``12/40 cases (1 failed), 3.4 cases/min, about 8 min left``."""
        done = self.done_before + self.finished
        parts = [f"{done}/{self.total} cases" + (f" ({self.failed} failed)" if self.failed else "")]
        rate = self.per_minute()
        if rate is not None:
            parts.append(f"{rate:.1f} cases/min")
            left = self.total - done
            if left:
                parts.append(f"about {_duration(60.0 * left / rate)} left")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
