"""The evaluation report: ``metrics.csv`` (long format), ``report.html`` and its pictures.

Layout of the output folder:

    metrics.csv                   case, method, layer, metric, value (one row per value)
    report.html                   opens from disk: tables, pictures, curves, the 3D view
    niivue.umd.js, NIIVUE-LICENSE.txt   the 3D view's script (BSD-2)
    pictures/<case>_<layer>_<map>.png   each map over the image, three planes
    curves/<case>_<layer>.png           deletion and insertion curves
    randomisation/<case>_<layer>.png    the randomisation cascade

The folder is written under a temporary name beside it and renamed when complete, so a failed
run leaves no half-made report.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .suite import METRICS, CaseResult, EvaluationSettings
from .viewer import ASSETS, NIIVUE, viewer_data, viewer_section

REFERENCE = "seg-hires-grad-cam"


@dataclass(frozen=True)
class ReportInfo:
    """What the report's title and header say.

    Attributes:
        model: the model's name (card) and file.
        class_name: the class explained, e.g. "2 (white matter)".
        region: what the region is, e.g. "wm.nrrd, label 1" or "the model's own prediction".
        settings: the evaluation's settings (printed in the report).
        reference: the method every other one is compared with.
    """

    model: str
    class_name: str
    region: str
    settings: EvaluationSettings
    reference: str = REFERENCE


def check_output_folder(folder: str | Path) -> Path:
    """The output folder, checked before any long work: absent or empty, and its parent writable.

    Raises:
        InputError: it is a file, holds files already, or cannot be created.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InputError(f"the output {path} is a file; give a folder for the report")
    if path.is_dir() and any(path.iterdir()):
        raise InputError(f"the output folder {path} already holds files; choose a new folder or empty it, "
                         "so no earlier report is overwritten")
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=parent, prefix=f".{path.name}-check-")
    except OSError as error:
        raise InputError(f"cannot write the report to {path}: {error.strerror or error}") from error
    Path(probe).rmdir()
    return path


def metrics_csv_text(rows: Sequence[tuple[str, str, str, str, float]]) -> str:
    """The long table (case, method, layer, metric, value) as CSV text; values exact (repr), NaN stays "nan"."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["case", "method", "layer", "metric", "value"])
    for case, method, layer, metric, value in rows:
        writer.writerow([case, method, layer, metric, repr(float(value))])
    return text.getvalue()


def write_metrics_csv(path: str | Path, rows: Sequence[tuple[str, str, str, str, float]]) -> Path:
    """Write the long table (:func:`metrics_csv_text`)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(metrics_csv_text(rows))
    return Path(path)


def read_metrics_csv(path: str | Path) -> list[tuple[str, str, str, str, float]]:
    """Read a long table written by :func:`write_metrics_csv`."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [(r["case"], r["method"], r["layer"], r["metric"], float(r["value"])) for r in csv.DictReader(handle)]


def by_key(rows) -> dict[tuple[str, str, str], dict[str, float]]:
    """``(layer, method, metric) -> {case: value}``."""
    table: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for case, method, layer, metric, value in rows:
        table[(layer, method, metric)][case] = value
    return table


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "x"


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _ordered(values, first: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    leading = [v for v in dict.fromkeys(first) if v in present]
    return leading + [v for v in present if v not in leading]


def write_report(folder: str | Path, results: Sequence[CaseResult], info: ReportInfo, *,
                 picture_cases: int = 1, viewer: bool = True) -> Path:
    """Write the report folder (see the module docstring); returns the path of report.html.

    Args:
        folder: the output folder (absent or empty; see :func:`check_output_folder`).
        results: one :class:`suite.CaseResult` per case.
        info: the header's facts.
        picture_cases: draw pictures, curves and the randomisation cascade for this many cases
            (the first ones); the tables always hold every case.
        viewer: include the interactive 3D view (of the first case).
    """
    from ..pictures import picture_title, save_three_planes
    from .plots import save_curves, save_randomisation

    folder = check_output_folder(folder)
    parent = folder.resolve().parent
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder.name}-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the report from other users
        rows = [row for result in results for row in result.rows]
        write_metrics_csv(work / "metrics.csv", rows)
        figures: list[str] = []
        for result in results[:picture_cases]:
            for sub in ("pictures", "curves", "randomisation"):
                (work / sub).mkdir(exist_ok=True)
            layers = list(dict.fromkeys(layer for layer, _ in result.maps))
            for layer in layers:
                names = [method for (lay, method) in result.maps if lay == layer]
                for method in names:
                    title = picture_title(info.model, layer, method, info.class_name, info.region, result.case)
                    target = work / "pictures" / f"{_safe(result.case)}_{_safe(layer)}_{_safe(method)}.png"
                    save_three_planes(target, result.image, result.maps[(layer, method)], title=title,
                                      region=result.region)
                    figures.append(_figure(target.relative_to(work), title))
                curve_path = work / "curves" / f"{_safe(result.case)}_{_safe(layer)}.png"
                save_curves(curve_path, {m: result.curves[(layer, m)] for m in names},
                            f"{result.case} · layer {layer}: deletion and insertion ({info.settings.baseline} baseline)")
                figures.append(_figure(curve_path.relative_to(work), f"deletion and insertion curves, layer {layer}"))
                cascades = {m: result.randomisation[(layer, m)] for m in names if (layer, m) in result.randomisation}
                if cascades:
                    cascade_path = work / "randomisation" / f"{_safe(result.case)}_{_safe(layer)}.png"
                    save_randomisation(cascade_path, cascades, f"{result.case} · layer {layer}")
                    figures.append(_figure(cascade_path.relative_to(work),
                                           f"model-parameter randomisation cascade, layer {layer}"))
        section = ""
        if viewer and results:
            shutil.copy(ASSETS / NIIVUE, work / NIIVUE)
            shutil.copy(ASSETS / "NIIVUE-LICENSE.txt", work / "NIIVUE-LICENSE.txt")
            first = results[0]
            methods = [m for m in info.settings.methods]
            maps = {f"{layer} · {method}": first.maps[(layer, method)]
                    for (layer, method) in first.maps if method in methods}
            focus = None
            if maps:
                from ..pictures import hottest_voxel

                k, j, i = hottest_voxel(next(iter(maps.values())), first.region)
                focus = (first.image.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
            section = viewer_section(viewer_data(first.image, maps, first.region, crosshair_ras=focus),
                                     script_src=NIIVUE)
        page = _page([r.case for r in results], sorted({w for r in results for w in r.warnings}), rows, info,
                     figures, section)
        (work / "report.html").write_text(page, encoding="utf-8")
        if folder.exists():
            folder.rmdir()  # empty, checked above
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return folder / "report.html"


def _figure(relative: Path, caption: str) -> str:
    source = html.escape(relative.as_posix())
    return (f'<figure><a href="{source}"><img src="{source}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def cohort_page(cases: Sequence[str], warnings: Sequence[str], rows, info: ReportInfo, reports: dict[str, str],
                failed: dict[str, str]) -> str:
    """The cohort's report page: the tables across ``cases`` with paired comparisons, a link to each
    case's own report (``reports``: case -> relative path), and the cases that failed with why."""
    items = "".join(f'<li><a href="{html.escape(path)}">{html.escape(case)}</a></li>' for case, path in reports.items())
    part = f"<h2>Cases</h2><p class='small'>Each case's own report: pictures, curves, the 3D view.</p><ul>{items}</ul>"
    if failed:
        part += (f"<h3>{len(failed)} case{'s' if len(failed) != 1 else ''} failed (not in the tables)</h3><ul>"
                 + "".join(f"<li><b>{html.escape(case)}</b>: {html.escape(error)}</li>" for case, error in failed.items())
                 + "</ul>")
    return _page(cases, warnings, rows, info, [], "", part)


def _page(cases: Sequence[str], warnings: Sequence[str], rows, info: ReportInfo, figures: list[str],
          viewer_html: str, cases_html: str = "") -> str:
    """The report page: legend, per-layer tables (intervals and paired comparisons over several cases),
    per-case values, then ``cases_html`` (a cohort's cases), the 3D view, pictures and warnings."""
    from .statistics import bootstrap_mean, paired_comparison

    table = by_key(rows)
    layers = _ordered([row[2] for row in rows], [])
    methods = _ordered([row[1] for row in rows], [info.reference, *info.settings.methods])
    metrics = _ordered([row[3] for row in rows], list(METRICS))
    settings = info.settings
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>SegHiResCAM evaluation: {html.escape(info.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Which map to trust? {html.escape(info.model)}</h1>",
        f"<p><b>Class</b> {html.escape(info.class_name)} · <b>region</b> {html.escape(info.region)} · "
        f"<b>cases</b> {len(cases)} ({html.escape(', '.join(cases))}) · <b>layers</b> {html.escape(', '.join(layers))}</p>",
        f"<p class='small'>Scores recomputed through the model card's preprocessing; score "
        f"<code>{html.escape(settings.score)}</code>; deletion/insertion in {settings.steps} steps of "
        f"{settings.block}-voxel blocks with the <code>{html.escape(settings.baseline)}</code> baseline; band "
        f"{settings.band_mm:g} mm; randomisation at {settings.randomisation_points} cascade points; seed {settings.seed}. "
        "Baseline maps (random, region, blob) know nothing about the model: a metric that ranks the region map "
        "above the methods measures agreement with the region, not faithfulness.</p>",
        "<h2>How to read the metrics</h2><table><tr><th>metric</th><th>better</th><th>meaning</th></tr>",
    ]
    out += [f"<tr><td>{m}</td><td>{METRICS[m][0]}</td><td class='text'>{html.escape(METRICS[m][1])}</td></tr>"
            for m in metrics if m in METRICS]
    out.append("</table>")
    for layer in layers:
        many = len(cases) > 1
        out.append(f"<h2>Layer {html.escape(layer)}: {'mean over cases [bootstrap 95% interval]' if many else 'values'}</h2>")
        out.append("<div class='wide'><table><tr><th>method</th>" + "".join(f"<th>{m}</th>" for m in metrics) + "</tr>")
        for method in methods:
            cells = []
            for metric in metrics:
                values = list(table.get((layer, method, metric), {}).values())
                if not values:
                    cells.append("<td></td>")
                    continue
                interval = bootstrap_mean(values)
                text = _number(interval.mean)
                if many and not math.isnan(interval.low):
                    text += f" <span class='ci'>[{_number(interval.low)}, {_number(interval.high)}]</span>"
                cells.append(f"<td>{text}</td>")
            kind = " class='baseline'" if method in ("random", "region", "blob") else ""
            out.append(f"<tr{kind}><td>{html.escape(method)}</td>{''.join(cells)}</tr>")
        out.append("</table></div>")
        if many and info.reference in methods:
            out.append(f"<h3>Paired comparison with {html.escape(info.reference)} across {len(cases)} cases</h3>"
                       "<p class='small'>Mean difference (other − reference) with its bootstrap 95% interval, and "
                       f"the two-sided Wilcoxon signed-rank p-value. With {len(cases)} cases the smallest possible "
                       f"p is {2 / 2 ** len(cases):.3g}.</p>")
            out.append("<div class='wide'><table><tr><th>method</th>" + "".join(f"<th>{m}</th>" for m in metrics) + "</tr>")
            for method in methods:
                if method == info.reference:
                    continue
                cells = []
                for metric in metrics:
                    mine, theirs = table.get((layer, method, metric), {}), table.get((layer, info.reference, metric), {})
                    shared = [c for c in cases if c in mine and c in theirs]
                    if not shared:
                        cells.append("<td></td>")
                        continue
                    result = paired_comparison([mine[c] for c in shared], [theirs[c] for c in shared])
                    d = result.difference
                    cells.append(f"<td>{_number(d.mean)} <span class='ci'>[{_number(d.low)}, {_number(d.high)}] "
                                 f"p={_number(result.wilcoxon_p)}</span></td>")
                out.append(f"<tr><td>{html.escape(method)}</td>{''.join(cells)}</tr>")
            out.append("</table></div>")
    out.append("<h2>Per-case values</h2><details><summary>every value (also in metrics.csv)</summary>"
               "<div class='wide'><table><tr><th>case</th><th>layer</th><th>method</th>"
               + "".join(f"<th>{m}</th>" for m in metrics) + "</tr>")
    for case in cases:
        for layer in layers:
            for method in methods:
                cells = "".join(f"<td>{_number(table.get((layer, method, m), {}).get(case, float('nan')))}</td>"
                                for m in metrics)
                out.append(f"<tr><td>{html.escape(case)}</td><td>{html.escape(layer)}</td>"
                           f"<td>{html.escape(method)}</td>{cells}</tr>")
    out.append("</table></div></details>")
    out.append(cases_html)
    if viewer_html:
        out.append("<h2>3D view</h2><p class='small'>The first case's image with each method's map as an overlay "
                   "(choose below; drag to move the crosshair, scroll to change slices). Drawn by NiiVue "
                   "(BSD-2, see NIIVUE-LICENSE.txt), offline.</p>" + viewer_html)
    if figures:
        out.append("<h2>Pictures</h2>" + "".join(figures))
    if warnings:
        out.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    out.append("<p class='small'>SegHiResCAM evaluation report. A CAM shows where one layer's evidence for one "
               "region lies; these checks say how faithful and how specific that picture is, not whether the "
               "model is right.</p></body></html>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px 24px;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 14px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f2f2f2} td.text{text-align:left} td:first-child,th:first-child{text-align:left}
tr.baseline td{color:#666;font-style:italic}
.ci{color:#777;font-size:11px} .small{font-size:12px;color:#555} .wide{overflow-x:auto}
figure{display:inline-block;margin:6px;vertical-align:top} figure img{max-width:640px;border:1px solid #ddd}
figcaption{font-size:11px;color:#555;max-width:640px}
.seghirescam-viewer{background:#000;padding:4px;max-width:1100px}
.seghirescam-viewer .overlays,.seghirescam-viewer .status{color:#eee;font-size:13px;padding:4px}
.seghirescam-viewer .overlays label{margin-right:14px}
"""
