"""`--model` resolution (services/common/model_dir.py): a local directory as it is, a hub id from
a Hugging Face cache laid out in tmp_path, and the one-line errors. Nothing here reaches the hub:
huggingface_hub's endpoint is a dead loopback port or an in-test fake hub that answers errors."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from services.common.model_dir import TOKENIZER_FILES, ModelError, resolve_model
from services.launcher import free_port
from tests.conftest import HUB_COMMIT, HUB_REPO


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> Path:
    """huggingface_hub reading `hub_cache`, offline, its endpoint a closed port (it reads these
    constants when called; the variables only when imported). Yields the snapshot directory."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    return hub_cache / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / HUB_COMMIT


def test_a_local_directory_is_used_as_it_is(tiny_llama: Path) -> None:
    model = resolve_model(str(tiny_llama))
    assert (model.path, model.name) == (tiny_llama.resolve(), tiny_llama.name)


def test_a_cached_hub_id_resolves_to_its_snapshot_offline(hub: Path) -> None:
    model = resolve_model(HUB_REPO)
    assert Path(model.path) == hub and model.name == HUB_REPO
    pinned = resolve_model(f"{HUB_REPO}@{HUB_COMMIT}")  # a revision; the id stays the model id
    assert Path(pinned.path) == hub and pinned.name == HUB_REPO
    assert Path(resolve_model(HUB_REPO, TOKENIZER_FILES).path) == hub


def test_wrong_local_paths_are_not_model_directories(tmp_path: Path, hub: Path) -> None:
    (tmp_path / "file").write_text("")
    cases = {
        str(tmp_path / "nope"): "no such directory; --model takes a local HF model directory or a hub id",
        str(tmp_path / "file"): "a file, not a directory",
        str(tmp_path): "it has no config.json",
        "./nope": "no such directory",
        "nope": "no such directory",  # one word: a path, not a hub id
    }
    for spec, why in cases.items():
        with pytest.raises(ModelError) as info:
            resolve_model(spec)
        assert str(info.value).startswith(f"not a model directory: {spec} ("), info.value
        assert why in str(info.value)
    with pytest.raises(ModelError, match=r"it has no tokenizer.json or tokenizer_config.json"):
        resolve_model(str(tmp_path), TOKENIZER_FILES)


def test_an_uncached_hub_id_offline_says_so(hub: Path, hub_cache: Path) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model("tandem-test/not-cached")
    message = str(info.value)
    assert message.startswith("tandem-test/not-cached: no such local directory, and not in the Hugging")
    assert str(hub_cache) in message and "HF_HUB_OFFLINE=1 forbids downloading it" in message
    assert "hf download tandem-test/not-cached" in message and "\n" not in message


def test_an_unreachable_hub_says_so(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError) as info:
        resolve_model("tandem-test/not-cached")
    assert "not in the Hugging Face cache" in str(info.value)
    assert "the hub could not be reached: " in str(info.value)


# ---- what the hub answers -------------------------------------------------------------------------

# repo -> (status, X-Error-Code): the headers huggingface_hub maps to its exception types.
ANSWERS = {
    "org/missing": (401, "RepoNotFound"),  # the hub answers 401 for a repo it does not show you
    "org/gated": (403, "GatedRepo"),
    "org/revision": (404, "RevisionNotFound"),
    "org/broken": (500, None),
}


@contextlib.contextmanager
def fake_hub() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            repo = next((r for r in ANSWERS if f"/{r}/" in self.path or self.path.endswith(r)), None)
            status, code = ANSWERS.get(repo or "", (404, "RepoNotFound"))
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("org/missing", "and the hub has no model org/missing (a private one needs HF_TOKEN)"),
        ("org/gated", "org/gated is gated: accept its terms on http://127.0.0.1:"),
        ("org/revision@v9", "org/revision has no revision v9 on the hub"),
        ("org/broken", "and the hub answered: Server error '500 Internal Server Error'"),
    ],
)
def test_hub_errors_say_what_to_do(
    hub: Path, monkeypatch: pytest.MonkeyPatch, spec: str, expected: str
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with fake_hub() as endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        with pytest.raises(ModelError) as info:
            resolve_model(spec)
    assert expected in str(info.value) and "\n" not in str(info.value), info.value
    if spec == "org/gated":
        assert str(info.value).endswith("/org/gated and set HF_TOKEN")
