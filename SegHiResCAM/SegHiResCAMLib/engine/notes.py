"""What a run says when its heatmap is all zeros for a reason the user can act on.

A zero map is a true answer only when it comes with its reason: an empty region (nothing to
explain), or a layer whose evidence for the class is all negative (ReLU keeps none of it).
The whole-volume job and the sliding-window job say it in the same words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import catalog


def empty_region_note(target: str, region_given: bool, class_index: int, threshold: float, *,
                      fused: bool = False) -> str:
    """The note for a run whose region (given, or the model's prediction) has no voxel."""
    which = "fused " if fused else ""
    if target == "probability-threshold":
        where = "inside the region" if region_given else "in this image"
        note = f"no voxel {where} has a {which}class-{class_index} probability above {threshold}"
    elif region_given:
        note = "the region to explain is empty inside the image"
    elif fused:
        note = f"the model's fused prediction has no voxel of class {class_index} in this image"
    else:
        note = f"the model predicts no voxel of class {class_index} in this image"
    return note + ", so the heatmap is all zeros; choose a region or class that is present"


def no_positive_evidence_notes(maps: Mapping[tuple[str, str], torch.Tensor], methods: Sequence[str],
                               layers: Sequence[str]) -> list[str]:
    """One note per (method, layer) whose ReLU'd map is zero everywhere although the region is not empty.

    Args:
        maps: ``(method, layer) -> map`` after ReLU, over every sample of the run.
    """
    notes = []
    for method in methods:
        for layer in layers:
            if not bool(maps[(method, layer)].gt(0).any()):
                notes.append(
                    f"{catalog.method(method).label} finds no positive evidence for the class in this region at "
                    f"layer '{layer}' (its contributions there are all negative or zero, and ReLU keeps none), so "
                    "that map is all zeros; try another layer (a decoder layer nearer the output), or signed maps "
                    "(relu=False in Python) to see the negative evidence"
                )
    return notes
