"""Package attributes imported on first use (PEP 562): a package's `__init__` names what its
submodules hold without importing them, so a process that needs only its light parts (the
router's parameter checks, the launcher's registry, a worker's I/O process) never imports torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: attribute name -> the submodule holding it."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(name)

    return __getattr__
