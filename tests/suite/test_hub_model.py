"""`tandem up --model ORG/NAME` as a user runs it: the hub id resolves to its snapshot in the local
Hugging Face cache (offline: nothing is downloaded, the hub endpoint is a closed port), every
service loads that directory, and clients call the model by its hub id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from services.launcher import free_port
from tests.conftest import HUB_COMMIT, HUB_REPO
from tests.suite.cluster import tandem_up

pytestmark = pytest.mark.xdist_group("suite_hub_model")


@pytest.fixture(scope="module")
def up(hub_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    env = {
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    args = ("--prefill", "0", "--decode", "0", "--unified", "1")
    with tandem_up(HUB_REPO, tmp_path_factory.mktemp("hub-model"), env, args) as info:
        yield info


def test_the_hub_id_is_the_model_id(client: openai.OpenAI, up: dict[str, Any]) -> None:
    assert up["model"] == HUB_REPO
    assert [m.id for m in client.models.list().data] == [HUB_REPO]
    out = client.completions.create(model=HUB_REPO, prompt="Once upon", max_tokens=3, temperature=0)
    assert out.model == HUB_REPO and out.usage is not None and out.usage.completion_tokens == 3


def test_every_service_loads_the_snapshot(up: dict[str, Any], hub_cache: Path) -> None:
    snapshot = str(hub_cache / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / HUB_COMMIT)
    for name in ("router", "worker-0", "gateway"):
        with open(f"/proc/{up['pids'][name]}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0")]
        flag = "--tokenizer" if name == "gateway" else "--model"
        assert argv[argv.index(flag) + 1] == snapshot, (name, argv)
