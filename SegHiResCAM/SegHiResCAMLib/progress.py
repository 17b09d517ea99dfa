"""Progress callbacks: ``progress(fraction, message)`` with the fraction in [0, 1] over a whole run.

A stage of a longer run reports its own 0..1; :func:`scaled_progress` maps it onto its share of the
whole bar, so the fractions a user sees never go back. Raising from a callback (``CancelledError``)
stops the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ProgressCallback = Callable[[float, str], None]


def scaled_progress(progress: ProgressCallback | None, start: float, share: float) -> ProgressCallback | None:
    """A progress callback that maps a stage's 0..1 onto ``start .. start + share`` of the whole;
    None when there is nothing to report to, or when the stage has no share of the bar."""
    if progress is None or share <= 0.0:
        return None

    def report(fraction: float, message: str) -> None:
        progress(start + share * min(max(float(fraction), 0.0), 1.0), message)

    return report


def split_progress(progress: ProgressCallback | None, weights: Sequence[float]) -> list[ProgressCallback | None]:
    """One callback per stage, each stage getting its weight's share of the bar, in order."""
    total = float(sum(weights))
    stages: list[ProgressCallback | None] = []
    start = 0.0
    for weight in weights:
        share = weight / total if total > 0 else 0.0
        stages.append(scaled_progress(progress, start, share))
        start += share
    return stages
