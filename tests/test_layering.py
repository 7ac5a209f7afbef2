"""Import direction: services -> shared -> kernels. shared never imports grpc or generated protos;
kernels import only torch/triton (and the standard library)."""

from __future__ import annotations

import ast
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
