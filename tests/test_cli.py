"""The command lines without starting anything: `tandem --version`, and a `--model` that is not a
local model directory (a hub id, a wrong path) refused at once with what to do, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.common.model_dir import model_dir_problem
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


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_tandem_up_with_a_hub_id_says_what_to_do(tmp_path: Path) -> None:
    out = _run("services.cli", "up", "--model", "Some/Id", "--port", "0", "--log-dir", str(tmp_path / "logs"))
    assert out.returncode != 0
    assert "Some/Id: no such directory; Tandem loads local HF directories" in out.stderr
    assert "`huggingface-cli download Some/Id --local-dir DIR`" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "logs").exists()  # refused before any service started


@pytest.mark.parametrize(
    "argv",
    [
        ("services.worker", "--model", "Some/Id"),
        ("services.prefill", "--model", "Some/Id"),
        ("services.decode", "--model", "Some/Id"),
        ("services.router", "--model", "Some/Id"),
        ("services.gateway", "--router", "127.0.0.1:1", "--tokenizer", "Some/Id"),
        ("services.cli", "demo", "--model", "Some/Id"),
    ],
)
def test_every_service_refuses_a_hub_id(argv: tuple[str, ...]) -> None:
    out = _run(*argv)
    assert out.returncode == 2, out.stderr
    assert "Some/Id: no such directory" in out.stderr and "huggingface-cli download Some/Id" in out.stderr
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr


def test_model_dir_problems(tmp_path: Path, tiny_llama: Path) -> None:
    assert model_dir_problem(str(tiny_llama)) is None
    assert "is not a model directory: it has no config.json" in str(model_dir_problem(str(tmp_path)))
    missing = str(model_dir_problem(str(tmp_path / "nope")))
    assert "no such directory" in missing and "huggingface-cli download ID --local-dir DIR" in missing
    (tmp_path / "file").write_text("")
    assert "is a file, not a directory" in str(model_dir_problem(str(tmp_path / "file")))
