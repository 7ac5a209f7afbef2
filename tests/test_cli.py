"""The `tandem` command line without starting anything: --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.version import tandem_version

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_pyprojects() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{tandem_version()}"\n' in pyproject


def test_tandem_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"tandem {tandem_version()}"
