"""Make the README/ExtensionsIndex screenshot from the demo's own pictures.

Runs ``seghirescam demo`` and tiles its PNGs (drawn offscreen by Slicer's slice-view code from
slicer-core) into ``Resources/Screenshots/1.png``: rows Seg-HiRes-Grad CAM and Seg-Grad CAM of
the 3D demo model, columns axial, coronal and sagittal.

    python scripts/make_screenshots.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from SegHiResCAMLib.mrml.render import read_png, write_png

ROOT = Path(__file__).resolve().parents[1]
GAP = 6


def tile(rows: list[list[np.ndarray]]) -> np.ndarray:
    height, width = rows[0][0].shape[:2]
    canvas = np.zeros((len(rows) * (height + GAP) - GAP, len(rows[0]) * (width + GAP) - GAP, 3), np.uint8)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            canvas[r * (height + GAP): r * (height + GAP) + height, c * (width + GAP): c * (width + GAP) + width] = \
                picture[..., :3]
    return canvas


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "SegHiResCAMLib.cli", "demo", "--out", folder], check=True)
        rows = [[read_png(Path(folder) / f"demo_unet3d_{method}_{view}.png") for view in ("axial", "coronal", "sagittal")]
                for method in ("seg-hires-grad-cam", "seg-grad-cam")]
        out = ROOT / "Resources" / "Screenshots" / "1.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_png(tile(rows), out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
