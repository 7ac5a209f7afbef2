"""The Node.js example client (examples/node/generate.js) against a real router + unified worker.

It gets the same greedy tokens as the Python gRPC client, its streamed deltas add up to its
summary, n gives n samples, and a gRPC error becomes a non-zero exit naming the status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.launcher import free_port
from services.protos.tandem.common.v1 import common_pb2
from tests.suite.cluster import Cluster, collect

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"
DEPENDENCIES = ["@grpc/grpc-js", "@grpc/proto-loader"]
FETCH_RETRIES = ["--fetch-retries=1", "--fetch-retry-mintimeout=1000", "--fetch-retry-maxtimeout=5000"]
# npm's error codes when it cannot reach the registry (an offline host), as opposed to a broken
# package-lock.json, which should fail the test.
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH")

pytestmark = [
    pytest.mark.xdist_group("examples_node"),
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None, reason="node/npm are not on PATH"
    ),
]


@pytest.fixture(scope="module")
def node_modules() -> None:
    """`npm ci` into examples/node/node_modules unless an earlier run left the dependencies there."""
    if all((EXAMPLE / "node_modules" / dep / "package.json").is_file() for dep in DEPENDENCIES):
        return
    try:
        proc = _npm_ci()
        if proc.returncode != 0 and not _offline(proc):
            # A partly written node_modules (ENOTEMPTY after an interrupted run) or a corrupt
            # shared npm cache ("tarball data ... seems to be corrupted", then ENOENT): once more
            # from an empty node_modules and a cache of this run's own.
            shutil.rmtree(EXAMPLE / "node_modules", ignore_errors=True)
            with tempfile.TemporaryDirectory(prefix="npm-cache-") as cache:
                proc = _npm_ci("--cache", cache, "--prefer-online")
    except subprocess.TimeoutExpired:
        pytest.skip("npm ci timed out: the npm registry is unreachable?")
    if proc.returncode != 0:
        if code := _offline(proc):
            pytest.skip(f"npm ci cannot reach the npm registry ({code}); examples/node needs its packages")
        raise AssertionError(f"npm ci failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def _offline(proc: subprocess.CompletedProcess[str]) -> str | None:
    """The network error code npm failed on, if it failed for want of the registry."""
    return next((code for code in NETWORK_ERRORS if code in proc.stderr), None)


def _npm_ci(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # Short backoff: an offline host skips in seconds rather than after npm's minute of retries.
        ["npm", "ci", "--no-audit", "--no-fund", *FETCH_RETRIES, *extra],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def cluster(
    node_modules: None, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with Cluster(tiny_llama, tmp_path_factory.mktemp("examples-node")) as c:
        c.start_router()
        c.start_worker("unified")
        yield c


def node(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(EXAMPLE / "generate.js"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def generate(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    proc = node("--router", cluster.router, *args)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}\n{cluster.logs()}"
    return proc


def split_output(stdout: str) -> tuple[str, dict[str, Any]]:
    """Streamed text, then a newline and the JSON summary on the last line."""
    streamed, _, summary = stdout.removesuffix("\n").rpartition("\n")
    return streamed, json.loads(summary)


def test_greedy_tokens_equal_the_python_client(cluster: Cluster) -> None:
    proc = generate(cluster, "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0", "--json")
    summary = json.loads(proc.stdout)  # --json: the summary line only
    (expected,) = collect(cluster.generate(text="Hello", max_new_tokens=8, temperature=0.0)).values()
    (sample,) = summary["samples"]
    assert summary["request_id"] not in ("", "0")
    assert sample["index"] == 0
    assert sample["token_ids"] == expected["ids"]
    assert sample["text"] == expected["text"]
    assert sample["finish_reason"] == common_pb2.FinishReason.Name(expected["finish"].reason)
    assert sample["finish_reason"] == "FINISH_REASON_LENGTH"
    assert sample["usage"]["completion_tokens"] == 8
    assert sample["usage"]["prompt_tokens"] == expected["usage"].prompt_tokens
    assert sample["route"]["decode_worker"] == expected["route"].decode_worker


def test_streamed_deltas_add_up_to_the_summary(cluster: Cluster) -> None:
    proc = generate(cluster, "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0")
    streamed, summary = split_output(proc.stdout)
    (sample,) = summary["samples"]
    assert sample["text"] and streamed == sample["text"]


def test_n2_gives_two_seeded_samples(cluster: Cluster) -> None:
    args = ["--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "7"]
    proc = generate(cluster, *args, "--n", "2")
    streamed, summary = split_output(proc.stdout)
    samples = summary["samples"]
    assert [s["index"] for s in samples] == [0, 1]
    # n > 1 streams one line per delta: `[index] <JSON string>`.
    deltas: dict[int, str] = {0: "", 1: ""}
    for line in streamed.splitlines():
        index, _, text = line.partition(" ")
        deltas[int(index.strip("[]"))] += json.loads(text)
    expected = collect(cluster.generate(text="Hello", n=2, max_new_tokens=6, temperature=0.8, seed=7))
    for s in samples:
        assert s["text"] == deltas[s["index"]]
        assert s["token_ids"] == expected[s["index"]]["ids"]
        assert s["usage"]["completion_tokens"] == len(s["token_ids"])


def test_bad_request_exits_nonzero_with_the_grpc_status(cluster: Cluster) -> None:
    proc = node("--router", cluster.router, "--prompt", "Hello", "--temperature", "-1")
    assert proc.returncode == 1
    assert "INVALID_ARGUMENT" in proc.stderr and "temperature" in proc.stderr
    assert proc.stdout == ""


def test_unreachable_router_from_the_environment(node_modules: None) -> None:
    proc = node("--prompt", "Hello", "--timeout", "5", env={"TANDEM_ROUTER": f"127.0.0.1:{free_port()}"})
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr
