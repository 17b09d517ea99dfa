"""Small networks built for the engine tests (2D and 3D, batch norm, skips, known receptive fields)."""

from __future__ import annotations

import torch
from torch import nn

from SegHiResCAMLib.models.unet import UNet


def _with_batch_norm_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial batch-norm statistics and affine weights (seeded by the caller)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def unet(spatial_dims: int = 3, classes: int = 3, dtype=torch.float32, seed: int = 0) -> UNet:
    """A 3-level U-Net whose batch norms hold non-trivial running statistics."""
    torch.manual_seed(seed)
    model = UNet(spatial_dims, 1, classes, channels=(4, 8, 16)).to(dtype)
    return _with_batch_norm_statistics(model)


class LocalNet(nn.Module):
    """conv3 -> ReLU -> ``features`` (conv3, ReLU) -> ``mix`` (conv3) -> ReLU -> ``head`` (1x1).

    Downstream of ``features`` the receptive field is 3 voxels wide, so a map there can
    only depend on the ROI dilated by one voxel.
    """

    def __init__(self, spatial_dims: int = 2, classes: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.stem = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU())
        self.features = nn.Sequential(conv(4, 6, 3, padding=1), nn.ReLU())
        self.mix = conv(6, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.head = conv(6, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.mix(self.features(self.stem(x)))))


class InplaceNet(nn.Module):
    """``conv`` is followed by an in-place ReLU, which overwrites the conv's output tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)))


class InplaceUNet(nn.Module):
    """A two-level U-Net (batch norm, skip) that works in place after its layers.

    ``enc`` ends in ``ReLU(inplace=True)`` (overwriting its batch norm's output), the skip is added
    to ``up``'s output with ``+=``, and ``act`` (``LeakyReLU(inplace=True)``) overwrites ``dec``'s
    output, whose overwritten tensor the head then reads.
    """

    def __init__(self, spatial_dims: int = 2, classes: int = 3) -> None:
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if spatial_dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        upconv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.enc = nn.Sequential(conv(1, 4, 3, padding=1), norm(4), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2) if spatial_dims == 2 else nn.MaxPool3d(2)
        self.mid = nn.Sequential(conv(4, 8, 3, padding=1), norm(8), nn.ReLU(inplace=True))
        self.up = upconv(8, 4, 2, stride=2)
        self.dec = nn.Sequential(conv(4, 4, 3, padding=1), norm(4))
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.head = conv(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        y = self.up(self.mid(self.pool(skip)))
        y += skip
        y = self.dec(y)
        self.act(y)
        return self.head(y)


def inplace_unet(spatial_dims: int = 2, seed: int = 0) -> InplaceUNet:
    """An :class:`InplaceUNet` in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = InplaceUNet(spatial_dims)
    return _with_batch_norm_statistics(model)


class TupleLayerNet(nn.Module):
    """``pair`` returns a tuple; ``classifier`` returns (N, classes) without spatial dims."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y, -y

    def __init__(self) -> None:
        super().__init__()
        self.pair = self.Pair()
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a, _ = self.pair(x)
        return self.head(a)


class ClassifierNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1)


def hooked_output_and_activation(model: nn.Module, x: torch.Tensor, layer: str):
    """Reference capture with a plain forward hook and full autograd (no graph cut)."""
    store = {}

    def keep_first_output(module, inputs, output) -> None:
        store.setdefault("a", output)

    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(keep_first_output)
    try:
        out = model(x)
    finally:
        handle.remove()
    return out, store["a"]
