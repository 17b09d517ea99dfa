"""Cohorts: explain hundreds of volumes on one machine or a Dask cluster, resumable, nothing lost.

>>> from SegHiResCAMLib.cohort import explain_cohort
>>> results = explain_cohort("cases.csv", "model.pt", ExplainSettings(target_class=2), out="heatmaps")

``seghirescam batch`` is the command line of the same thing. Importing this package imports
neither torch nor Dask.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "explain_cohort": "runner",
    "Case": "cases",
    "read_cases": "cases",
    "CaseResult": "store",
    "CohortResults": "store",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
