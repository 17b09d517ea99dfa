"""The segments of a Slicer ``.seg.nrrd`` file: which layer and label value hold each one.

Slicer writes each segment's name, ID, layer and label value into the NRRD header
(``Segment{N}_Name``, ``Segment{N}_ID``, ``Segment{N}_Layer``, ``Segment{N}_LabelValue``).
Segments that do not overlap share one layer with different label values; overlapping
segments go into separate layers, and the file is then a 4D NRRD (``kinds: list domain
domain domain``) that SimpleITK reads as a 3D image with one component per layer. Files of
Slicer before 4.11 had no layer or label-value keys: one component per segment, value 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError


@dataclass(frozen=True)
class SegmentEntry:
    """One segment as the header describes it.

    Attributes:
        number: the N of its ``Segment{N}_`` keys (the order Slicer wrote them in).
        segment_id: Slicer's segment ID (``Segment_1``, or a name the user gave).
        name: the segment's name as shown in Slicer.
        layer: the component (layer) of the file that holds it.
        label_value: its voxels' value in that layer.
    """

    number: int
    segment_id: str
    name: str
    layer: int
    label_value: int

    def describe(self) -> str:
        same = self.segment_id == self.name
        return repr(self.name) if same else f"{self.name!r} (ID {self.segment_id!r})"


def _header_int(image: sitk.Image, key: str, default: int, source: Path) -> int:
    if not image.HasMetaDataKey(key):
        return default
    text = image.GetMetaData(key).strip()
    try:
        return int(text)
    except ValueError:
        raise InputError(
            f"the header of {source.name} gives {key} = {text!r}, not a whole number; resave the segmentation "
            "in Slicer and try again"
        ) from None


def segments_of(image: sitk.Image, source: Path) -> list[SegmentEntry]:
    """Every segment the header of a ``.seg.nrrd`` describes (empty for other files).

    Raises:
        InputError: a header entry names a layer the file does not have, or is not a number.
    """
    layers = image.GetNumberOfComponentsPerPixel()
    entries: list[SegmentEntry] = []
    number = 0
    while image.HasMetaDataKey(f"Segment{number}_Name") or image.HasMetaDataKey(f"Segment{number}_ID"):
        prefix = f"Segment{number}_"
        name = image.GetMetaData(prefix + "Name") if image.HasMetaDataKey(prefix + "Name") else ""
        segment_id = image.GetMetaData(prefix + "ID") if image.HasMetaDataKey(prefix + "ID") else name
        layer = _header_int(image, prefix + "Layer", number if layers > 1 else 0, source)
        value = _header_int(image, prefix + "LabelValue", 1, source)
        if not 0 <= layer < layers:
            raise InputError(
                f"the header of {source.name} puts segment {name!r} in layer {layer}, but the file has {layers} "
                "layer(s); resave the segmentation in Slicer and try again"
            )
        entries.append(SegmentEntry(number, segment_id, name or segment_id, layer, value))
        number += 1
    return entries


def describe_segments(segments: Sequence[SegmentEntry], limit: int = 12) -> str:
    """The segments as a user reads them in a message: names, with IDs where they differ."""
    shown = ", ".join(entry.describe() for entry in segments[:limit])
    return shown + (f" and {len(segments) - limit} more" if len(segments) > limit else "")


def find_segments(segments: Sequence[SegmentEntry], key: str) -> list[SegmentEntry]:
    """The segments named ``key``, else those whose ID is ``key`` (exact first, then ignoring case).

    More than one entry back means the name is shared; the IDs then tell the segments apart.
    """
    for matches in (lambda text: text == key, lambda text: text.casefold() == key.casefold()):
        for field in ("name", "segment_id"):
            found = [entry for entry in segments if matches(getattr(entry, field))]
            if found:
                return found
    return []


def segment_mask(image: sitk.Image, entry: SegmentEntry) -> np.ndarray:
    """The voxels of one segment: its label value in its layer, as a bool ``(K, J, I)`` array."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, entry.layer)
    return sitk.GetArrayViewFromImage(image) == entry.label_value
