"""Run by every Python process of a suite started with `bench.device_model.env()` (this folder
first on PYTHONPATH): once `shared.engine_core` is imported (the engine process), its
`EngineCore.step` is stretched to the device model in TANDEM_BENCH_DEVICE_MODEL. Other processes
(gateway, router, the worker's front) never import it and are left as they are. A bench tool:
see bench/device_model.py."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

_TARGET = "shared.engine_core"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module with the other finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            from bench.device_model import ENV, StepModel, patch_engine_core

            patch_engine_core(module, StepModel.parse(os.environ[ENV]))

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if os.environ.get("TANDEM_BENCH_DEVICE_MODEL"):
    sys.meta_path.insert(0, _PatchOnImport())
