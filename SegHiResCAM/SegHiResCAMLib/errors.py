"""One exception family, and one warning category, for everything SegHiResCAM reports to a user.

Every message says what is wrong with the value received and what to do about it,
in words a radiologist can act on. The subclasses also derive from the matching
built-in exception, so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class SegHiResCAMError(Exception):
    """Base class of every error SegHiResCAM raises on purpose."""


class InputError(SegHiResCAMError, ValueError):
    """An input (image, ROI, class, option) cannot be used as given."""


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


class SegHiResCAMWarning(UserWarning):
    """A message for the user from SegHiResCAM itself (a resampled region, an empty map, ...).

    The worker and the command line relay warnings of this category, and only these: what
    numpy or torch warn about goes to the debug log, never to the user as SegHiResCAM's word.
    """
