"""The report's 3D view in a real headless browser (Debian's chromium, Playwright): it draws the
volume and an overlay, switching overlays changes the pixels, and the page logs no error.

CI installs chromium and playwright (scripts/test.sh); elsewhere the test is skipped when they are
missing, and fails instead when CI is set (.ci/run sets it), so CI cannot pass without running it.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest

from SegHiResCAMLib.evaluation.viewer import ASSETS, NIIVUE, show, viewer_data, viewer_section
from SegHiResCAMLib.volume import Volume
from tolerances import EPS32

CHROMIUM = os.environ.get("SEGHIRESCAM_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--enable-unsafe-swiftshader"]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not os.path.exists(CHROMIUM):
        reason = "needs playwright and chromium (apt-get install chromium; pip install playwright)"
        if os.environ.get("CI"):  # .ci/run sets it: CI must run this test, never skip it
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return sync_playwright


def _case():
    shape = (40, 48, 44)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    head = ((k - 20) ** 2 / 300 + (j - 24) ** 2 / 400 + (i - 22) ** 2 / 350) < 1
    image = Volume((head * 100.0 + 10.0 * np.sin(i / 3.0) + 20.0).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    first = np.exp(-((k - 20) ** 2 + (j - 24) ** 2 + (i - 16) ** 2) / 30.0)
    second = np.exp(-((k - 20) ** 2 + (j - 24) ** 2 + (i - 30) ** 2) / 30.0)
    region = first > 0.5
    return image, {"first map": first, "second map": second}, region


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.int16)


def _warm(pixels: np.ndarray) -> int:
    """Pixels in the inferno map's red-orange-yellow hues (which neither grey nor cyan nor blue reach) in the
    slice views: the top 70% of the canvas, above NiiVue's colour bar."""
    views = pixels[: int(0.7 * pixels.shape[0])]
    r, g, b = views[..., 0], views[..., 1], views[..., 2]
    return int(np.sum((r > g + 40) & (r > b + 40)))


def _open(page_path, sync_playwright):
    messages: list[tuple[str, str]] = []
    shots = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("console", lambda message: messages.append((message.type, message.text)))
            page.on("pageerror", lambda error: messages.append(("pageerror", str(error))))
            page.goto(page_path.as_uri())
            page.evaluate("window.seghirescamViewer.ready")
            canvas = page.locator("#seghirescam-viewer-canvas")
            for index, label in enumerate(("first", "second", "region")):
                page.evaluate(f"window.seghirescamViewer.show({index})")
                page.wait_for_timeout(300)
                shots[label] = _pixels(canvas.screenshot())
            status = page.inner_text("#seghirescam-viewer-status")
        finally:
            browser.close()
    return shots, messages, status


def test_viewer_draws_volume_and_overlay_switches_and_logs_no_error(tmp_path):
    sync_playwright = _browser_or_skip()
    image, maps, region = _case()
    page = tmp_path / "view.html"
    section = viewer_section(viewer_data(image, maps, region, crosshair_ras=(32.0, 48.0, 40.0)), script_src=NIIVUE)
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{section}</body></html>")
    shutil.copy(ASSETS / NIIVUE, tmp_path / NIIVUE)
    shots, messages, status = _open(page, sync_playwright)
    errors = [m for m in messages if m[0] in ("error", "pageerror")]
    assert not errors, errors
    assert status == "showing region (mask)"
    first, second, mask_only = shots["first"], shots["second"], shots["region"]
    # The volume is drawn: a good share of the canvas is lit, with many grey levels.
    lit = np.mean(first.sum(axis=2) > 60)
    assert lit > 0.05 and len(np.unique(first[..., 0])) > 20
    # The overlay is drawn: warm pixels that the mask-only view (blue map, blue colour bar) lacks.
    assert _warm(mask_only) == 0 and _warm(first) > 500
    # Switching overlays changes the pixels.
    assert np.mean(np.any(first != second, axis=2)) > 0.002


def test_notebook_page_is_self_contained_and_works_from_the_file_system(tmp_path):
    sync_playwright = _browser_or_skip()
    image, maps, region = _case()
    saved = show(image, maps, region=region, title="notebook view").save(tmp_path / "inline.html")
    html_text = saved.read_text(encoding="utf-8")
    assert "<script src=" not in html_text  # self-contained: the bundle is inlined
    shots, messages, status = _open(saved, sync_playwright)
    assert not [m for m in messages if m[0] in ("error", "pageerror")]
    assert _warm(shots["region"]) == 0 and _warm(shots["first"]) > 500


def test_notebook_repr_is_an_iframe_holding_the_page():
    image, maps, region = _case()
    viewer = show(image, maps["first map"])
    markup = viewer._repr_html_()
    assert markup.startswith("<iframe srcdoc=") and "seghirescam-viewer-data" in markup
    assert "&lt;script" in markup and "<script" not in markup.split("srcdoc=")[1].split('"')[1]


def test_embedded_nifti_reads_back_with_nibabel_on_an_oblique_grid(tmp_path):
    import nibabel

    from SegHiResCAMLib.evaluation.viewer import nifti_bytes

    rng = np.random.default_rng(2)
    values = rng.random((5, 6, 7))
    angle = np.deg2rad(35.0)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[-4.0, 0, 0], [0, -4 * np.cos(angle), -5 * np.sin(angle)],
                               [0, -4 * np.sin(angle), 5 * np.cos(angle)]])
    matrix[:3, 3] = [118.8, 132.2, 22.8]
    for kind, data, tolerance in (("map", values, 0.5 / 255), ("image", values * 3000 - 200, 3200 / 65535)):
        path = tmp_path / f"{kind}.nii.gz"
        path.write_bytes(nifti_bytes(data, matrix, kind=kind))
        image = nibabel.load(path)
        # NIfTI's header fields are float32; the voxels are quantised (half a step, ``tolerance``) and scaled
        # back by a float32 slope and intercept (two roundings of the largest value)
        np.testing.assert_allclose(image.affine, matrix, rtol=0, atol=16 * EPS32 * np.abs(matrix).max())
        np.testing.assert_allclose(image.get_fdata(), np.transpose(data, (2, 1, 0)), rtol=0,
                                   atol=tolerance + 2 * EPS32 * np.abs(data).max())
