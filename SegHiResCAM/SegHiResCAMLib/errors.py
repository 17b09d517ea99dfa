"""One exception family, and one warning category, for everything SegHiResCAM reports to a user.

Every message says what is wrong with the value received and what to do about it,
in words a radiologist can act on. The subclasses also derive from the matching
built-in exception, so ``except ValueError`` (``OSError``, ``RuntimeError``, ...) in
user code keeps working.
"""

from __future__ import annotations


class SegHiResCAMError(Exception):
    """Base class of every error SegHiResCAM raises on purpose."""


class InputError(SegHiResCAMError, ValueError):
    """An input (image, region, class, option) cannot be used as given."""


class NotEnoughMemoryError(InputError):
    """The explanation's estimated peak memory does not fit the device: refused before the work."""


class LayerError(SegHiResCAMError, KeyError):
    """The chosen layer does not exist or its output cannot be explained."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelError(SegHiResCAMError, ValueError):
    """A model file cannot be loaded, or the model's output is not a segmentation."""


class UnsafeModelError(ModelError):
    """A model file would need full unpickling (arbitrary code) to load."""


class MissingDependencyError(SegHiResCAMError, ImportError):
    """An optional package is needed; the message names the extra to install."""


class CancelledError(SegHiResCAMError):
    """The user cancelled a running explanation."""


class StorageError(SegHiResCAMError, OSError):
    """A file could not be read or written (a volume, a picture, a temp folder)."""


class MissingFileError(StorageError, FileNotFoundError):
    """A file that should be read does not exist."""


class DisplayError(SegHiResCAMError, RuntimeError):
    """Slicer's display or rendering code could not show or draw a heatmap."""


class JobStateError(SegHiResCAMError, RuntimeError):
    """A job or worker run was used in the wrong state (started twice, used after it closed)."""


class JobTimeoutError(SegHiResCAMError, TimeoutError):
    """A job did not finish in the time given; it was cancelled."""


class InternalError(SegHiResCAMError, RuntimeError):
    """Something failed that is SegHiResCAM's fault, not the user's: a bug to report.

    Attributes:
        stage: what was being done ("loading the model"), for the one-line report.
    """

    def __init__(self, message: str, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage

    @classmethod
    def during(cls, stage: str, error: BaseException) -> InternalError:
        """The internal error for an unexpected exception raised while doing ``stage``."""
        return cls(f"internal error while {stage} ({type(error).__name__}: {one_line(error)})", stage)


def one_line(error: BaseException | str) -> str:
    """A message on one line (events and terminal errors are one line by contract)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")


def internal_error_line(error: BaseException, advice: str, stage: str = "running") -> str:
    """One line for a failure that is not the user's: that it is an internal error, what failed,
    and ``advice`` on how to report it (each door says where the details are)."""
    if not isinstance(error, InternalError):
        error = InternalError.during(stage, error)
    return f"{one_line(error)}; this is a bug in SegHiResCAM: {advice}"


class SegHiResCAMWarning(UserWarning):
    """A message for the user from SegHiResCAM itself (a resampled region, an empty map, ...).

    The worker and the command line relay warnings of this category, and only these: what
    numpy or torch warn about goes to the debug log, never to the user as SegHiResCAM's word.
    """
