"""What a file picked as the model is, read from its first bytes, and reading its weights safely.

A user may pick the wrong file (the image, a text file, an archive) or a file that was cut
short while copying. Each is refused with what it is and what to do, before any loader runs;
``torch.load`` errors are told apart by their type, and a pickle that torch refuses is checked
with ``pickletools`` (which only parses, never runs anything): intact means it holds Python
objects besides tensors, broken means the file is damaged.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import pickle
import pickletools
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelError, UnsafeModelError

# torch.save's legacy (pre-1.6) format starts with a pickled magic number; five pickles precede its raw storages.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_LEGACY_PICKLES = 5
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_IMAGE_ADVICE = ("choose it as the image, and as the model a .pt/.pth/.ts file (or a MONAI bundle or nnU-Net "
                 "results folder)")


def model_file_kind(path: Path) -> str:
    """``"torchscript"``, ``"torch-zip"`` (``torch.save``) or ``"pickle"`` (legacy ``torch.save`` or plain pickle).

    Raises:
        ModelError: the file is empty, damaged, or something else (an image, text, another archive).
    """
    head = _head(path)
    if head.startswith(_ZIP_MAGIC):
        return _zip_kind(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    raise ModelError(f"{path.name} {_what_else(path, head)}")


def check_export_archive_bytes(path: Path) -> None:
    """Refuse a file given as a ``torch.export`` archive (``.pt2``) that is empty, damaged or another
    kind of file, saying what it is (the archive's contents are checked by ``exported_archive``).

    Raises:
        ModelError: the file is empty, not a zip archive (an image, text, random bytes) or a cut-short one.
    """
    head = _head(path)
    if not head.startswith(_ZIP_MAGIC):
        raise ModelError(f"{path.name} {_what_else(path, head, export_archive=True)}")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path.name} is a damaged or incomplete archive (its end is missing, e.g. a copy or "
                         "download that stopped early); copy or save it again")


def _head(path: Path) -> bytes:
    """The file's first bytes; an unreadable or empty file is refused."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(512)
    except OSError as error:
        raise ModelError(f"cannot read the model file {path}: {error.strerror or error}") from error
    if not head:
        raise ModelError(f"the model file {path.name} is empty (0 bytes), so it was not saved or copied completely; "
                         "save or copy it again")
    return head


def _zip_kind(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path.name} is a damaged or incomplete archive (it starts like a PyTorch file but its end "
                         "is missing, e.g. a copy or download that stopped early); copy or save it again")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelError(f"{path.name} is a damaged archive ({error}); copy or save it again") from error
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch-zip"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    files = f"{len(names)} file{'s' if len(names) != 1 else ''}"
    raise ModelError(f"{path.name} is a zip archive ({files}: {shown}), not a PyTorch model; unpack it and choose the "
                     "model file or folder inside")


def _what_else(path: Path, head: bytes, export_archive: bool = False) -> str:
    """What a file that is no PyTorch file is, as the rest of a sentence (``export_archive``: it was
    given as a ``.pt2``)."""
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as stream:
                inner = stream.read(352)
        except (OSError, EOFError):
            inner = b""
        if _is_nifti(inner):
            return f"is a NIfTI image, not a model; {_IMAGE_ADVICE}"
        return "is a gzip-compressed file, not a model; choose the saved model file (.pt, .pth, .ts)"
    if _is_nifti(head):
        return f"is a NIfTI image, not a model; {_IMAGE_ADVICE}"
    if head.startswith(b"NRRD"):
        return f"is an NRRD image, not a model; {_IMAGE_ADVICE}"
    if head[128:132] == b"DICM":
        return f"is a DICOM image, not a model; {_IMAGE_ADVICE}"
    if head.startswith(b"\x89HDF"):
        return ("is an HDF5 file (Keras/TensorFlow weights, for example), not a PyTorch model; export the network to "
                "PyTorch or TorchScript")
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return f"is a MetaImage image (.mha/.mhd), not a model; {_IMAGE_ADVICE}"
    text = _as_text(head)
    if text is not None:
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        wanted, writer = (("a torch.export archive", "torch.export.save") if export_archive
                          else ("a model", "torch.save or torch.jit.save"))
        return f"is a text file (it starts with {first!r}), not {wanted}; choose the file written by {writer}"
    if export_archive:
        return "is not a file PyTorch wrote (not a torch.export archive); choose the file written by torch.export.save"
    return ("is not a file PyTorch wrote (neither a TorchScript archive nor a torch.save file); choose the file "
            "written by torch.save(model.state_dict(), path) or torch.jit.save")


def _is_nifti(header: bytes) -> bool:
    sizes = (int.from_bytes(header[:4], "little"), int.from_bytes(header[:4], "big"))
    return len(header) >= 348 and 348 in sizes and header[344:347] in (b"n+1", b"ni1")


def _as_text(head: bytes) -> str | None:
    """The first bytes as text, if they are printable UTF-8 (the read may end inside a character)."""
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text if all(c.isprintable() or c in "\r\n\t" for c in text) else None
    return None


def load_weights(path: Path, unsafe_advice: str, safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` of a file :func:`model_file_kind` accepted.

    Raises:
        UnsafeModelError: the file holds Python objects beside tensors (loading them could run code);
            ``unsafe_advice`` says how to save only the weights.
        ModelError: the file is damaged or cut short.
    """
    import torch

    allowed = torch.serialization.safe_globals(list(safe_globals)) if safe_globals else contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if _pickles_parse(path):
            raise UnsafeModelError(f"{path.name} holds pickled Python objects, not just weights; loading it would "
                                   f"run arbitrary code. {unsafe_advice}") from error
        raise ModelError(_damaged(path)) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:  # torch's zip reader, cut-short storages
        raise ModelError(_damaged(path)) from error


def _damaged(path: Path) -> str:
    return (f"{path.name} is damaged or cut short (PyTorch cannot read it to the end); copy or save it again, "
            "e.g. with torch.save(model.state_dict(), path)")


def _pickles_parse(path: Path) -> bool:
    """True when the file's pickle stream(s) parse to the end: torch refused their content, not their form."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                streams, count = io.BytesIO(archive.read(member)), 1
        else:
            streams = open(path, "rb")
            count = _LEGACY_PICKLES if streams.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC else 1
            streams.seek(0)
        with streams:
            for _ in range(count):
                for _ in pickletools.genops(streams):
                    pass
    except (ValueError, StopIteration, zipfile.BadZipFile, OSError, EOFError):
        return False
    return True
