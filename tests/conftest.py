"""Shared fixtures: tiny HF-format models built locally once per test session (nothing downloads)."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Every engine built in tests checks the KV invariant after every step.
os.environ.setdefault("TANDEM_DEBUG_INVARIANTS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on 2 cores with one test process per core: torch's intra-op threads only contend
# (a tiny forward goes from ~1 ms to ~20 ms when several processes each spin their own pool).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


LOADGROUP_LOST = (
    "--dist loadgroup is not in effect: this test's xdist_group did not reach pytest-xdist's "
    "scheduler, so its module would start a cluster on every worker. This pytest and pytest-xdist "
    "do not work together (pytest 9.2 with pytest-xdist 3.8); install the versions pyproject.toml pins."
)


_GROUP_LOST = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup` (`make test`) a module's `xdist_group` puts its tests on one
    worker, sharing one cluster. Where pytest-xdist's rewrite of the node id did not take, those
    tests fail at once with the reason (`pytest_runtest_setup`) instead of running ungrouped."""
    if not config.getoption("loadgroup", False) or not hasattr(config, "workerinput"):
        return
    for item in items:
        item.stash[_GROUP_LOST] = bool(item.get_closest_marker("xdist_group")) and "@" not in item.nodeid


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.stash.get(_GROUP_LOST, False):
        pytest.fail(LOADGROUP_LOST, pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _return_gpu_memory() -> Iterator[None]:
    """On a GPU, engines size their KV pool from free memory: give back what a module's engines
    cached, or the next module's engine processes find none."""
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_model_factory(arch, **overrides)` -> path of a tiny checkpoint, built once per session."""
    from shared.tiny_model import make_tiny_model

    built: dict[tuple[str, tuple[tuple[str, object], ...]], Path] = {}

    def make(arch: str = "llama", **overrides: object) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[key] = make_tiny_model(out, arch, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the tiny models' tokenizer files."""
    from shared.tiny_model import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


HUB_REPO = "tandem-test/tiny-llama"  # the hub id `hub_cache` holds
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A Hugging Face cache (for HF_HUB_CACHE) holding `tiny_llama` as the hub model `HUB_REPO`,
    laid out as huggingface_hub writes it: `models--ORG--NAME/refs/main` names the commit,
    `snapshots/<commit>/` holds the files (copies here, where the hub's are links into blobs/)."""
    import shutil

    cache = tmp_path_factory.mktemp("hf-hub")
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    shutil.copytree(tiny_llama, repo / "snapshots" / HUB_COMMIT)
    return cache
