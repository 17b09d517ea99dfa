"""Pictures of a heatmap over its image: three planes through one point, labelled for a reader.

Each picture shows axial, coronal and sagittal planes through a point (by default the map's
hottest voxel inside the region), in Slicer's radiological layout: axial and coronal planes
show the patient's right on the screen's left; sagittal planes show anterior on the left.
Every panel carries its orientation letters (R/L, A/P, S/I) and its position in mm; the figure
has a colour bar, a title (model, layer, method, class, region) and the region's outline; the
grey window comes from the image's own intensities (0.5th to 99.5th percentile).

The volume is first brought to the nearest axis-aligned RAS layout (axis swaps and flips only,
no interpolation), so oblique volumes are shown on their nearest axis-aligned planes. Needs
matplotlib (``pip install 'seghirescam[eval]'``); the layout itself (:func:`plane`) is numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .volume import Volume

EXTRA_HINT = "pip install 'seghirescam[eval]'"
PLANES = ("axial", "coronal", "sagittal")
DPI = 90  # pixels per inch of the PNG files
FIGURE_SIZE = (12.5, 4.6)  # inches: three panels and the colour bar
# Per plane: the RAS axis held fixed, the RAS axis across the screen (left -> right) with its sign,
# and the RAS axis up the screen with its sign. RAS axes: 0 = R, 1 = A, 2 = S.
_LAYOUT = {
    "axial": (2, (0, -1), (1, +1)),     # screen left = R, up = A
    "coronal": (1, (0, -1), (2, +1)),   # screen left = R, up = S
    "sagittal": (0, (1, +1), (2, +1)),  # screen left = P ... right = A, up = S
}
_LETTERS = {(0, +1): "R", (0, -1): "L", (1, +1): "A", (1, -1): "P", (2, +1): "S", (2, -1): "I"}


@dataclass(frozen=True)
class Plane:
    """One plane ready to draw: arrays indexed [row from top, column from left].

    Attributes:
        image, heat, region: 2D arrays (region may be None).
        letters: (left, right, top, bottom) orientation letters.
        extent: (left, right, bottom, top) in mm along the screen axes (for imshow).
        position: the plane's RAS coordinate (mm) along its fixed axis, e.g. ("S", 12.0).
    """

    image: np.ndarray
    heat: np.ndarray
    region: np.ndarray | None
    letters: tuple[str, str, str, str]
    extent: tuple[float, float, float, float]
    position: tuple[str, float]


def ras_layout(volume: Volume) -> tuple[list[int], list[bool]]:
    """Array axes and flips that put a ``(K, J, I)`` array in (S, A, R) order, increasing to S, A, R."""
    direction = volume.direction_ras
    axes, flips = [], []
    for ras_axis in (2, 1, 0):  # array order (K, J, I) ~ (S, A, R)
        column = int(np.argmax(np.abs(direction[ras_axis])))  # the I/J/K axis closest to this RAS axis
        axes.append(2 - column)
        flips.append(bool(direction[ras_axis, column] < 0))
    if sorted(axes) != [0, 1, 2]:
        axes, flips = [0, 1, 2], [False, False, False]  # too oblique to match: show the array as it is
    return axes, flips


def _to_sar(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    out = np.transpose(array, axes)
    for n, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=n)
    return out


def hottest_voxel(heat: np.ndarray, region: np.ndarray | None = None) -> tuple[int, int, int]:
    """``(k, j, i)`` of the map's hottest voxel inside the region (anywhere if the region is empty or None)."""
    values = np.asarray(heat, dtype=np.float64)
    if region is not None and np.asarray(region).any():
        values = np.where(np.asarray(region, bool), values, -np.inf)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(values)), values.shape))  # type: ignore[return-value]


def plane(image: Volume, heat: np.ndarray, name: str, voxel: Sequence[int],
          region: np.ndarray | None = None) -> Plane:
    """The plane ``name`` ("axial", "coronal", "sagittal") through voxel ``(k, j, i)``, laid out for the screen."""
    axes, flips = ras_layout(image)
    shape = image.spatial_shape
    sar = [_to_sar(np.asarray(a), axes, flips) if a is not None else None
           for a in (image.array if image.array.ndim == 3 else image.array[0], heat, region)]
    # The voxel in (S, A, R) array order.
    index = [voxel[a] for a in axes]
    index = [shape[a] - 1 - v if f else v for v, a, f in zip(index, axes, flips)]
    fixed, (across, across_sign), (up, up_sign) = _LAYOUT[name]
    position_in_array = {2: 0, 1: 1, 0: 2}  # RAS axis -> its array axis in (S, A, R)
    spacing_sar = [image.spacing[2 - a] for a in axes]

    def cut(array: np.ndarray) -> np.ndarray:
        taken = np.take(array, index[position_in_array[fixed]], axis=position_in_array[fixed])
        # Remaining axes are in (S, A, R) order minus the fixed one; put `up` on rows and `across` on columns.
        remaining = [r for r in (2, 1, 0) if r != fixed]
        if remaining.index(up) != 0:
            taken = taken.T
        if up_sign > 0:  # row 0 is the top of the screen: the largest coordinate first
            taken = taken[::-1, :]
        if across_sign < 0:  # the left of the screen is the largest coordinate (R in radiological view)
            taken = taken[:, ::-1]
        return np.ascontiguousarray(taken)

    planes = [cut(a) if a is not None else None for a in sar]
    rows, columns = planes[0].shape
    width = columns * spacing_sar[position_in_array[across]]
    height = rows * spacing_sar[position_in_array[up]]
    letters = (_LETTERS[(across, -across_sign)], _LETTERS[(across, across_sign)],
               _LETTERS[(up, up_sign)], _LETTERS[(up, -up_sign)])
    k, j, i = voxel
    ras = image.ijk_to_ras @ np.array([i, j, k, 1.0])
    return Plane(planes[0], planes[1], planes[2], letters, (0.0, width, 0.0, height),
                 ("RAS"[fixed], float(ras[fixed])))


def pictures_unavailable() -> str | None:
    """Why pictures cannot be drawn here (matplotlib is missing), or None when they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"pictures need matplotlib ({error}); install it with {EXTRA_HINT}"
    return None


def picture_title(model: str, layer: str, method: str, class_name: str, region: str, case: str | None = None) -> str:
    """The title every picture carries: model, layer, method, class, region (and the case, in a cohort)."""
    parts = [model, f"layer {layer}", method, f"class {class_name}", f"region: {region}"]
    return " · ".join(parts + ([case] if case else []))


def region_label(roi: str | Path | None = None, roi_label: object = None, settings=None) -> str:
    """What the region of a run is, in words: the file (and label) given, else the settings' region kind."""
    if roi is not None:
        return Path(roi).name + (f", label {roi_label}" if roi_label is not None else "")
    if settings is not None and settings.point is not None:
        where = ", ".join(f"{axis} {value:+.0f}" for axis, value in zip("RAS", settings.point.ras))
        return f"the prediction at ({where}) mm"
    if settings is not None and settings.region == "whole-image":
        return "the whole image"
    return "the model's own prediction"


def save_explanation_picture(path: str | Path, result, method: str, *, model: str, region: str,
                             voxel: Sequence[int] | None = None) -> Path:
    """The picture of one method's map from an explain run (``service.ExplainResult``), titled with its facts.

    Args:
        path: the PNG to write.
        result: the run's result (image, maps, settings as run, class name, region given).
        method: which of its maps.
        model: the model's name for the title.
        region: the region in words (:func:`region_label`).
        voxel: ``(k, j, i)`` the planes pass through; None = the map's hottest voxel in the region.
    """
    settings = result.settings
    class_name = f"{settings.target_class} ({result.class_name})" if result.class_name else str(settings.target_class)
    mask = None if result.region is None else np.asarray(result.region) > 0
    title = picture_title(model, "+".join(settings.layers), method, class_name, region)
    return save_three_planes(path, result.image, result.maps[method].array, title=title, region=mask, voxel=voxel)


def intensity_window(image: np.ndarray) -> tuple[float, float]:
    """The grey window from the image's own intensities: its 0.5th and 99.5th percentiles."""
    low, high = np.percentile(np.asarray(image, dtype=np.float64), [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


def three_plane_figure(image: Volume, heat: np.ndarray, *, title: str, region: np.ndarray | None = None,
                       voxel: Sequence[int] | None = None, hide_below: float = 0.1, opacity: float = 0.6):
    """A matplotlib figure: three planes through ``voxel`` (default: the hottest voxel in the region).

    Args:
        image: the image.
        heat: the map on the image's grid, values in [0, 1].
        title: the figure's title (model, layer, method, class, region).
        region: bool mask whose outline is drawn (and inside which the hottest voxel is sought).
        voxel: ``(k, j, i)`` the planes pass through.
        hide_below: map values below this are transparent.
        opacity: the map's opacity.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import patheffects
    from matplotlib import pyplot as plt
    from matplotlib.colors import Normalize

    heat = np.asarray(heat, dtype=np.float32)
    voxel = tuple(voxel) if voxel is not None else hottest_voxel(heat, region)
    low, high = intensity_window(image.array)
    figure, axes = plt.subplots(1, 3, figsize=FIGURE_SIZE, gridspec_kw={"wspace": 0.08})
    colours = plt.get_cmap("inferno")
    for axis, name in zip(axes, PLANES):
        cut = plane(image, heat, name, voxel, region)
        axis.imshow(cut.image, cmap="gray", vmin=low, vmax=high, extent=cut.extent, interpolation="nearest")
        overlay = np.ma.masked_less(cut.heat, hide_below)
        axis.imshow(overlay, cmap=colours, norm=Normalize(0.0, 1.0), alpha=opacity, extent=cut.extent,
                    interpolation="nearest")
        if cut.region is not None and cut.region.any() and not cut.region.all():
            axis.contour(cut.region.astype(float)[::-1, :], levels=[0.5], colors=["#00e5ff"], linewidths=1.0,
                         extent=cut.extent)
        left, right, top, bottom = cut.letters
        # White with a black rim: readable over white matter and over black background alike.
        style = {"color": "white", "fontsize": 12, "fontweight": "bold",
                 "path_effects": [patheffects.withStroke(linewidth=2.5, foreground="black")]}
        axis.text(0.02, 0.5, left, transform=axis.transAxes, ha="left", va="center", **style)
        axis.text(0.98, 0.5, right, transform=axis.transAxes, ha="right", va="center", **style)
        axis.text(0.5, 0.98, top, transform=axis.transAxes, ha="center", va="top", **style)
        axis.text(0.5, 0.02, bottom, transform=axis.transAxes, ha="center", va="bottom", **style)
        axis.set_title(f"{name} {cut.position[0]} {cut.position[1]:+.1f} mm", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_facecolor("black")
    bar = figure.colorbar(plt.cm.ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colours), ax=list(axes),
                          fraction=0.02, pad=0.01)
    bar.set_label("relevance (fraction of the map's maximum)")
    import textwrap

    figure.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=10)
    return figure


def figure_description(figure) -> str:
    """What the figure's panels say, read from its drawn text: ``axial S +12.0 mm (R L A P); ...``."""
    panels = [axis for axis in figure.axes if axis.get_title()]
    return "; ".join(f"{axis.get_title()} ({' '.join(text.get_text() for text in axis.texts)})" for axis in panels)


def save_three_planes(path: str | Path, image: Volume, heat: np.ndarray, **options) -> Path:
    """Write :func:`three_plane_figure` as a PNG (at :data:`DPI`); returns the path.

    The PNG's text fields repeat what the picture says, for search and for programs: Title (the
    figure's title) and Description (each panel's plane, position and orientation letters).
    """
    from matplotlib import pyplot as plt

    figure = three_plane_figure(image, heat, **options)
    try:
        figure.savefig(path, dpi=DPI, facecolor="white",
                       metadata={"Title": options.get("title", ""), "Description": figure_description(figure)})
    finally:
        plt.close(figure)
    return Path(path)
