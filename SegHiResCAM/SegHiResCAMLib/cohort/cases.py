"""The cases of a cohort: read from a CSV table or a folder of images, checked before any work.

A table (``cases.csv``) has one row per case and these columns (names case-insensitive)::

    image      the image file or DICOM series folder (a path relative to the CSV is taken from the CSV's folder)
    image_2    the second input channel's image, image_3 the third, ... in the model card's channel order
    roi        a region file (label map or .seg.nrrd); empty = the settings' region kind
    roi_label  a label value or segment name in roi; empty = its only label
    case       the case id and output folder name; empty = the first image's name without its extension
    class      the class to explain in this case; empty = the command's --class

Problems of the table itself (a missing ``image`` column, an unknown column, a duplicate or unsafe
case id, an empty cell in a channel column) refuse the whole cohort before anything runs. Problems
of one case's files (missing, unreadable) are that case's failure when it runs; the others go on.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
COLUMNS = ("case", "image", "roi", "roi_label", "class")
# Names a case folder may not take: the files of the cohort folder itself.
RESERVED_IDS = frozenset({"results.csv", "cohort.json"})
# Windows refuses these as file or folder names, whatever the extension.
_WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                              *(f"lpt{i}" for i in range(1, 10))})
_CHANNEL = re.compile(r"image_(\d+)")
_SAFE_PUNCTUATION = frozenset(" ._+-")
MAX_ID_LENGTH = 128


@dataclass(frozen=True)
class Case:
    """One case of a cohort: its images and region, and the class to explain.

    Attributes:
        case_id: the case's name, unique in the cohort; its outputs go to ``<out>/<case_id>/``.
        images: image files, one per model input channel in the model card's order.
        roi: a region file, or None (the settings' region kind: by default the model's prediction).
        roi_label: the label value or segment name in ``roi``; None = its only label.
        target_class: this case's class (index or name); None = the cohort settings' class.
    """

    case_id: str
    images: tuple[str, ...]
    roi: str | None = None
    roi_label: int | str | None = None
    target_class: int | str | None = None

    def __post_init__(self) -> None:
        check_case_id(self.case_id)
        images = (self.images,) if isinstance(self.images, (str, Path)) else tuple(self.images)
        if not images or not all(isinstance(p, (str, Path)) and str(p) for p in images):
            raise InputError(f"case {self.case_id!r}: give one image file per model input channel, got {self.images!r}")
        object.__setattr__(self, "images", tuple(str(p) for p in images))
        if self.roi is not None:
            object.__setattr__(self, "roi", str(self.roi))

    def to_dict(self) -> dict[str, Any]:
        """The case as JSON (a completed case's manifest keeps it, to notice a changed row)."""
        return {"case": self.case_id, "images": list(self.images), "roi": self.roi, "roi_label": self.roi_label,
                "class": self.target_class}


def check_case_id(case_id: object) -> str:
    """A case id that is safe as a folder name on every system, or an InputError saying why not."""
    if not isinstance(case_id, str) or not case_id:
        raise InputError(f"a case id must be a non-empty name, got {case_id!r}")
    bad = sorted({c for c in case_id if not (c.isalnum() or c in _SAFE_PUNCTUATION)})
    problem = None
    if bad:
        problem = f"it contains {', '.join(repr(c) for c in bad)}"
    elif not case_id[0].isalnum():
        problem = "it must start with a letter or digit"
    elif case_id[-1] in " .":
        problem = "it must not end with a space or a dot"
    elif len(case_id) > MAX_ID_LENGTH:
        problem = f"it is longer than {MAX_ID_LENGTH} characters"
    elif case_id.lower() in RESERVED_IDS or case_id.split(".")[0].lower() in _WINDOWS_DEVICES:
        problem = "the name is reserved"
    if problem:
        raise InputError(f"the case id {case_id!r} cannot be a folder name ({problem}); use letters, digits, "
                         "spaces and . _ + - (in a cases table: the 'case' column)")
    return case_id


def image_stem(path: str | Path) -> str:
    """A file's name without its image extension (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    name = Path(path).name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)] if suffix else name


def read_cases(source: str | Path | Iterable[Case | Mapping[str, Any]]) -> tuple[Case, ...]:
    """The cases of a cohort, checked.

    Args:
        source: a CSV table (see the module's docstring), a folder of images (one case per image
            file, named after the file), or cases (:class:`Case`, or mappings with the table's columns).

    Raises:
        InputError: no case, a malformed table, or case ids that are unsafe or not unique.
    """
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            cases = cases_from_folder(path)
        elif path.is_file():
            cases = cases_from_csv(path)
        else:
            raise InputError(f"the cases {path} do not exist; give a CSV table of cases or a folder of images")
    else:
        cases = tuple(item if isinstance(item, Case) else case_from_row(item, Path.cwd(), str(index + 1))
                      for index, item in enumerate(source))
        if not cases:
            raise InputError("no case was given; give at least one")
    check_unique(cases)
    return cases


def cases_from_folder(folder: Path) -> tuple[Case, ...]:
    """One case per image file in ``folder`` (sorted by name; other files and folders are ignored)."""
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise InputError(f"the folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}); give a folder "
                         "of images, or a CSV table of cases (needed for DICOM series and several channels)")
    return tuple(Case(case_id=_default_id(path, f"{path.name} in {folder}"), images=(str(path.resolve()),))
                 for path in images)


def cases_from_csv(path: Path) -> tuple[Case, ...]:
    """The cases of a CSV table (see the module's docstring); rows without any value are ignored."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(stream)
            rows = [row for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the cases table {path} ({error}); save it as a UTF-8 CSV file") from error
    if not rows:
        raise InputError(f"the cases table {path} is empty; its first line names the columns (image, ...)")
    header = [name.strip().lower() for name in rows[0]]
    _check_columns([name for name in header if name], path)  # a trailing comma makes an unnamed column
    cases = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise InputError(f"{path.name} line {line} has {len(row)} values but the header names {len(header)} "
                             "columns; quote values that contain commas")
        values = dict(zip(header, (cell.strip() for cell in row)))
        cases.append(case_from_row(values, path.parent, f"{path.name} line {line}"))
    if not cases:
        raise InputError(f"the cases table {path} has no rows; add one row per case")
    return tuple(cases)


def case_from_row(row: Mapping[str, Any], folder: Path, where: str) -> Case:
    """A case from one row of the table (column -> value); relative paths are taken from ``folder``.

    Raises:
        InputError: naming ``where`` (the file and line) and the column at fault.
    """
    values = {str(key).strip().lower(): _cell(value) for key, value in row.items()}
    values = {key: value for key, value in values.items() if key or value is not None}
    _check_columns(list(values), where)
    channels = _channel_columns(values)
    missing = [column for column in channels if values.get(column) is None]
    if missing:
        raise InputError(f"{where}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} empty; every case "
                         "needs one image per channel column")
    images = tuple(_path(values[column], folder) for column in channels)
    roi = values.get("roi")
    case_id = values.get("case") or _default_id(Path(images[0]), where)
    try:
        return Case(case_id=str(case_id), images=images, roi=None if roi is None else _path(roi, folder),
                    roi_label=_label(values.get("roi_label")), target_class=_label(values.get("class")))
    except InputError as error:
        raise InputError(f"{where}: {error}") from error


def check_unique(cases: Iterable[Case]) -> None:
    """Refuse two cases whose ids name the same folder (also on case-insensitive file systems)."""
    seen: dict[str, str] = {}
    for case in cases:
        key = case.case_id.lower()
        if key in seen:
            same = "twice" if seen[key] == case.case_id else f"as {seen[key]!r} and {case.case_id!r}"
            raise InputError(f"the case id {case.case_id!r} occurs {same} (ids name output folders, and some file "
                             "systems ignore letter case); give each case its own id (the 'case' column)")
        seen[key] = case.case_id


def _check_columns(header: list[str], where: object) -> None:
    unknown = [name for name in header if name not in COLUMNS and not _CHANNEL.fullmatch(name)]
    if unknown:
        raise InputError(f"{where} has unknown columns {unknown}; known columns: {', '.join(COLUMNS)}, and image_2, "
                         "image_3, ... for further channels (remove or rename the others)")
    doubled = sorted({name for name in header if header.count(name) > 1})
    if doubled:
        raise InputError(f"{where} names the columns {doubled} twice")
    if "image" not in header:
        raise InputError(f"{where} has no 'image' column; name the first image column 'image'")
    numbers = sorted(int(_CHANNEL.fullmatch(name).group(1)) for name in header if _CHANNEL.fullmatch(name))
    expected = list(range(2, len(numbers) + 2))
    if numbers != expected:
        raise InputError(f"{where} has the channel columns {['image_%d' % n for n in numbers]}; number them "
                         f"without gaps from image_2 ({', '.join('image_%d' % n for n in expected)})")


def _channel_columns(values: Mapping[str, Any]) -> list[str]:
    extra = sorted((int(m.group(1)), name) for name in values for m in [_CHANNEL.fullmatch(name)] if m)
    return ["image"] + [name for _, name in extra]


def _cell(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, float) and value != value:  # NaN: an empty cell read by pandas
        return None
    return value


def _path(value: Any, folder: Path) -> str:
    path = Path(str(value)).expanduser()
    return str((path if path.is_absolute() else folder / path).resolve())


def _label(value: Any) -> int | str | None:
    """A label or class: an integer when the text is one, else a name."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # pandas reads an integer column with gaps as floats
        return int(value)
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _default_id(image: Path, where: str) -> str:
    stem = image_stem(image)
    try:
        return check_case_id(stem)
    except InputError as error:
        raise InputError(f"{where}: {error}") from error
