"""`tandem up` as a user runs it, driven by the official `openai` client: router, a prefill and
a decode worker and the gateway as processes; SIGTERM stops them all."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from bench.startup import children
from services.launcher import free_port
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from tests.engine.hf_reference import hf_greedy
from tests.suite.cluster import (
    admin_auth,
    engine_pid,
    launch_up,
    running,
    started_services,
    tandem_up,
    wait_ready,
)

pytestmark = pytest.mark.xdist_group("suite_up")


@pytest.fixture(scope="module")
def up(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    router_args = ("--router-args", "--stall-timeout 12 --max-in-flight 999")
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("up"), args=router_args) as info:
        yield info


def test_router_args_reach_the_router(up: dict[str, Any]) -> None:
    with open(f"/proc/{up['pids']['router']}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[-5:-1] == [b"--stall-timeout", b"12", b"--max-in-flight", b"999"]


def test_the_services_start_at_once(up: dict[str, Any]) -> None:
    """Router, workers and gateway are started together, not each after the one before is up
    (which took the router's start-up, then the workers' model loads, before the gateway began
    loading its tokenizer)."""
    ticks = os.sysconf("SC_CLK_TCK")

    def started(pid: int) -> float:  # seconds since boot: /proc/PID/stat's field 22
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19]) / ticks

    times = {name: started(pid) for name, pid in up["pids"].items()}
    assert set(times) == {"router", "prefill-0", "decode-0", "gateway"}
    assert max(times.values()) - min(times.values()) < 3.0, times


def test_models(client: openai.OpenAI, up: dict[str, Any]) -> None:
    assert [m.id for m in client.models.list().data] == [up["model"]]


def test_chat_plain_and_streamed_agree(client: openai.OpenAI, up: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    plain = client.chat.completions.create(model=up["model"], messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model=up["model"],
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.content == streamed
    assert plain.choices[0].finish_reason == "length" and plain.usage is not None
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 12
    )


def test_completions_with_token_ids_equal_hf(
    client: openai.OpenAI, up: dict[str, Any], tiny_llama: Path
) -> None:
    prompts = [[11, 12, 13, 14, 15], list(range(40, 90))]
    out = client.completions.create(
        model=up["model"], prompt=prompts, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert len(out.choices) == 2
    for choice in out.choices:
        expected = hf_greedy(tiny_llama, prompts[choice.index], 8)
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(tiny_llama).decode(expected)
        assert choice.text == text


def test_n_stop_and_logprobs(client: openai.OpenAI, up: dict[str, Any]) -> None:
    out = client.completions.create(
        model=up["model"],
        prompt="Once upon a time",
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=3,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    for choice in out.choices:
        assert choice.logprobs is not None and len(choice.logprobs.tokens) == 6  # type: ignore[arg-type]
        # text -> logprob of the 2 most likely tokens plus the sampled one (as vLLM); byte-fragment
        # tokens may share a text
        lp = choice.logprobs
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # type: ignore[union-attr]
        assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))  # type: ignore[arg-type]
    greedy = client.completions.create(
        model=up["model"], prompt="Once upon a time", max_tokens=8, temperature=0
    )
    text = greedy.choices[0].text
    stop = text[3:6] if len(text) >= 6 else text[-1]
    cut = client.completions.create(
        model=up["model"], prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]


def test_bad_parameters_are_400_and_service_continues(client: openai.OpenAI, up: dict[str, Any]) -> None:
    for kwargs in ({"temperature": -2}, {"top_p": 7}, {"n": 0}, {"max_tokens": -1}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=up["model"], prompt="hi", **kwargs)  # type: ignore[call-overload]
        assert err.value.status_code == 400 and err.value.body
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert client.completions.create(model=up["model"], prompt="hi", max_tokens=2).choices[0].text is not None


def test_stream_disconnect_cancels_through_every_service(up: dict[str, Any]) -> None:
    body = {"model": up["model"], "prompt": "x", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{up['openai']}/completions", json=body, timeout=30) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 4:
                break
    # Workers release the request: admin HTTP shows nothing in flight on any worker.
    deadline = time.monotonic() + 5
    while True:
        workers = httpx.get(up["router_admin"], headers=admin_auth(up), timeout=5).json()["workers"]
        if all(w["in_flight"] == 0 for w in workers):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.05)


def test_the_launch_guards_its_control_plane_with_a_token_kept_out_of_argv(up: dict[str, Any]) -> None:
    token = up["cluster_token"]
    assert len(token) >= 32
    for pid in up["pids"].values():  # not in any command line (`ps` shows those)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert token.encode() not in f.read()
    assert httpx.get(up["router_admin"], timeout=5).status_code == 401
    assert httpx.get(up["router_admin"], headers=admin_auth(up), timeout=5).status_code == 200
    with grpc.insecure_channel(up["router_grpc"]) as channel:  # admin is not on the public port
        with pytest.raises(grpc.RpcError) as info:
            router_pb2_grpc.RouterAdminServiceStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_sigterm_stops_every_process(up: dict[str, Any]) -> None:
    proc: subprocess.Popen[bytes] = up["process"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "tandem up: stopping every service" in output and output.rstrip().endswith("tandem up: stopped")
    for pid in up["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for log in Path(up["logs"]).glob("*.log"):  # a clean stop: no service logged a traceback
        assert "Traceback" not in log.read_text(), f"{log.name}:\n{log.read_text()[-3000:]}"
    assert not (Path(up["logs"]).parent / "ready.json").exists()  # its pids are gone


def test_without_restarts_a_dead_worker_leaves_the_others_serving(tiny_llama: Path, tmp_path: Path) -> None:
    """--no-restart, two unified workers: one killed, the launcher reports it and the suite
    serves on through the other (the router routes around it); the last one killed, nothing can
    serve, so the launcher stops everything, exits 1 and removes its ready-file."""
    args = ("--prefill", "0", "--decode", "0", "--unified", "2", "--no-restart")
    with tandem_up(tiny_llama, tmp_path, args=args) as info:
        proc: subprocess.Popen[bytes] = info["process"]
        client = openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0)

        def served() -> bool:
            out = client.completions.create(model=info["model"], prompt="the sea", max_tokens=4)
            return out.choices[0].finish_reason is not None

        os.kill(info["pids"]["worker-0"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "worker-0" in json.loads((tmp_path / "ready.json").read_text())["pids"]:
            assert time.monotonic() < deadline, "the ready-file still lists the dead worker"
            time.sleep(0.1)
        while True:  # the router may try the dead worker first: it then retries the survivor
            try:
                if served():
                    break
            except openai.APIStatusError:
                assert time.monotonic() < deadline, "the survivor did not take over"
                time.sleep(0.2)
        for _ in range(3):
            assert served()
        assert proc.poll() is None
        os.kill(info["pids"]["worker-1"], signal.SIGKILL)
        assert proc.wait(20) == 1
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "worker-0 exited with code -9" in output and "serving on without worker-0" in output
        assert "no way left to serve" in output
        assert not (tmp_path / "ready.json").exists()
        for name, pid in info["pids"].items():
            assert not running(pid), name


def test_a_service_that_exits_is_started_again_and_a_killed_launcher_takes_every_process_down(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """One unified worker whose engine is killed: the worker exits 1 and the launcher starts it
    again, the ready-file following its pid and metrics URL; then the router killed, started
    again, the worker registers with it anew. The suite serves after each. Then the launcher
    SIGKILLed, which leaves it no time to stop anyone: every service, the restarted ones too,
    goes down (each asked the kernel for SIGTERM when its parent dies, services/common/parent.py).
    The launch also takes an API key: the gateway wants it, and passes it on to the router."""
    args = ("--prefill", "0", "--decode", "0", "--unified", "1", "--api-key", "launch-key")
    ready = tmp_path / "ready.json"
    with tandem_up(tiny_llama, tmp_path, args=args) as info:
        proc: subprocess.Popen[bytes] = info["process"]
        assert set(info["pids"]) == {"router", "worker-0", "gateway"}
        models = f"{info['openai']}/models"
        assert httpx.get(models, timeout=10).status_code == 401
        key = {"Authorization": "Bearer launch-key"}
        assert httpx.get(models, headers=key, timeout=10).status_code == 200
        client = openai.OpenAI(base_url=info["openai"], api_key="launch-key", max_retries=0)

        def serves_again(timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    out = client.completions.create(model=info["model"], prompt="the sea", max_tokens=4)
                    assert out.choices[0].finish_reason is not None
                    return
                except (openai.APIStatusError, openai.APIConnectionError) as e:
                    assert time.monotonic() < deadline, f"not serving again: {e}"
                    time.sleep(0.3)

        def until(what: str, done: Any, timeout: float = 20.0) -> None:
            deadline = time.monotonic() + timeout
            while not done():
                assert time.monotonic() < deadline, what
                time.sleep(0.1)

        serves_again()
        worker = info["pids"]["worker-0"]
        os.kill(engine_pid(worker), signal.SIGKILL)
        until("the worker exits", lambda: not running(worker))
        serves_again()

        def ready_file(key: str) -> Any:
            return json.loads(ready.read_text())[key]["worker-0"]

        until("the ready-file's worker pid", lambda: ready_file("pids") != worker)
        assert running(ready_file("pids"))
        until("the new metrics URL", lambda: ready_file("metrics") != info["metrics"]["worker-0"])
        url = ready_file("metrics")
        assert "tandem_worker" in httpx.get(url, timeout=10).text

        os.kill(info["pids"]["router"], signal.SIGKILL)
        serves_again()
        assert proc.poll() is None
        until(
            "the ready-file's router pid",
            lambda: json.loads(ready.read_text())["pids"]["router"] != info["pids"]["router"],
        )
        alive = set(json.loads(ready.read_text())["pids"].values())
        assert len(alive) == 3 and all(running(pid) for pid in alive)
        proc.kill()
        proc.wait(10)
        until(
            f"every service gone after the launcher was killed: {alive}",
            lambda: not any(map(running, alive)),
            30,
        )
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "worker-0 exited with code 1" in output and "the engine is gone" in output
    assert "starting worker-0 again in 1 s" in output and "worker-0 started again" in output
    assert "router exited with code -9" in output and "router started again" in output


def test_role_flags_reach_the_workers_of_their_role_alone(tiny_llama: Path, tmp_path: Path) -> None:
    """--prefill-args and --decode-args come after --worker-args on their role's workers only: a
    flag one role lacks (--forget-decode-after, prefill's) can be given (a QA pass could not)."""
    role_flags = ("--prefill-args", "--forget-decode-after 7", "--decode-args", "--kv-transfer-timeout 9")
    proc = launch_up(tiny_llama, tmp_path, free_port(), ("--prefill", "1", "--decode", "1", *role_flags))
    try:
        pids = started_services(proc, ("prefill", "decode"))
        argv = {n: Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") for n, pid in pids.items()}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    own = [("prefill", "--forget-decode-after", "7"), ("decode", "--kv-transfer-timeout", "9")]
    assert "--forget-decode-after" not in argv["decode"] and "--kv-transfer-timeout" not in argv["prefill"]
    for name, flag, value in own:
        i = argv[name].index(flag)
        assert argv[name][i + 1] == value and i > argv[name].index("--device")  # after --worker-args
    assert proc.returncode == 0


def _launch(
    model: Path, tmp: Path, port: int, new_session: bool = False, args: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """A unified `tandem up` on `port` (`launch_up`), not waited for."""
    return launch_up(model, tmp, port, ("--prefill", "0", "--decode", "0", *args), new_session=new_session)


def test_sigterm_during_start_up_stops_at_once(tiny_llama: Path, tmp_path: Path) -> None:
    """The launcher acts on SIGTERM while it waits for the services to come up (it went on
    starting them, said "Tandem is up", and only then stopped)."""
    proc = _launch(tiny_llama, tmp_path, free_port())
    assert proc.stdout is not None
    try:
        while not (line := proc.stdout.readline().decode()).startswith("logs:"):
            assert line, "tandem up exited before starting anything"
        deadline = time.monotonic() + 30
        while not children(proc.pid):  # the router has started
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read().decode()
    assert "Tandem is up" not in output and output.rstrip().endswith("tandem up: stopped"), output
    assert "exited during start-up" not in output
    assert not any(running(pid) for pid in started)


def test_an_answer_from_another_process_on_the_port_is_not_our_gateway(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Another server takes the gateway's port after the launcher's early check (two `tandem up`
    started at once): its /health answers 200, but ours could not bind. The launcher reports the
    failure instead of "Tandem is up" over the other's gateway (and restarting ours forever)."""
    port = free_port()

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args: Any) -> None:
            pass

    proc = _launch(tiny_llama, tmp_path, port)
    assert proc.stdout is not None
    try:
        while not proc.stdout.readline().decode().startswith("logs:"):  # past the early check
            assert proc.poll() is None
        with http.server.HTTPServer(("127.0.0.1", port), Healthy) as other:
            threading.Thread(target=other.serve_forever, daemon=True).start()
            status = proc.wait(120)
            other.shutdown()
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read().decode()
    assert status == 1, output
    assert "Tandem is up" not in output and "tandem up failed: gateway exited during start-up" in output
    assert "address already in use" in output


def test_without_a_ready_file_the_endpoints_are_in_the_log_directory_and_ctrl_c_stops_everything(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The banner names where the cluster token the router's admin API wants is: the printed
    admin URL is usable without starting again with --ready-file. (With --served-model-name, the
    id clients send.) Then a terminal's Ctrl-C, SIGINT to the whole process group, stops the
    launcher and every service (the workers' engine processes too) at once, without a
    traceback. (One launch for both: each `tandem up` costs the suite ~15 s on two cores.)"""
    ready = tmp_path / "logs" / "ready.json"
    args = ("--served-model-name", "house-model")
    proc = _launch(tiny_llama, tmp_path, free_port(), new_session=True, args=args)
    try:
        info = wait_ready(proc, ready)
        assert ready.stat().st_mode & 0o777 == 0o600
        workers = httpx.get(info["router_admin"], headers=admin_auth(info), timeout=5).json()["workers"]
        assert [w["role"] for w in workers] == ["unified"]
        assert info["model"] == "house-model"
        client = openai.OpenAI(base_url=info["openai"], api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["house-model"]
        assert client.completions.create(model="house-model", prompt="the sea", max_tokens=2).choices
        pids = info["pids"]
        engine = engine_pid(pids["worker-0"])
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert f"in {ready})" in output and "model id       house-model" in output
    assert not ready.exists()
    assert output.rstrip().endswith("tandem up: stopped") and "exited with code" not in output, output
    assert not any(running(pid) for pid in [*pids.values(), engine])
    for log in (tmp_path / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(), f"{log.name}:\n{log.read_text()[-3000:]}"
