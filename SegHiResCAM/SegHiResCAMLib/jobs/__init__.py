"""Jobs that drive a worker process from Slicer (or any script): an explanation from MRML nodes to
heatmap nodes (:class:`~.explain_job.ExplainJob`), and a model's layer list (:class:`~.layers_job.LayersJob`).

Qt-free and torch-free: the widget polls them from a timer, scripts wait on them. ``explain_job``
imports the MRML glue (slicer-core) when it runs.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "ExplainJob": "explain_job",
    "JobInputs": "explain_job",
    "LayersJob": "layers_job",
    "WorkerJob": "worker_job",
    "error_from_event": "worker_job",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
