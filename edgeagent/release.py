"""Which offline release this installation of edgeagent belongs to (docs/release.md).

A release's installer puts each release in `/opt/edgeagent/releases/<version>/`: its virtualenv
in `venv/` and, written last, `release.json` (what `release/build.py` recorded: the release's
version, flavor, commit). The `edgeagent` running from that venv finds it beside its prefix.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeagent import __version__


@dataclass(frozen=True)
class Release:
    version: str
    flavor: str
    commit: str
    directory: Path


def installed_release(prefix: Path | None = None) -> Release | None:
    """The release whose venv is `prefix` (default: this interpreter's), or None when this
    installation is not one (a checkout, a venv made by hand, a package) or its metadata is
    unreadable."""
    directory = (prefix or Path(sys.prefix)).resolve().parent
    try:
        metadata = json.loads((directory / "release.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict):
        return None
    fields = [metadata.get(key) for key in ("version", "flavor", "commit")]
    if not all(isinstance(value, str) for value in fields):
        return None
    version, flavor, commit = (str(value) for value in fields)
    return Release(version, flavor, commit, directory)


def describe(release: Release | None) -> str:
    """One line: the package's version and the release it was installed from."""
    if release is None:
        return f"edgeagent {__version__} (not installed from a release)"
    return (
        f"edgeagent {__version__} (release {release.version}, {release.flavor}, "
        f"commit {release.commit[:12]}, {release.directory})"
    )
