"""``seghirescam demo``: explain the bundled demo models on the bundled MNI152 T1.

The demo explains the white-matter segment (class 2) of each demo U-Net with Seg-HiRes-Grad
CAM and Seg-Grad CAM, writes the heatmaps as NRRD files on the T1's grid, and draws one PNG per
heatmap (axial, coronal and sagittal planes with letters, colour bar and title: the pictures of
``seghirescam explain --png`` and the evaluation report) when matplotlib is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .volume import Volume

DATA_DIR = Path(__file__).resolve().parent / "data"
T1_FILE = "mni152_t1_2mm.nii.gz"
WHITE_MATTER_FILE = "mni152_wm_2mm.nrrd"
WHITE_MATTER = 2  # class index in the demo models' cards: 0 background, 1 grey matter, 2 white matter
MODELS = (("demo_unet3d", "3D U-Net"), ("demo_unet2d", "2D U-Net, slice by slice"))
METHODS = ("seg-hires-grad-cam", "seg-grad-cam")


@dataclass(frozen=True)
class DemoOutput:
    """One model and method: the heatmap file and its pictures."""

    model: str
    method: str
    heatmap: Path
    pictures: tuple[Path, ...]
    seconds: float
    device: str
    share_in_roi: float | None  # share of the heatmap's total inside the region (None without a region)
    layer: str
    focus_ras: tuple[float, float, float]  # where the pictures' slices cross


def central_block(volume: Volume, size: int) -> Volume:
    """The central ``size``-voxel cube of a volume (or less along short axes), geometry kept exact."""
    if size < 1:
        raise InputError(f"the demo size must be a positive number of voxels, got {size}")
    starts = [max((n - size) // 2, 0) for n in volume.spatial_shape]  # K, J, I
    block = tuple(slice(s, s + min(size, n)) for s, n in zip(starts, volume.spatial_shape))
    shift = np.eye(4)
    shift[:3, 3] = starts[::-1]  # voxel (i, j, k) of the block is (i + i0, j + j0, k + k0) of the volume
    return Volume(np.ascontiguousarray(volume.array[(..., *block)]), volume.ijk_to_ras @ shift)


def share_inside(heat: np.ndarray, roi: np.ndarray | None) -> float | None:
    """Share of a heatmap's total that lies inside the region (1 = all of it); None without either."""
    total = float(heat.sum())
    if roi is None or total <= 0.0:
        return None
    return float(heat[roi].sum()) / total


def _demo_files(data_dir: Path, quick: bool) -> list[tuple[str, str, Path]]:
    t1 = data_dir / T1_FILE
    if not t1.is_file():
        raise InputError(
            f"the demo image {t1} is missing; reinstall SegHiResCAM, or point --data at a folder "
            "that holds the demo files"
        )
    models = [(name, label, data_dir / f"{name}.pt") for name, label in MODELS]
    models = [entry for entry in models if entry[2].is_file()]
    if not models:
        raise InputError(f"no demo model (demo_unet3d.pt, demo_unet2d.pt) found in {data_dir}; reinstall SegHiResCAM")
    return models[:1] if quick else models


def _write_inputs(data: Path, out_dir: Path, size: int | None):
    """The T1 and the white-matter region (cropped to the central block), written into ``out_dir``
    (an existing folder): ``(image, roi, image_path, roi_path)``; the region is None when the data has none."""
    from .io.images import read_image, read_mask, write_image

    image = read_image(data / T1_FILE)
    roi = read_mask(data / WHITE_MATTER_FILE, image, label=1) if (data / WHITE_MATTER_FILE).is_file() else None
    if size is not None:
        whole = image
        image = central_block(whole, size)
        if roi is not None:
            roi = central_block(Volume(roi, whole.ijk_to_ras), size).array
    image_path = write_image(image, out_dir / "mni152_t1.nrrd")
    roi_path = None
    if roi is not None:
        roi_path = write_image(Volume(roi.astype(np.uint8), image.ijk_to_ras), out_dir / "white_matter_roi.nrrd")
    return image, roi, image_path, roi_path


def run_demo(
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    size: int | None = None,
    quick: bool = False,
    device: str = "auto",
    methods: Sequence[str] = METHODS,
    layer: str | None = None,
    progress: Callable[[float, str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> str:
    """Run the demo and return the text to print (where the files are, what to look at).

    Args:
        out_dir: output folder (created; its files appear only when the whole demo succeeded).
        data_dir: folder with the T1, the white-matter mask and the models (default: bundled).
        size: explain only the central block of ``size`` voxels per axis (fast runs, tests).
        quick: the first model only.
        device: "auto", "cpu" or "cuda".
        methods: heatmap methods to compare.
        layer: the layer explained in every model; None = each model card's default.
        progress: ``progress(fraction, message)`` over the whole demo.
        warn: receives messages for the user (skipped pictures, engine warnings).

    Raises:
        InputError: demo files missing, or the output folder cannot be written (refused before any work).
    """
    from .io.outputs import staged_folder
    from .pictures import hottest_voxel, pictures_unavailable, save_explanation_picture
    from .service import run_request
    from .settings import ExplainSettings
    from .worker.protocol import ExplainRequest

    data = Path(data_dir) if data_dir is not None else DATA_DIR
    models = _demo_files(data, quick)
    warn = warn or (lambda message: None)
    inputs = {"the demo image": data / T1_FILE, "the demo region": data / WHITE_MATTER_FILE,
              **{f"the model {weights.name}": weights for _, _, weights in models}}
    # Everything is written into a folder beside out_dir and moved into place only at the end:
    # a failed or interrupted demo leaves out_dir as it was.
    with staged_folder(out_dir, inputs=inputs) as work:
        image, roi, image_path, roi_path = _write_inputs(data, work, size)
        no_pictures = pictures_unavailable()
        if no_pictures:
            warn(f"PNG pictures skipped: {no_pictures}")
        settings = ExplainSettings(target_class=WHITE_MATTER, layers=(layer,) if layer else (),
                                   methods=tuple(methods), device=device)
        outputs: list[DemoOutput] = []
        for index, (name, label, weights) in enumerate(models):

            def model_progress(fraction: float, message: str, index: int = index, label: str = label) -> None:
                if progress is not None:
                    progress((index + fraction) / len(models), f"{label}: {message}")

            # The files just written, through the service every door runs (the worker, the command line).
            request = ExplainRequest(
                images=(str(image_path),), model=str(weights), settings=settings,
                outputs=tuple(str(work / f"{name}_{method}.nrrd") for method in settings.methods),
                roi=None if roi_path is None else str(roi_path), roi_label=None if roi_path is None else 1,
            )
            result = run_request(request, progress=model_progress,
                                 warn=lambda message, label=label: warn(f"{label}: {message}"))
            # Every picture of a model cuts through the hottest voxel (in the region) of its first heatmap,
            # so the methods are compared on the same planes, where the headline method finds the evidence.
            first = next(iter(result.maps.values()))
            k, j, i = voxel = hottest_voxel(first.array, roi)
            focus = (first.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
            region = "the bundled white-matter segment" if roi is not None else "the model's own prediction"
            for method, heat in result.maps.items():
                pictures: list[Path] = []
                if not no_pictures:
                    pictures.append(save_explanation_picture(work / f"{name}_{method}.png", result, method,
                                                             model=f"{name} ({label})", region=region, voxel=voxel))
                outputs.append(DemoOutput(name, method, out_dir / result.outputs[method].name,
                                          tuple(out_dir / picture.name for picture in pictures), result.seconds,
                                          result.device, share_inside(heat.array, roi), result.settings.layers[0],
                                          tuple(float(v) for v in focus)))
    return _report(out_dir, image, roi, models, outputs, no_pictures)


def _report(out_dir, image, roi, models, outputs: list[DemoOutput], no_pictures: str | None) -> str:
    shape = "x".join(map(str, image.spatial_shape[::-1]))
    lines = [
        f"SegHiResCAM demo: white matter (class {WHITE_MATTER}) on the MNI152 T1, {shape} voxels (I x J x K), "
        f"region {'the bundled white-matter segment' if roi is not None else 'each model’s own prediction'}",
        f"written to {out_dir.resolve()}:",
        f"  {'mni152_t1.nrrd':<40}the image",
    ]
    if roi is not None:
        lines.append(f"  {'white_matter_roi.nrrd':<40}the region explained")
    timing: dict[str, tuple[float, str, str, tuple]] = {}
    for output in outputs:
        timing[output.model] = (output.seconds, output.device, output.layer, output.focus_ras)
        lines.append(f"  {output.heatmap.name:<40}{output.method} heatmap of {output.model}")
        for picture in output.pictures:
            lines.append(f"    {picture.name}")
    for name, (seconds, device, layer, focus) in timing.items():
        mine = [o.method for o in outputs if o.model == name]
        where = ", ".join(f"{axis} {value:+.0f}" for axis, value in zip("RAS", focus))
        lines.append(f"{name}: layer {layer}, {len(mine)} methods in {seconds:.1f} s on {device}; "
                     f"its pictures cut through ({where}) mm, the hottest voxel of its {mine[0]} heatmap")
    if no_pictures:
        lines.append(f"no PNG pictures: {no_pictures}")
    lines.append("What to look at:")
    shares = [o for o in outputs if o.share_in_roi is not None]
    if shares:
        lines.append("  - How much of each heatmap lies inside the white matter it explains (1.00 = all of it):")
        for output in shares:
            lines.append(f"      {output.model:<14}{output.method:<20}{output.share_in_roi:.2f}")
    lines += [
        "  - Seg-HiRes-Grad CAM multiplies gradient and activation voxel by voxel, so it shows where inside",
        "    and around the white matter the evidence for the white-matter logits is. Seg-Grad CAM gives",
        "    each channel one weight, so its heatmap follows whole feature channels and can light up grey matter,",
        "    ventricles or background that the segment does not depend on. Compare each model's PNGs side by side.",
        "  - In Slicer: load mni152_t1.nrrd, then a heatmap as the foreground volume (colour table Inferno,",
        "    opacity 0.5), or open the PNGs.",
    ]
    return "\n".join(lines)
