"""Outputs through the real command line: never an input, always checked before the work, never half-written."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import SimpleITK as sitk
from tiny_models import save_tiny_unet, write_tiny_case

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.demo_run import DATA_DIR, T1_FILE, WHITE_MATTER_FILE


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    return folder, write_tiny_case(folder, "t1.nii.gz")


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def explain_args(folder, model, out, *extra):
    return ["explain", "--image", folder / "t1.nii.gz", "--model", model, "--class", "2", "--roi", folder / "roi.nrrd",
            "--out", out, "--device", "cpu", *extra]


def refused(argv, capsys) -> str:
    """Run the command line; it must fail with exit 1 and exactly one error line, which is returned."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("seghirescam: error: "), captured.err
    assert captured.out == ""
    return lines[0]


def inputs_unchanged(folder, model, before: dict) -> None:
    after = {name: digest(path) for name, path in input_files(folder, model).items()}
    assert after == before


def input_files(folder, model) -> dict:
    return {"image": folder / "t1.nii.gz", "roi": folder / "roi.nrrd", "model": model,
            "card": model.with_suffix(".json")}


@pytest.mark.parametrize("which", ["image", "roi", "model"])
def test_output_that_is_an_input_is_refused_and_the_input_is_untouched(files, capsys, which):
    # Before: --out t1.nii.gz overwrote the image with its own heatmap, exit 0.
    folder, model = files
    before = {name: digest(path) for name, path in input_files(folder, model).items()}
    target = input_files(folder, model)[which]
    line = refused(explain_args(folder, model, target), capsys)
    role = {"image": "the image", "roi": "the region file", "model": "the model"}[which]
    assert f"is {role} {target}" in line and "choose another file name" in line
    inputs_unchanged(folder, model, before)
    assert not list(folder.glob(".*partial*"))


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_output_that_is_a_link_to_the_image_is_refused(files, capsys, tmp_path, link):
    folder, model = files
    before = {name: digest(path) for name, path in input_files(folder, model).items()}
    alias = tmp_path / "heat.nii.gz"
    (os.symlink if link == "symbolic" else os.link)(folder / "t1.nii.gz", alias)
    line = refused(explain_args(folder, model, alias), capsys)
    assert "is the image" in line
    inputs_unchanged(folder, model, before)


def test_output_inside_a_model_folder_is_refused(files, capsys, tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    from model_kinds import nnunet_network, write_nnunet_folder

    folder, _ = files
    results = write_nnunet_folder(tmp_path / "nnunet", nnunet_network())
    listing = sorted(p.relative_to(results) for p in results.rglob("*"))
    line = refused(["explain", "--image", folder / "t1.nii.gz", "--model", results, "--class", "1",
                    "--out", results / "fold_0" / "heat.nrrd"], capsys)
    assert f"lies inside the model folder {results}" in line
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == listing  # nothing added


def test_png_that_is_not_png_is_refused_before_the_work(files, capsys, tmp_path):
    # Before: --png x.jpg wrote PNG bytes into a .jpg file, exit 0.
    folder, model = files
    line = refused(explain_args(folder, model, tmp_path / "heat.nrrd", "--png", tmp_path / "x.jpg"), capsys)
    assert "only .png files can be written" in line
    assert list(tmp_path.iterdir()) == []  # not even the heatmap: refused before the work


def test_png_that_is_the_image_is_refused(files, capsys, tmp_path):
    folder, model = files
    before = {name: digest(path) for name, path in input_files(folder, model).items()}
    picture = tmp_path / "overlay.png"
    os.link(folder / "t1.nii.gz", picture)  # another name of the image's file
    line = refused(explain_args(folder, model, tmp_path / "heat.nrrd", "--png", picture), capsys)
    assert "the picture file" in line and "is the image" in line
    inputs_unchanged(folder, model, before)
    assert not (tmp_path / "heat.nrrd").exists()


@pytest.mark.parametrize("option", ["--out", "--png"])
def test_unwritable_output_folder_is_refused_before_the_model_loads(files, capsys, tmp_path, unwritable_folder, option):
    # Before: an unwritable --out failed after the whole computation ("use a .nrrd or .nii.gz file name"),
    # and an unwritable --png printed a raw VTK error after the heatmap was written.
    folder, _ = files
    broken = tmp_path / "broken.pt"  # a model that cannot load: reaching the loader would be a different error
    broken.write_bytes(b"not a model")
    shutil.copy(folder / "tiny3d.json", tmp_path / "broken.json")
    heat = tmp_path / "heat.nrrd"
    target = {"--out": unwritable_folder / "heat.nrrd", "--png": unwritable_folder / "overlay.png"}[option]
    argv = explain_args(folder, broken, target if option == "--out" else heat)
    if option == "--png":
        argv += ["--png", target]
    line = refused(argv, capsys)
    assert f"the folder {unwritable_folder} is not writable" in line and "choose a folder you can write to" in line
    assert not heat.exists() and not target.exists()


def test_output_folder_that_is_missing_or_a_file_is_refused(files, capsys, tmp_path):
    folder, model = files
    line = refused(explain_args(folder, model, tmp_path / "no" / "heat.nrrd"), capsys)
    assert f"the folder {tmp_path / 'no'} does not exist" in line
    (tmp_path / "a.nrrd").mkdir()
    assert "it is a folder" in refused(explain_args(folder, model, tmp_path / "a.nrrd"), capsys)


def test_missing_region_file_is_named_as_the_region(files, capsys, tmp_path):
    # Before: "the image .../absent.nrrd does not exist", about the file given with --roi.
    folder, model = files
    argv = explain_args(folder, model, tmp_path / "heat.nrrd")
    argv[argv.index("--roi") + 1] = tmp_path / "absent.nrrd"
    assert f"the region file {tmp_path / 'absent.nrrd'} does not exist" in refused(argv, capsys)


def test_region_outside_the_image_is_refused_not_explained_as_zeros(files, capsys, tmp_path):
    # Before: exit 0, an all-zero heatmap, and a warning.
    folder, model = files
    far = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    far.SetOrigin((500.0, 500.0, 500.0))
    far[1, 1, 1] = 1
    sitk.WriteImage(far, str(tmp_path / "far.nrrd"))
    argv = explain_args(folder, model, tmp_path / "heat.nrrd")
    argv[argv.index("--roi") + 1] = tmp_path / "far.nrrd"
    assert "covers no voxel of the image" in refused(argv, capsys)
    assert not (tmp_path / "heat.nrrd").exists()


# --- the demo writes everything or nothing ------------------------------------------------------------


@pytest.fixture
def demo_data(tmp_path):
    """The demo's T1 and region, a working 3D model, and a 2D model file that cannot load (the second to run)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in (T1_FILE, WHITE_MATTER_FILE):
        shutil.copy(DATA_DIR / name, data / name)
    card = dict(spacing=(2.0, 2.0, 2.0), orientation="RAS", intensity={"scheme": "zscore"})
    save_tiny_unet(data, "demo_unet3d", **card)
    save_tiny_unet(data, "demo_unet2d", spatial_dims=2, channels=(4, 8, 16), **card)
    return data


def demo_leftovers(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("data",))


def test_failed_demo_leaves_no_output_folder_and_no_half_written_files(demo_data, capsys, tmp_path):
    # Before: the 3D model's heatmaps, the T1 and the region were left in the output folder.
    (demo_data / "demo_unet2d.pt").write_bytes(b"truncated download")
    line = refused(["demo", "--data", demo_data, "--out", tmp_path / "demo-out", "--size", "16", "--device", "cpu"],
                   capsys)
    assert "demo_unet2d.pt" in line
    assert demo_leftovers(tmp_path) == []  # no demo-out, no staging folder beside it


def test_failed_demo_leaves_an_existing_output_folder_as_it_was(demo_data, capsys, tmp_path):
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "mni152_t1.nrrd").write_bytes(b"an older run's file")
    (demo_data / "demo_unet2d.pt").write_bytes(b"truncated download")
    refused(["demo", "--data", demo_data, "--out", out, "--size", "16", "--device", "cpu"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["mni152_t1.nrrd"]
    assert (out / "mni152_t1.nrrd").read_bytes() == b"an older run's file"
    assert demo_leftovers(tmp_path) == ["demo-out"]


def test_interrupted_demo_leaves_nothing(demo_data, tmp_path):
    from SegHiResCAMLib.demo_run import run_demo

    def interrupt_in_the_second_model(fraction: float, message: str) -> None:
        if fraction > 0.6:  # the first model's files are written by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "demo-out", data_dir=demo_data, size=16, device="cpu",
                 progress=interrupt_in_the_second_model)
    assert demo_leftovers(tmp_path) == []


def test_demo_into_an_unwritable_folder_is_refused_before_the_work(demo_data, capsys, unwritable_folder):
    line = refused(["demo", "--data", demo_data, "--out", unwritable_folder / "demo-out", "--quick"], capsys)
    assert "is not writable" in line
