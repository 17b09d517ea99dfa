"""What every case of a cohort run shares: the model, the settings, the output folder.

A :class:`CohortJob` is built once by the caller and sent to every worker with each case. Its
:meth:`~CohortJob.fingerprint` is what a finished case must have been explained with to count as
done: the settings that change a heatmap (not the device or the batch size, which change only how
it is computed) and the model (its path, and its files' sizes and modification times). The
permission to run the model's code (``trust_code``) is not part of it: it changes no heatmap.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..settings import ExplainSettings
from .cases import Case

# Settings that change how a map is computed, not what it is: a cohort may resume with others.
HOW_FIELDS = ("device", "batch_size")
HEATMAP_SUFFIX = ".nrrd"
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class CohortJob:
    """The part of a cohort run that every case shares.

    Attributes:
        model: the model file or folder (an absolute path, which every worker must see).
        settings: what to explain; its ``target_class`` is the class of cases that name none.
        out: the cohort folder (absolute); case ``c`` writes to ``out/c/``.
        trust_code: allow running code that comes with the model.
        run_id: this run's id, written to each case's attempt log and manifest.
        threads: torch threads per case (None = the worker's own setting).
    """

    model: str
    settings: ExplainSettings
    out: str
    trust_code: bool = False
    run_id: str = ""
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.settings, ExplainSettings):
            raise InputError(f"the cohort settings must be ExplainSettings, got {type(self.settings).__name__}")
        if not isinstance(self.trust_code, bool):
            raise InputError(f"trust_code must be true or false, got {self.trust_code!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError(f"threads must be a positive number or None, got {self.threads!r}")
        # Computed here, in the caller's process, and sent to the workers with the job: every worker
        # then checks and writes manifests against the same fingerprint, whatever happens to the files.
        settings = {key: value for key, value in self.settings.to_dict().items() if key not in HOW_FIELDS}
        object.__setattr__(self, "_fingerprint", {"settings": settings, "model": model_identity(self.model)})

    def settings_for(self, case: Case) -> ExplainSettings:
        """The settings of one case: the cohort's, with the case's own class when it names one."""
        if case.target_class is None:
            return self.settings
        return dataclasses.replace(self.settings, target_class=case.target_class)

    def fingerprint(self) -> dict[str, Any]:
        """What decides the heatmaps of every case (JSON): settings without :data:`HOW_FIELDS`, model."""
        return copy.deepcopy(self._fingerprint)  # type: ignore[attr-defined]


def model_identity(path: str | Path) -> dict[str, str]:
    """The model's path and a digest of its files' names, sizes and modification times (a retrained
    model saved over the old one changes it; reading the weights is not needed)."""
    source = Path(path)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    listing = []
    for file in files:
        stat = file.stat()
        listing.append([file.relative_to(source).as_posix() if file != source else file.name, stat.st_size,
                        stat.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
    return {"path": os.fspath(source), "files": digest}


def output_names(methods: Sequence[str], layers: Sequence[str]) -> dict[str, str]:
    """method -> heatmap file name in the case folder: ``<method>_<layer>.nrrd``, several layers
    (whose maps are averaged) joined by ``+``; characters unsafe in file names become ``-``."""
    layer_part = _UNSAFE_IN_NAME.sub("-", "+".join(layers))
    return {method: f"{method}_{layer_part}{HEATMAP_SUFFIX}" for method in methods}
