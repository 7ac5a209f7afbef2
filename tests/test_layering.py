"""Import direction: services -> shared -> kernels. shared never imports grpc or generated protos;
kernels import only torch/triton (and the standard library)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n.split(".")[0] for n in names}


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("shared"), ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_does_not_import_services_grpc_or_protos(path: Path) -> None:
    assert not imported_modules(path) & {"services", "grpc", "proto", "google"}


@pytest.mark.parametrize("path", files("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_only_torch_and_triton(path: Path) -> None:
    allowed = {"torch", "triton", "kernels", "__future__", *sys.stdlib_module_names}
    assert imported_modules(path) <= allowed, path


def test_the_launcher_and_the_router_start_without_torch() -> None:
    """`tandem up` checks the model and the KV transport, and the router starts serving, before
    either imports torch or transformers (seconds of start-up each; the router loads its
    tokenizer on a thread: services/router/tokenizer.py)."""
    code = (
        "import sys, services.launcher, services.router.__main__\n"
        "from shared.models.registry import architecture_problem\n"
        "from shared.transfer import nixl_available\n"
        "nixl_available()\n"
        "assert architecture_problem('LlamaForCausalLM') is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
