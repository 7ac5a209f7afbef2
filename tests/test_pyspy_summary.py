"""bench/pyspy_summary.py on stacks in py-spy's raw format, as `py-spy record --subprocesses
--idle -f raw` wrote them on the GPU machine (process lines first; a spawned process's command
line holds a quoted ';')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import pyspy_summary, serving

WORKER = 'process 1914:"/opt/torch/.venv/bin/python3 -m services.prefill --model /dev/shm/m"'
ENGINE = (
    'process 1976:"/opt/torch/.venv/bin/python3 -B -c from multiprocessing.spawn import spawn_main;'
    ' spawn_main(tracker_fd=16, pipe_handle=18) --multiprocessing-fork"'
)
ROOT = (
    "<module> (<string>:1);spawn_main (multiprocessing/spawn.py:122);"
    "run_engine (shared/engine_process.py:212)"
)
WAIT = (
    "_serve (shared/engine_process.py:262);EngineCore.step (shared/engine_core.py:546);"
    "EngineCore._resolve (shared/engine_core.py:641);InflightStep.to_host (shared/inflight.py:42);"
    "Event.synchronize (torch/cuda/streams.py:254)"
)
POST = (
    "_serve (shared/engine_process.py:254);handle_message (shared/engine_process.py:369);"
    "EngineCore.set_kv_target (shared/engine_core.py:294);KvSender.set_target (shared/disagg/sender.py:152);"
    "KvSender._finish (shared/disagg/sender.py:245);KvSender._post (shared/disagg/sender.py:262);"
    "NixlAgent.write (shared/transfer/nixl.py:197);nixl_agent.transfer (nixl_cu13/_api.py:665)"
)
POLL = (
    "_serve (shared/engine_process.py:250);Socket.poll (zmq/sugar/socket.py:1106);"
    "Poller.poll (zmq/sugar/poll.py:106)"
)
OTHER = "_serve (shared/engine_process.py:254);handle_message (shared/engine_process.py:378)"
LOOP = "_serve (shared/engine_process.py:247)"  # a sample taken in the loop's own frame
THREAD = (
    "Thread._bootstrap (threading.py:1030);EngineClient._receive (shared/engine_client.py:238);"
    "Poller.poll (zmq/sugar/poll.py:106)"
)
RAW = "\n".join(
    [
        f"{WORKER};{ENGINE};{ROOT};{WAIT} 50",
        f"{WORKER};{ENGINE};{ROOT};{POST} 20",
        f"{WORKER};{ENGINE};{ROOT};{POLL} 20",
        f"{WORKER};{ENGINE};{ROOT};{OTHER} 5",
        f"{WORKER};{ENGINE};{ROOT};{LOOP} 5",
        f"{WORKER};{THREAD} 300",  # the worker's own thread: not an engine loop
        f"{WORKER};{ENGINE};{ROOT};{WAIT} 50",
    ]
)


def test_engine_loop_samples_are_shared_out_by_what_they_wait_for() -> None:
    (process, chains), *rest = pyspy_summary.parse(RAW).items()
    assert rest == [] and process.startswith("1976 ")  # the engine process, not the worker
    summary = pyspy_summary.summarize(chains, top=5)
    assert summary["samples"] == 150
    assert {k: v for k, v in summary.items() if k not in ("samples", "top")} == {
        "waiting for the GPU": 0.667,
        "posting NIXL writes": 0.133,
        "waiting for messages": 0.133,
        "other": 0.067,
    }
    assert summary["top"] == [
        [0.667, "EngineCore.step > EngineCore._resolve > InflightStep.to_host > Event.synchronize"],
        [0.133, "handle_message > EngineCore.set_kv_target > KvSender.set_target > KvSender._finish"],
        [0.133, "Socket.poll > Poller.poll"],
        [0.033, "handle_message"],
        [0.033, "_serve"],  # named, not an empty chain
    ]


def test_the_command_line_prints_and_writes_json(tmp_path: Path) -> None:
    raw = tmp_path / "prefill.txt"
    raw.write_text(RAW + "\nnot a stack line\n")
    out = tmp_path / "summary.json"
    printed = subprocess.run(
        [sys.executable, "bench/pyspy_summary.py", str(raw), "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "150 samples in the engine loop" in printed and "66.7%  waiting for the GPU" in printed
    (summary,) = json.loads(out.read_text()).values()
    assert summary["posting NIXL writes"] == 0.133


def test_serving_bench_samples_each_launched_engine_loop_per_level(tiny_llama: Path, tmp_path: Path) -> None:
    # Real py-spy on a real suite: every level gets each worker's engine loop (one unified worker
    # here: the Recorder takes the launch's every worker alike), its shares adding up, and the raw
    # stacks stay in the log dir. 64 tokens a request: levels long enough for py-spy to attach
    # and sample on a loaded machine. (The launch also measures this machine's matmul and copy
    # rates first and sets each level's engine steps against them: bench/serving_limits.py.)
    out, logs = tmp_path / "result.json", tmp_path / "logs"
    flags = ["--launch", "--py-spy", "--topology", "unified", "--model-path", str(tiny_llama)]
    flags += ["--log-dir", str(logs), "--worker-args", "--device cpu --max-total-tokens 4096"]
    flags += ["--input-len", "16", "--output-len", "64", "--concurrency", "1,2", "--num-prompts-factor", "4"]
    assert serving.main([*flags, "--warmup", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    levels = report["levels"]
    assert [lv["completed"] for lv in levels] == [4, 8]
    assert report["hardware"]["device"] == "cpu" and report["hardware"]["matmul_flops"] > 0
    for lv in levels:
        assert lv["limits"]["matmul_share"] > 0 and lv["limits"]["bandwidth_share"] > 0
        assert sorted(lv["profile"]) == ["worker-0"]
        for loop in lv["profile"].values():
            shares = [v for k, v in loop.items() if k not in ("samples", "top")]
            assert loop["samples"] > 10 and abs(sum(shares) - 1) < 0.01, loop
            assert loop["top"] and all(chain for _, chain in loop["top"])
    assert sorted(p.name for p in (logs / "py-spy").glob("*.txt")) == [
        "concurrency_1_worker-0.txt",
        "concurrency_2_worker-0.txt",
    ]


def test_py_spy_needs_launch() -> None:
    with pytest.raises(SystemExit, match="--py-spy needs --launch"):
        serving.main(["--py-spy", "--base-url", "http://127.0.0.1:9/v1"])
