"""Check every output before the work, and write folders of outputs all at once.

An output is refused, before any model is loaded, when its folder does not exist or cannot
be written (``os.access`` and a real probe file, since ``os.access`` says yes to root on a
read-only place), when its file type cannot be written, when it is a folder, or when it
resolves to an input: the same file by path, symbolic link or hard link, or any place inside
an input folder (a model bundle, an nnU-Net results folder, a DICOM series folder).
:func:`staged_folder` writes a folder of outputs (the demo's) beside the target and moves it
into place only when everything was written, so a failed or interrupted run leaves nothing
half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ..errors import InputError

# Formats a heatmap can be written in (SimpleITK picks the writer from the name).
WRITABLE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png",)

Inputs = Mapping[str, "str | os.PathLike[str] | None"]  # role ("the image") -> path of a file or folder


def _files_of(path: Path) -> Iterator[Path]:
    """The file itself, or every file under a folder."""
    if path.is_dir():
        for folder, _, names in os.walk(path):
            for name in names:
                yield Path(folder) / name
    elif path.exists():
        yield path


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode (hard links, symbolic links) or the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the resolved paths can tell
        return a.resolve() == b.resolve()


def _input_clash(target: Path, inputs: Inputs | None) -> str | None:
    """How writing ``target`` would touch an input ("is the image x.nrrd"), or None."""
    resolved = target.resolve()
    for role, given in (inputs or {}).items():
        if not given:
            continue
        source = Path(given)
        if source.is_dir():
            folder = source.resolve()
            if resolved == folder or folder in resolved.parents:
                return f"lies inside {role} folder {source}"
            if any(_same_file(target, path) for path in _files_of(source)):  # a hard link from elsewhere
                return f"is a file of {role} folder {source}"
        elif _same_file(target, source):
            return f"is {role} {source}"
    return None


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse a folder that does not exist or where no file can be created (a real probe, also as root).

    Raises:
        InputError: the folder is missing, is not a folder, or cannot be written.
    """
    if not folder.exists():
        raise InputError(f"cannot write {what}: the folder {folder} does not exist; create it or choose another")
    if not folder.is_dir():
        raise InputError(f"cannot write {what}: {folder} is a file, not a folder; choose another place")
    reason = None if os.access(folder, os.W_OK | os.X_OK) else "permission denied"
    if reason is None:
        try:  # os.access says yes to root even where writing fails (read-only mounts, /sys)
            handle, probe = tempfile.mkstemp(prefix=".seghirescam-probe-", dir=folder)
        except OSError as error:
            reason = (error.strerror or str(error)).lower()
        else:
            os.close(handle)
            os.unlink(probe)
    if reason is not None:
        raise InputError(
            f"cannot write {what}: the folder {folder} is not writable ({reason}); choose a folder you can write to"
        )


def check_output_file(
    path: str | os.PathLike[str],
    *,
    inputs: Inputs | None = None,
    suffixes: Sequence[str] = WRITABLE_SUFFIXES,
    kind: str = "heatmap",
) -> Path:
    """Refuse an output file before the work (see the module docstring); return its path.

    Args:
        path: the file to be written.
        inputs: role -> path of every input ({"the image": ..., "the model": ...}), files or folders.
        suffixes: the file types that can be written (lower case, with the dot).
        kind: what the file holds, for messages ("heatmap", "picture").

    Raises:
        InputError: a path that resolves to an input, an unknown file type, a path that is a
            folder, or a folder that is missing or not writable.
    """
    target = Path(path)
    clash = _input_clash(target, inputs)
    if clash is not None:
        raise InputError(
            f"the {kind} file {target} {clash}; writing it would change an input, so choose another file name"
        )
    if not target.name.lower().endswith(tuple(suffixes)):
        kinds = ", ".join(suffixes)
        raise InputError(
            f"cannot write the {kind} {target}: the file type is unknown; use one of {kinds}" if len(suffixes) > 1
            else f"cannot write the {kind} {target}: only {kinds} files can be written; give a name ending in {kinds}"
        )
    if target.is_dir():
        raise InputError(f"cannot write the {kind} {target}: it is a folder; give a file name inside it")
    check_writable_folder(target.parent, f"the {kind} {target}")
    return target


def check_output_path(path: str | os.PathLike[str], inputs: Inputs | None = None) -> Path:
    """Check a heatmap file name before a long computation (:func:`check_output_file` for heatmaps)."""
    return check_output_file(path, inputs=inputs)


def check_distinct_outputs(paths: Sequence[str | os.PathLike[str] | None]) -> None:
    """Refuse two outputs of one run that name the same file (one would overwrite the other)."""
    given = [Path(p) for p in paths if p]
    for index, first in enumerate(given):
        for second in given[index + 1:]:
            if _same_file(first, second):
                raise InputError(f"{first} and {second} are the same file; give each output its own name")


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str], *, inputs: Inputs | None = None) -> Iterator[Path]:
    """A temporary folder beside ``target`` whose files move into ``target`` when the block succeeds.

    The temporary folder is made at once, inside the nearest existing folder on the way to
    ``target``, so an unwritable place is refused before the work. When the block ends
    normally, ``target`` (and missing parents) is created and each file is moved in, each move
    atomic, replacing files of the same name; when it raises or is interrupted, the temporary
    folder is removed and ``target`` is left as it was (not even created).

    Raises:
        InputError: ``target`` is a file, lies inside an input folder, or cannot be written;
            or a file to move in would replace an input (checked before anything moves).
    """
    final = Path(target)
    if final.exists() and not final.is_dir():
        raise InputError(f"cannot write into {final}: it is a file, not a folder; choose another output folder")
    clash = _input_clash(final / "output", inputs)
    if clash is not None:
        raise InputError(f"the output folder {final} {clash}; choose another folder")
    if final.exists():
        check_writable_folder(final, f"into {final}")
    anchor = final.absolute().parent
    while not anchor.exists():
        anchor = anchor.parent
    check_writable_folder(anchor, f"into {final}")
    work = Path(tempfile.mkdtemp(prefix=f".{final.name or 'output'}.partial-", dir=anchor))
    try:
        yield work
        moves = [(path, final / path.relative_to(work)) for path in sorted(work.rglob("*")) if path.is_file()]
        for _, destination in moves:
            clash = _input_clash(destination, inputs)
            if clash is not None:
                raise InputError(f"the output {destination} {clash}; nothing was written, choose another folder")
        for path, destination in moves:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(destination))  # a rename (atomic) unless target is on another disk
    finally:
        shutil.rmtree(work, ignore_errors=True)
