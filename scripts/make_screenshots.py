"""Make the README/ExtensionsIndex screenshot from the demo's own pictures.

Runs ``seghirescam demo`` and stacks its pictures of the 3D demo model (drawn by
``SegHiResCAMLib.pictures``: axial, coronal and sagittal planes with letters, colour bar and
title, as ``explain --png`` and the evaluation report draw them) into
``Resources/Screenshots/1.png``: Seg-HiRes-Grad CAM on top, Seg-Grad CAM below.

    python scripts/make_screenshots.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GAP = 6


def stack(pictures: list[np.ndarray]) -> np.ndarray:
    """The pictures one above the other (same width), white gaps between them."""
    width = max(picture.shape[1] for picture in pictures)
    rows = []
    for picture in pictures:
        padded = np.ones((picture.shape[0], width, 3), np.float32)
        padded[:, : picture.shape[1]] = picture[..., :3]
        rows += [padded, np.ones((GAP, width, 3), np.float32)]
    return np.concatenate(rows[:-1])


def main() -> None:
    from matplotlib import pyplot as plt

    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "SegHiResCAMLib.cli", "demo", "--out", folder], check=True)
        pictures = [plt.imread(Path(folder) / f"demo_unet3d_{method}.png")
                    for method in ("seg-hires-grad-cam", "seg-grad-cam")]
        out = ROOT / "Resources" / "Screenshots" / "1.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        plt.imsave(out, stack(pictures))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
