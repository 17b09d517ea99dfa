"""Whether an installed package meets a version requirement, read from its metadata (never imported).

The Slicer panel checks torch this way: importing torch to read its version takes seconds,
and a broken install may not import at all. ``packaging`` comes with Slicer's Python (5.8 and
later) and with pip-installed environments.
"""

from __future__ import annotations

import importlib.metadata


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (e.g. "torch"), or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_satisfies(version: str, requirement: str) -> bool:
    """True when ``version`` meets ``requirement`` (PEP 440 specifiers such as ">=2.1" or ">=2.1,<3").

    Local build labels ("2.1.2+cu121") are accepted as their release; development and
    pre-releases of a later version ("2.6.0.dev20241001") count as that version, as
    PyTorch's nightly builds should.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return SpecifierSet(requirement).contains(parsed, prereleases=True)


def unmet_requirement(distribution: str, requirement: str) -> str | None:
    """The installed version of ``distribution`` when it is installed but does not meet ``requirement``; else None."""
    version = installed_version(distribution)
    if version is None or version_satisfies(version, requirement):
        return None
    return version
