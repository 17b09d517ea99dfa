"""Tiny networks of the kinds users bring (scriptable U-Nets, nnU-Net folders), for the model-loading tests."""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    """conv 3 -> ReLU."""

    def __init__(self, dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(in_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Up(nn.Module):
    """Upsampling block whose forward takes an extra argument (the skip)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d)(in_channels, out_channels, 2, stride=2)
        self.conv = Block(dims, 2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], 1))


class ScriptableUNet(nn.Module):
    """A 3-level U-Net that ``torch.jit.script`` and ``torch.jit.trace`` both accept."""

    def __init__(self, dims: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.ModuleList([Block(dims, 1, 4), Block(dims, 4, 8)])
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.mid = Block(dims, 8, 16)
        self.dec = nn.ModuleList([Up(dims, 16, 8), Up(dims, 8, 4)])
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.mid(x)
        index = 0
        for block in self.dec:
            x = block(x, skips[len(skips) - 1 - index])
            index += 1
        return self.head(x)


def scriptable_unet(dims: int = 3, classes: int = 3, seed: int = 0) -> ScriptableUNet:
    torch.manual_seed(seed)
    return ScriptableUNet(dims, classes).eval()


def blob_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(1, *shape) float32 image: smooth noise with a bright blob, so predictions are not constant."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-sum(g ** 2 for g in grids) * 4)
    return (blob + 0.1 * rng.standard_normal(shape)).astype(np.float32)[None]


def hooked(model: nn.Module, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The eager reference: output and layer outputs through forward hooks."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
               for name in layers]
    try:
        output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return output, [captured[name] for name in layers]


# ----------------------------------------------------------------------------- MONAI bundles

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2],
             "num_res_units": 1}


def monai_unet() -> nn.Module:
    from monai.networks import nets

    torch.manual_seed(0)
    return nets.UNet(**UNET_ARGS).eval()


def write_bundle(folder, model, *, network_def=None, torchscript=False):
    """A MONAI bundle folder as MONAI's model zoo lays them out (configs/, models/)."""
    import json

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "channels": UNET_ARGS["channels"],
        "network_def": network_def or {"_target_": "UNet", **{k: v for k, v in UNET_ARGS.items() if k != "channels"},
                                       "channels": "@channels"},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
        ]},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {"name": "Tiny spleen", "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": ["4*n", "4*n", "4*n"]}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "spleen"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    if torchscript:
        torch.jit.save(torch.jit.script(model), str(folder / "models" / "model.ts"))
    else:
        torch.save(model.state_dict(), folder / "models" / "model.pt")
    return folder


# ----------------------------------------------------------------------------- nnU-Net v2 folders

NNUNET_ARCH = {
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 2], [1, 2, 2]],
    "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
NNUNET_CLASSES = {"background": 0, "liver": 1, "tumour": 2}
CT_PROPERTIES = {"mean": 50.0, "std": 80.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0,
                 "max": 900.0, "min": -1000.0, "median": 40.0}


def nnunet_arch(dims: int = 3) -> dict:
    """``arch_kwargs`` of the plans for a 3-stage network (2D: the last two axes of the 3D one)."""
    if dims == 3:
        return dict(NNUNET_ARCH)
    return dict(NNUNET_ARCH, conv_op="torch.nn.modules.conv.Conv2d",
                norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                kernel_sizes=[k[1:] for k in NNUNET_ARCH["kernel_sizes"]], strides=[s[1:] for s in NNUNET_ARCH["strides"]])


def nnunet_network(class_name: str = "PlainConvUNet", seed: int = 0, dims: int = 3) -> nn.Module:
    """The network nnU-Net itself would build from :func:`write_nnunet_folder`'s plans."""
    import dynamic_network_architectures.architectures.unet as unets

    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    kwargs = dict(nnunet_arch(dims), conv_op=conv, norm_op=norm, nonlin=nn.LeakyReLU)
    kwargs["n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"] = [1, 1, 1]
    torch.manual_seed(seed)
    network = getattr(unets, class_name)(input_channels=1, num_classes=len(NNUNET_CLASSES), deep_supervision=False,
                                         **kwargs)
    for module in network.modules():  # instance norm affine parameters away from 1 / 0
        if isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return network.eval()


def write_nnunet_folder(root, network: nn.Module, *, class_name: str = "PlainConvUNet", old_plans: bool = False,
                        transpose=(2, 0, 1), spacing=(2.0, 1.0, 1.0), extra_pickle=None, dims: int = 3,
                        labels: dict | None = None):
    """Write an nnU-Net v2 results folder (plans, dataset, fold_0/checkpoint_final.pth) as nnU-Net lays it out."""
    import json
    from pathlib import Path

    name = "3d_fullres" if dims == 3 else "2d"
    folder = Path(root) / "Dataset001_Tiny" / f"nnUNetTrainer__nnUNetPlans__{name}"
    (folder / "fold_0").mkdir(parents=True)
    configuration = {
        "data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16] * dims, "median_image_size_in_voxels": [20, 24, 24][-dims:],
        "spacing": list(spacing)[-dims:],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
    }
    blocks = [1, 1, 1]
    if old_plans:
        configuration.update({
            "UNet_class_name": class_name, "UNet_base_num_features": 4, "unet_max_num_features": 16,
            "n_conv_per_stage_encoder": blocks, "n_conv_per_stage_decoder": [1, 1],
            "pool_op_kernel_sizes": NNUNET_ARCH["strides"], "conv_kernel_sizes": NNUNET_ARCH["kernel_sizes"],
        })
    else:
        arch = nnunet_arch(dims)
        arch["n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"] = blocks
        configuration["architecture"] = {
            "network_class_name": f"dynamic_network_architectures.architectures.unet.{class_name}",
            "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {
        "dataset_name": "Dataset001_Tiny", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose), "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "configurations": {name: configuration},
        "foreground_intensity_properties_per_channel": {"0": CT_PROPERTIES},
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": labels or NNUNET_CLASSES, "numTraining": 3, "file_ending": ".nii.gz",
               "name": "Tiny"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99}]},
        "grad_scaler_state": None,
        "logging": {"train_losses": [np.float64(0.9), np.float64(0.5)], "ema_fg_dice": [np.float32(0.3)]},
        "_best_ema": np.float64(0.8),
        "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": name, "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    if extra_pickle is not None:
        checkpoint["extra"] = extra_pickle
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder
