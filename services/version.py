"""Tandem's version: the installed package's (pyproject.toml's `version`, via its metadata), or,
in a source tree that was never installed, pyproject.toml's own line."""

from __future__ import annotations

import functools
import importlib.metadata
import re
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_VERSION_LINE = re.compile(r'^version\s*=\s*"([^"]+)"', re.MULTILINE)


@functools.cache
def tandem_version() -> str:
    """The version string, e.g. "0.1.0" ("unknown" when neither source has one)."""
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        match = _VERSION_LINE.search(_PYPROJECT.read_text())
    except OSError:
        match = None
    return match.group(1) if match else "unknown"
