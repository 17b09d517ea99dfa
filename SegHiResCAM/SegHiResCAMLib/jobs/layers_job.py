"""List a model's layers in a worker process, so Slicer's own process never imports torch for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..worker.launcher import WorkerProcess
from ..worker.protocol import LayersRequest
from .worker_job import WorkerJob


class LayersJob(WorkerJob):
    """The layers of the model at ``model_path`` with their output shapes for a probe input.

    ``result()`` (or ``wait()``) gives the worker's "result" event: ``layers`` (each a dict with
    ``name``, ``type``, ``output_shape`` and ``unusable``, why it cannot be explained or None), ``default_layers`` (the model card's), ``example_shape``,
    ``class_names`` and ``spatial_dims``.
    """

    what = "layer listing"

    def __init__(self, model_path: str | os.PathLike, *, trust_code: bool = False, size: int = 32,
                 python_executable: str | os.PathLike | None = None,
                 temp_root: str | os.PathLike | None = None) -> None:
        # A probe needs no GPU.
        super().__init__(python_executable, env={"CUDA_VISIBLE_DEVICES": "-1"}, temp_root=temp_root)
        self.model_path = Path(model_path).expanduser().resolve()
        self.request = LayersRequest(model=str(self.model_path), trust_code=trust_code, size=size)
        self.listing: dict[str, Any] | None = None

    def _check_inputs(self) -> None:
        if not self.model_path.exists():
            raise InputError(f"the model {self.model_path} does not exist; select a model file or folder")

    def _request(self, worker: WorkerProcess) -> LayersRequest:
        return self.request

    def _finish(self, event: dict[str, Any]) -> None:
        self.listing = {key: value for key, value in event.items() if key != "event"}
        self.state = "done"

    def _result(self) -> dict[str, Any]:
        return self.listing
