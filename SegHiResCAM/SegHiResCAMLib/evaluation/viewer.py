"""An interactive 3D view of an image with each heatmap as a switchable overlay, offline.

The view is NiiVue (BSD-2, ``assets/niivue.umd.js``, vendored unchanged with its licence): one
2.3 MB UMD script that draws NIfTI volumes with WebGL2, loaded by a plain ``<script src>``, which
browsers allow from ``file://`` (ES modules and ``fetch`` of local files are blocked there). The
volumes are embedded in the page as base64 NIfTI-1 (the image as int16, each map as uint8 with
``scl_slope = 1/255``, gzip-compressed), so a report folder works when opened from disk, mailed or
archived. Alternatives weighed: ipyniivue (a Jupyter widget: needs a running kernel, no static
page), VTK.js / itk-vtk-viewer (10+ MB, data served over HTTP), Papaya (unmaintained since 2019),
Plotly volume traces (no slice views, heavy for 10^6 voxels).
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import Volume

ASSETS = Path(__file__).resolve().parent / "assets"
NIIVUE = "niivue.umd.js"


def nifti_bytes(array: np.ndarray, ijk_to_ras: np.ndarray, *, kind: str = "map") -> bytes:
    """A gzip-compressed NIfTI-1 file of a ``(K, J, I)`` array with its IJK-to-RAS matrix.

    ``kind="map"``: values in [0, 1] stored as uint8 with ``scl_slope = 1/255`` (display precision);
    ``kind="image"``: any range stored as int16 with slope and intercept spanning min..max.
    """
    values = np.asarray(array, dtype=np.float64)
    if values.ndim != 3:
        raise InputError(f"the 3D view needs a 3D array (K, J, I), got shape {values.shape}")
    if kind == "map":
        slope, intercept = 1.0 / 255.0, 0.0
        data = np.clip(np.round(values * 255.0), 0, 255).astype("<u1")
        datatype, bitpix = 2, 8
    else:
        low, high = float(values.min()), float(values.max())
        slope = (high - low) / 65535.0 if high > low else 1.0
        intercept = low + 32768.0 * slope
        data = np.clip(np.round((values - intercept) / slope), -32768, 32767).astype("<i2")
        datatype, bitpix = 4, 16
    k, j, i = values.shape
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, i, j, k, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1.0, *spacing, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<fff", header, 108, 352.0, slope, intercept)
    header[123] = 2  # xyzt_units: millimetres
    struct.pack_into("<hh", header, 252, 0, 1)  # qform_code unknown, sform_code scanner (RAS)
    for row in range(3):
        struct.pack_into("<4f", header, 280 + 16 * row, *matrix[row])
    header[344:348] = b"n+1\x00"
    # NIfTI stores I fastest: exactly the memory order of a C-ordered (K, J, I) array.
    return gzip.compress(bytes(header) + np.ascontiguousarray(data).tobytes(), compresslevel=6, mtime=0)


def viewer_data(image: Volume, heatmaps: Mapping[str, np.ndarray], region: np.ndarray | None = None,
                crosshair_ras=None, opacity: float = 0.7) -> dict:
    """The JSON the viewer script reads: the image and one overlay per map (and the region, if given)."""
    array = image.array if image.array.ndim == 3 else image.array[0]
    overlays = []
    for n, (label, heat) in enumerate(heatmaps.items()):
        overlays.append({"label": label, "name": f"map{n}.nii.gz", "cal_min": 0.1, "cal_max": 1.0,
                         "base64": base64.b64encode(nifti_bytes(heat, image.ijk_to_ras)).decode("ascii")})
    if region is not None:
        overlays.append({"label": "region (mask)", "name": "region.nii.gz", "colormap": "blue", "cal_min": 0.5,
                         "cal_max": 1.0, "base64": base64.b64encode(
                             nifti_bytes(np.asarray(region, np.float32), image.ijk_to_ras)).decode("ascii")})
    data = {"image": {"name": "image.nii.gz",
                      "base64": base64.b64encode(nifti_bytes(array, image.ijk_to_ras, kind="image")).decode("ascii")},
            "overlays": overlays, "opacity": float(opacity)}
    if crosshair_ras is not None:
        data["crosshair"] = [float(v) for v in crosshair_ras]
    return data


def viewer_section(data: dict, *, script_src: str | None = NIIVUE, height: int = 520) -> str:
    """The HTML of the viewer: canvas, overlay switches, data and scripts.

    Args:
        data: :func:`viewer_data`.
        script_src: where the page finds niivue.umd.js; None inlines it (a self-contained page).
        height: canvas height in pixels.
    """
    payload = json.dumps(data).replace("</", "<\\/")  # a JSON string must not close the script element
    if script_src is None:
        niivue = f"<script>{(ASSETS / NIIVUE).read_text(encoding='utf-8')}</script>"
    else:
        niivue = f'<script src="{html.escape(script_src)}"></script>'
    glue = (ASSETS / "viewer.js").read_text(encoding="utf-8")
    return (
        '<div class="seghirescam-viewer">'
        # NiiVue sizes the canvas to its parent, so the parent carries the height.
        f'<div style="width:100%;height:{int(height)}px"><canvas id="seghirescam-viewer-canvas"></canvas></div>'
        '<div id="seghirescam-viewer-overlays" class="overlays"></div>'
        '<div id="seghirescam-viewer-status" class="status">loading the 3D view…</div>'
        f'<script type="application/json" id="seghirescam-viewer-data">{payload}</script>'
        f"{niivue}<script>{glue}</script></div>"
    )


def viewer_page(image: Volume, heatmaps: Mapping[str, np.ndarray], *, title: str = "SegHiResCAM",
                region: np.ndarray | None = None, script_src: str | None = None) -> str:
    """A complete HTML page with the viewer (self-contained when ``script_src`` is None)."""
    section = viewer_section(viewer_data(image, heatmaps, region), script_src=script_src)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:12px}.overlays label{margin-right:14px}</style>"
            f"</head><body><h3>{html.escape(title)}</h3>{section}</body></html>")


class Viewer:
    """A viewer for notebooks: displays inline (an iframe holding the self-contained page) and saves."""

    def __init__(self, page: str, height: int = 620) -> None:
        self.page = page
        self.height = height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:0"></iframe>')

    def save(self, path: str | Path) -> Path:
        """Write the self-contained page (opens from disk in any WebGL2 browser)."""
        Path(path).write_text(self.page, encoding="utf-8")
        return Path(path)


def show(image, heatmaps, *, region=None, title: str = "SegHiResCAM") -> Viewer:
    """The 3D viewer of an image and its heatmaps, inline in a Jupyter notebook.

    Args:
        image: a :class:`Volume` (or a ``(K, J, I)`` array, shown with 1 mm voxels).
        heatmaps: a map, or a mapping label -> map, on the image's grid, values in [0, 1]
            (:class:`Volume` or array).
        region: optional bool mask shown as one more overlay.
        title: the heading above the view.

    Returns:
        A :class:`Viewer`; the notebook displays it, ``.save(path)`` writes the page.
    """
    volume = image if isinstance(image, Volume) else Volume(np.asarray(image))
    if not isinstance(heatmaps, Mapping):
        heatmaps = {"heatmap": heatmaps}
    maps = {label: np.asarray(getattr(heat, "array", heat)) for label, heat in heatmaps.items()}
    return Viewer(viewer_page(volume, maps, title=title, region=region))
