"""Draw SegHiResCAM's 128x128 icons (extension and module): a heat blob inside a segment outline.

Run from the repository root:  python Testing/data/make_icons.py
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (ROOT / "Resources" / "SegHiResCAM.png", ROOT / "SegHiResCAM" / "Resources" / "Icons" / "SegHiResCAM.png")


def heat_colour(value: np.ndarray) -> np.ndarray:
    """Black -> purple -> red -> orange -> yellow (an inferno-like ramp), value in [0, 1]."""
    stops = np.array([0.0, 0.3, 0.6, 0.85, 1.0])
    colours = np.array([[10, 8, 30], [90, 20, 110], [200, 40, 50], [245, 140, 20], [252, 240, 120]], float)
    return np.stack([np.interp(value, stops, colours[:, c]) for c in range(3)], axis=-1)


def draw(size: int = 128) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    heat = np.exp(-((x - 0.12) ** 2 + (y + 0.05) ** 2) / 0.18) + 0.55 * np.exp(-((x + 0.35) ** 2 + (y - 0.3) ** 2) / 0.06)
    heat = heat / heat.max()
    rgb = heat_colour(heat)
    radius = np.hypot(x / 0.78, y / 0.68)  # the "segment" outline: a white ellipse
    outline = np.abs(radius - 1.0) < 0.035
    rgb[outline] = 245
    alpha = np.where(np.hypot(x, y) <= 1.0, 255, 0)  # round icon, transparent corners
    return np.dstack([rgb, alpha]).round().clip(0, 255).astype(np.uint8)


def write_png(path: Path, rgba: np.ndarray) -> None:
    height, width, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


if __name__ == "__main__":
    icon = draw()
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(target, icon)
