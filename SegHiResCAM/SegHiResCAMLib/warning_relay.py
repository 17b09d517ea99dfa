"""Send SegHiResCAM's own warnings to the user, and only those.

The worker and the command line run the library inside :func:`relayed_warnings`: every
warning of category :class:`~SegHiResCAMLib.errors.SegHiResCAMWarning` reaches the user once
(as a worker event or a ``seghirescam: warning:`` line); what numpy, torch or another library
warns about goes to this module's logger at debug level, which the command line prints with
``--debug`` and which is otherwise silent. A torch deprecation notice is not SegHiResCAM's word
to a radiologist.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

from .errors import SegHiResCAMWarning, one_line

logger = logging.getLogger(__name__)


def distinct(send: Callable[[str], None]) -> Callable[[str], None]:
    """``send`` wrapped to pass each distinct message once (the engine may both warn and report)."""
    sent: set[str] = set()

    def relay(message: str) -> None:
        text = one_line(message)
        if text not in sent:
            sent.add(text)
            send(text)

    return relay


@contextlib.contextmanager
def relayed_warnings(send: Callable[[str], None]) -> Iterator[None]:
    """Within the block, pass SegHiResCAM's warnings to ``send``; log every other warning at debug level.

    Args:
        send: receives each message (wrap it with :func:`distinct` to drop repeats).
    """

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SegHiResCAMWarning):
            send(str(message))
        else:
            logger.debug("%s from %s:%s: %s", category.__name__, filename, lineno, one_line(message))

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every occurrence reaches show(); the caller drops repeats
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def debug_log_to(stream, prefix: str = "debug") -> Iterator[None]:
    """Within the block, print the library's debug log (other libraries' warnings included) on ``stream``."""
    package = logging.getLogger(__name__.rpartition(".")[0] or __name__)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(name)s: %(message)s"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
