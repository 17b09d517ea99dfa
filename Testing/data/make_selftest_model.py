"""Train the tiny model that SegHiResCAM's Slicer self-test ships (Resources/Models/).

A 3-level 3D U-Net (4-8-16 channels) learns to segment bright balls on noise in a few
seconds on CPU. Run from the repository root:  python Testing/data/make_selftest_model.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.unet import UNet

OUT = Path(__file__).resolve().parents[2] / "SegHiResCAM" / "Resources" / "Models"
SIZE = 32
ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16]}


def ball_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with 1-2 bright balls and its label (1 inside the balls)."""
    image = rng.normal(0.0, 1.0, (SIZE,) * 3).astype(np.float32)
    label = np.zeros((SIZE,) * 3, np.int64)
    grid = np.indices((SIZE,) * 3)
    for _ in range(rng.integers(1, 3)):
        centre = rng.uniform(6, SIZE - 6, 3)
        radius = rng.uniform(3, 6)
        inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
        image[inside] += 3.0
        label[inside] = 1
    image = (image - image.mean()) / image.std()  # the card's zscore
    return image, label


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    model = UNet(**ARGS)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(150):
        images, labels = zip(*(ball_sample(rng) for _ in range(4)))
        x = torch.from_numpy(np.stack(images))[:, None]
        y = torch.from_numpy(np.stack(labels))
        loss = torch.nn.functional.cross_entropy(model(x), y, weight=torch.tensor([1.0, 3.0]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 25 == 0:
            print(step, float(loss))
    model.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), OUT / "SelfTestBallUNet.pt")
    ModelCard(
        name="Self-test ball U-Net (tiny, synthetic)",
        spatial_dims=3,
        in_channels=1,
        class_names=("background", "ball"),
        intensity={"scheme": "zscore"},
        layers=("decoder.0", "decoder.1", "bottleneck"),
        divisible_by=4,
        network={"name": "SegHiResCAM.UNet", "args": ARGS},
        extra={"purpose": "SegHiResCAM self-test only; trained on bright balls in noise"},
    ).save(OUT / "SelfTestBallUNet.json")


if __name__ == "__main__":
    main()
