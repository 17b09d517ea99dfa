"""Tiny U-Nets saved as real model files (weights + model card), and test images with odd geometry.

Shared by the pipeline, worker, command-line and demo tests; everything is small enough for
a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.unet import UNet

CLASS_NAMES = ("background", "grey matter", "white matter")


def save_tiny_unet(
    folder: Path,
    name: str = "tiny3d",
    *,
    spatial_dims: int = 3,
    channels: tuple[int, ...] = (4, 8),
    layers: tuple[str, ...] = ("bottleneck", "decoder.0", "head"),
    seed: int = 0,
    in_channels: int = 1,
    **card_fields,
) -> Path:
    """Write ``<name>.pt`` (state dict) and ``<name>.json`` (model card); return the weights path."""
    torch.manual_seed(seed)
    network = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=len(CLASS_NAMES), channels=channels)
    # Non-trivial batch-norm statistics, so eval mode differs from a fresh network.
    for module in network.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.pt"
    torch.save(network.state_dict(), weights)
    card = ModelCard(
        name=name,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        class_names=CLASS_NAMES,
        layers=layers,
        divisible_by=2 ** (len(channels) - 1),
        network={"name": "SegHiResCAM.UNet",
                 "args": {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": len(CLASS_NAMES),
                          "channels": list(channels)}},
        **card_fields,
    )
    card.save(weights.with_suffix(".json"))
    load_model(weights)  # the pair must load through the project's loader
    return weights


def oblique_direction(a_deg: float = 17.0, b_deg: float = -31.0) -> tuple[float, ...]:
    """A rotation about an oblique axis, row-major 3x3 as ITK stores it."""
    a, b = np.deg2rad(a_deg), np.deg2rad(b_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def brain_like_image(shape=(16, 16, 16), seed: int = 0) -> np.ndarray:
    """A bright blob with a darker core and noise: something for a network to respond to."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    radius = np.sqrt(k**2 + j**2 + i**2)
    image = 100.0 * (radius < 0.8) - 40.0 * (radius < 0.35) + 5.0 * rng.standard_normal(shape)
    return image.astype(np.float32)


def write_oblique_image(path: Path, shape=(16, 16, 16), seed: int = 0) -> sitk.Image:
    """Write an anisotropic, oblique, off-origin image; return it as SimpleITK reads it back."""
    image = sitk.GetImageFromArray(brain_like_image(shape, seed))
    image.SetOrigin((-31.5, 12.25, 80.125))
    image.SetSpacing((0.9, 1.7, 3.1))
    image.SetDirection(oblique_direction())
    sitk.WriteImage(image, str(path))
    return sitk.ReadImage(str(path))


def write_labels_like(path: Path, reference: sitk.Image, labels: np.ndarray) -> None:
    """Write a label array on the reference image's grid."""
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


def write_tiny_case(folder: Path, image_name: str = "t1.nii.gz") -> Path:
    """A tiny U-Net file, an oblique 16^3 image and ``roi.nrrd`` (one box, label 1) beside it; the model's path."""
    model = save_tiny_unet(folder)
    reference = write_oblique_image(folder / image_name)
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[5:11, 4:12, 6:10] = 1
    write_labels_like(folder / "roi.nrrd", reference, labels)
    return model
