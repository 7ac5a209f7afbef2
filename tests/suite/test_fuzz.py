"""Malformed input against the whole suite (`tandem up`: gateway, router, a prefill and a decode
worker, as real processes): thousands of generated requests over HTTP and gRPC, each of which
must get a client error (4xx with an OpenAI error body; a client-error gRPC status with a
message): no 5xx, no reset, no hang; every process alive afterwards and a valid request served.

The cases are generated from a fixed seed, sent concurrently, and counted; the figures are printed
(`pytest -s tests/suite/test_fuzz.py`) and recorded in docs/reliability.md ("Malformed input").
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2
from tests.suite.cluster import tandem_up

pytestmark = pytest.mark.xdist_group("suite_fuzz")

SEED = 15
CONCURRENCY = 16
TIMEOUT_S = 30.0
MIB = 1024 * 1024
SURROGATE = "\ud800"
# Statuses a malformed gRPC request may get: the client's fault, said so.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # only for a message over gRPC's size limit
}
GENERATE = "/tandem.router.v1.RouterService/Generate"
TOKENIZE = "/tandem.router.v1.RouterService/Tokenize"
LIST_MODELS = "/tandem.router.v1.RouterService/ListModels"


@dataclass(frozen=True)
class HttpCase:
    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    method: str = "POST"


@dataclass(frozen=True)
class GrpcCase:
    name: str
    method: str
    body: bytes


# ---- HTTP cases ------------------------------------------------------------------------------

_NOT_NUMBERS: list[Any] = ["1", "hot", True, [], {}, [1], {"a": 1}, ""]
_NOT_INTS: list[Any] = [*_NOT_NUMBERS, 1.5]
_NOT_BOOLS: list[Any] = ["true", 1, 0, "yes", [], {}, 1.0]
_NOT_STRINGS: list[Any] = [1, 1.5, True, [], {}, ["a"]]
_BAD_GRAMMARS = [
    "",
    "root ::=",
    'root ::= root "a"',
    'rule ::= "a"',
    'root ::= "a" |',
    "root ::= undefined_rule",
    'root ::= ("a"',
    "root ::= [z-a]",
    'root ::= "a" root',
]
_BAD_REGEXES = ["", "(", "[a-", "a{5,2}", "(?P<x", "\\", "*", "a**", "(?<=a)b", "[^\\s\\S]"]
_BAD_SCHEMAS: list[Any] = [
    {"type": "nonsense"},
    {"$ref": "#/nowhere"},
    {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "string", "pattern": "("},
    {"type": "string", "minLength": 5, "maxLength": 2},
    {"enum": []},
    {"allOf": 5},
    {"type": "object", "properties": "x"},
]


def _bad_sampling_fields(chat: bool) -> dict[str, list[Any]]:
    """Per field: values that must be refused (wrong types, out of range, unsupported)."""
    max_tokens_low = [0, -1] if chat else [-1]
    huge_stop = ["x" * 257]
    fields: dict[str, list[Any]] = {
        "model": [1, None, "", "other-model", [], {"a": 1}],
        "n": [0, -1, 129, 17, 2**63, *_NOT_INTS],
        "stream": _NOT_BOOLS,
        "stream_options": ["x", [], 1, {"include_usage": "x"}, {"include_usage": True}],
        "stop": [1, [1], [""], [None], {"a": 1}, ["x"] * 17, huge_stop, True, [[]]],
        "temperature": [-0.1, 2.1, 1e309, -1e309, *_NOT_NUMBERS],
        "top_p": [0, -1, 1.1, *_NOT_NUMBERS],
        "presence_penalty": [-2.1, 2.1, *_NOT_NUMBERS],
        "frequency_penalty": [-2.1, 2.1, *_NOT_NUMBERS],
        "seed": [-(2**63) - 1, 2**63, 2**70, *_NOT_INTS],
        "user": _NOT_STRINGS,
        "top_k": [-2, 2**31, *_NOT_INTS],
        "min_p": [-0.1, 1.1, *_NOT_NUMBERS],
        "min_tokens": [-1, 2**32, 100, *_NOT_INTS],
        "repetition_penalty": [0, -1, *_NOT_NUMBERS],
        "ignore_eos": _NOT_BOOLS,
        "skip_special_tokens": _NOT_BOOLS,
        "spaces_between_special_tokens": _NOT_BOOLS,
        "no_stop_trim": _NOT_BOOLS,
        "stop_token_ids": [[-1], [2**31], [100_000], "x", [1.5], list(range(65)), 5, [True]],
        "response_format": [
            "json",
            1,
            {"type": "xml"},
            {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {"name": "bad name"}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"d": "x" * 300_000}}},
            *({"type": "json_schema", "json_schema": {"name": "s", "schema": s}} for s in _BAD_SCHEMAS),
        ],
        "regex": [*_BAD_REGEXES, 1, [], "a" * 300_000],
        "ebnf": [*_BAD_GRAMMARS, 1, {}, 'root ::= "' + "a" * 300_000 + '"'],
        "logit_bias": [{"1": 5}, "x"],
        "max_tokens": [*max_tokens_low, 2**32, 1_000_000, *_NOT_INTS],
    }
    if chat:
        fields |= {
            "messages": [
                [],
                "x",
                [1],
                [{}],
                [{"role": "wizard", "content": "x"}],
                [{"role": "user"}],
                [{"role": "user", "content": 1}],
                [{"role": "user", "content": [{"type": "image_url"}]}],
                [{"role": "tool", "content": "x"}],
                [{"role": "user", "content": "x", "tool_calls": []}],
                [{"role": "function", "content": "x"}],
                [{"role": "user", "content": "x" * 70_000}],
                [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{bad"}}],
                    }
                ],
                None,
            ],
            "max_completion_tokens": [0, -1, 1_000_000, *_NOT_INTS],
            "logprobs": _NOT_BOOLS,
            "top_logprobs": [21, -1, 2, *_NOT_INTS],  # 2 without logprobs
            "tools": [
                "x",
                [1],
                [{"type": "function"}],
                [{"type": "x", "function": {"name": "f"}}],
                [{"type": "function", "function": {"name": "bad name"}}],
                [{"type": "function", "function": {"name": "f"}}] * 2,
                [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                [{"type": "function", "function": {"name": "f", "description": "d" * 70_000}}],
            ],
            "tool_choice": ["required", "x", 1, {"type": "function", "function": {"name": "nope"}}],
            "parallel_tool_calls": _NOT_BOOLS,
            "functions": [[{"name": "f"}]],
            "function_call": [{"name": "f"}],
            "audio": [{}],
            "modalities": [["audio"]],
            "prediction": [{}],
            "reasoning_effort": ["max", 1],
            "web_search_options": [{}],
        }
    else:
        fields |= {
            "prompt": [
                1,
                True,
                {},
                [],
                [[]],
                [1, "a"],
                [-1],
                [2**31],
                [100_000],
                [[1], [-1]],
                [{"a": 1}],
                [None],
                None,
                "x" * 70_000,
                ["ok", "x" * 70_000],
                list(range(5000)),  # past the context
            ],
            "logprobs": [21, -1, *_NOT_INTS],
            "echo": _NOT_BOOLS,
            "suffix": ["x"],
            "best_of": [2, 0],
        }
    return fields


def _valid(chat: bool) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "MODEL", "max_tokens": 2}
    if chat:
        return base | {"messages": [{"role": "user", "content": "The cat runs."}]}
    return base | {"prompt": "The cat runs."}


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


def http_cases(model: str, rng: random.Random) -> list[HttpCase]:
    """Every malformed HTTP request of the suite, deterministic for `rng`'s seed."""
    cases: list[HttpCase] = []
    json_type = {"content-type": "application/json"}

    def add(name: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        cases.append(HttpCase(name, path, body, headers if headers is not None else json_type))

    for chat in (False, True):
        path = "/v1/chat/completions" if chat else "/v1/completions"
        kind = "chat" if chat else "completion"
        valid = _valid(chat) | {"model": model}
        fields = _bad_sampling_fields(chat)
        extra = {"stream_options": {"stream": False}, "echo": {"logprobs": 1}}  # needs a partner
        # 1. every field, every bad value
        for field, values in fields.items():
            for i, value in enumerate(values):
                body = valid | {field: value}
                if field == "min_tokens" and value == 100:
                    body["max_tokens"] = 2
                if field == "echo" and value is True:
                    body |= extra["echo"]
                add(f"{kind}.{field}[{i}]", path, _json(body))
        add(f"{kind}.echo+logprobs", path, _json(valid | {"echo": True, "logprobs": 1}))
        # 2. two bad fields at once
        names = sorted(fields)
        for i in range(150):
            a, b = rng.sample(names, 2)
            body = valid | {a: rng.choice(fields[a]), b: rng.choice(fields[b])}
            add(f"{kind}.pair[{i}]:{a}+{b}", path, _json(body))
        # 3. a required field missing, the body of the wrong shape
        for field in ("model", "messages" if chat else "prompt"):
            add(f"{kind}.missing.{field}", path, _json({k: v for k, v in valid.items() if k != field}))
        for i, body in enumerate([[], "x", 1, None, True, [valid]]):
            add(f"{kind}.shape[{i}]", path, _json(body))
        # 4. invalid JSON: truncated anywhere, broken syntax, garbage bytes
        text = _json(valid)
        for i in range(150):
            add(f"{kind}.truncated[{i}]", path, text[: rng.randrange(len(text))])
        for i, raw in enumerate([b"", b" ", b"{", b'{"model":}', b'{"a":1,}', b"{'a': 1}", b"nul", b"[1,]"]):
            add(f"{kind}.syntax[{i}]", path, raw)
        for i in range(75):
            add(f"{kind}.garbage[{i}]", path, rng.randbytes(rng.randrange(1, 400)))
        # 5. invalid UTF-8 (a stray byte, an overlong form, an encoded surrogate) anywhere
        bad_bytes = [b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]
        for i in range(100):
            at = rng.randrange(len(text) + 1)
            add(f"{kind}.utf8[{i}]", path, text[:at] + rng.choice(bad_bytes) + text[at:])
        # 6. lone surrogates in every string a request holds, keys too
        strings: dict[str, Any] = {
            "model": SURROGATE,
            "user": SURROGATE,
            "stop": ["a" + SURROGATE],
            "regex": SURROGATE,
            "ebnf": f'root ::= "{SURROGATE}"',
            SURROGATE: 1,
            "extra": {SURROGATE + "k": "v"},
        }
        if chat:
            strings |= {
                "messages": [{"role": "user", "content": "hi" + SURROGATE}],
                "tools": [{"type": "function", "function": {"name": "f", "description": SURROGATE}}],
            }
        else:
            strings |= {"prompt": ["ok", "x" + SURROGATE]}
        for field, value in strings.items():
            add(f"{kind}.surrogate.{field}", path, _json(valid | {field: value}))
        add(f"{kind}.surrogate.low", path, _json(valid | {"user": "\udc00"}))
        # 7. deep nesting (past and below the JSON parser's recursion limit)
        for depth in (50, 500, 900, 5000, 100_000):
            nested = "[" * depth + "]" * depth
            raw = text[:-1] + b', "user": ' + nested.encode() + b"}"
            add(f"{kind}.nested[{depth}]", path, raw)
        deep_schema: dict[str, Any] = {"type": "object"}
        for _ in range(200):
            deep_schema = {"type": "object", "properties": {"a": deep_schema}, "required": ["a"], "x": 1}
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "d", "schema": {"type": "array", "maxItems": -1}},
        }
        add(f"{kind}.schema.negative", path, _json(valid | {"response_format": fmt}))
        # 8. wrong content types (a valid body that is not declared JSON)
        for i, ctype in enumerate(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/xml",
            ]
        ):
            add(f"{kind}.content_type[{i}]", path, _json(valid | {"n": 0}), {"content-type": ctype})
        for i, ctype in enumerate(["text/plain", "application/octet-stream"]):
            add(f"{kind}.content_type.plain[{i}]", path, text, {"content-type": ctype})
        # 9. huge bodies and prompts (the probe's sizes) and a huge header
        for size in (1, 8, 31):
            prompt = {"messages": [{"role": "user", "content": "x" * (size * MIB)}]} if chat else {}
            prompt = prompt or {"prompt": "x" * (size * MIB)}
            add(f"{kind}.prompt[{size}MiB]", path, _json(valid | prompt))
        add(f"{kind}.body[33MiB]", path, _json(valid | {"user": "u" * (33 * MIB)}))
        add(f"{kind}.header[1MiB]", path, text, json_type | {"x-big": "h" * MIB})
        add(f"{kind}.header[40KiB]", path, text, json_type | {"x-big": "h" * (40 * 1024)})
    # 10. routes and methods that do not exist
    for i, path in enumerate(["/v1/nothing", "/v1/completions/x", "/v2/chat/completions", "/v1/models/nope"]):
        cases.append(HttpCase(f"route[{i}]", path, b"", {}, "GET"))
    cases.append(HttpCase("method.get", "/v1/completions", b"", {}, "GET"))
    cases.append(HttpCase("method.put", "/v1/chat/completions", b"{}", json_type, "PUT"))
    return cases


# ---- gRPC cases ------------------------------------------------------------------------------


def grpc_cases(rng: random.Random) -> list[GrpcCase]:
    """Malformed router requests: garbage bytes, bad UTF-8, out-of-range fields, huge text."""
    cases: list[GrpcCase] = []

    def generate(name: str, request: router_pb2.GenerateRequest) -> None:
        cases.append(GrpcCase(name, GENERATE, request.SerializeToString()))

    def request(**kwargs: Any) -> router_pb2.GenerateRequest:
        params = kwargs.pop("params", {})
        kwargs.setdefault("token_ids", [5, 6, 7])
        return router_pb2.GenerateRequest(sampling_params=common_pb2.SamplingParams(**params), **kwargs)

    # Bytes protobuf cannot parse: an invalid wire type first, a truncated field, bad UTF-8.
    for method in (GENERATE, TOKENIZE, LIST_MODELS):
        short = method.rsplit("/", 1)[1]
        for i in range(30):
            body = bytes([rng.choice([0x07, 0x0F, 0x0E, 0x16, 0x1F])]) + rng.randbytes(rng.randrange(0, 64))
            cases.append(GrpcCase(f"{short}.garbage[{i}]", method, body))
    text_request = request(text="ab" * 25).SerializeToString()
    for i in range(20):
        cases.append(GrpcCase(f"Generate.truncated[{i}]", GENERATE, text_request[: rng.randrange(3, 50)]))
    for i, bad in enumerate([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"]):
        body = request(text="a" * 10).SerializeToString().replace(b"a" * 10, b"a" * 9 + bad[:1])
        cases.append(GrpcCase(f"Generate.utf8[{i}]", GENERATE, body))
        tok = (
            router_pb2.TokenizeRequest(text="a" * 10)
            .SerializeToString()
            .replace(b"a" * 10, b"a" * 9 + bad[:1])
        )
        cases.append(GrpcCase(f"Tokenize.utf8[{i}]", TOKENIZE, tok))
    # Fields out of range.
    generate("empty", router_pb2.GenerateRequest())
    generate("model", request(model="other"))
    for n in (17, 1000, 2**31):
        generate(f"n[{n}]", request(n=n))
    for top in (21, 1000):
        generate(f"top_logprobs_num[{top}]", request(top_logprobs_num=top, return_logprob=True))
    for i, ids in enumerate([[100_000], [2**31 - 1], list(range(5000)), [5] * 300_000]):
        generate(f"token_ids[{i}]", request(token_ids=ids))
    for i, params in enumerate(
        [
            {"temperature": -1},
            {"temperature": float("nan")},
            {"top_p": 2},
            {"top_p": 0},
            {"top_k": -5},
            {"min_p": 2},
            {"repetition_penalty": 0},
            {"presence_penalty": 9},
            {"frequency_penalty": -9},
            {"min_new_tokens": 5, "max_new_tokens": 2},
            {"stop": ["x"] * 17},
            {"stop": ["x" * 257]},
            {"stop": [""]},
            {"stop_token_ids": list(range(65))},
            {"stop_token_ids": [100_000]},
            {"regex": "("},
            {"regex": "[^\\s\\S]"},
            {"ebnf": 'root ::= root "a"'},
            {"ebnf": "root ::="},
            {"json_schema": "{not json"},
            {"json_schema": '{"type": "nonsense"}'},
            {"structural_tag": "[]"},
            {"regex": "a" * 300_000},
        ]
    ):
        generate(f"params[{i}]", request(params=params))
    # Huge text: past the router's character cap, and past gRPC's message size limit.
    for size in (100_000, MIB, 3 * MIB + 900 * 1024, 5 * MIB, 17 * MIB):
        generate(f"text[{size}]", request(token_ids=[], text="x" * size))
        cases.append(
            GrpcCase(
                f"Tokenize.text[{size}]",
                TOKENIZE,
                router_pb2.TokenizeRequest(text="x" * size).SerializeToString(),
            )
        )
    return cases


# ---- running them ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("fuzz")) as info:
        yield info


async def _send_http(client: httpx.AsyncClient, case: HttpCase) -> tuple[str, str | None]:
    """(status seen, what was wrong or None)."""
    try:
        response = await client.request(case.method, case.path, content=case.body, headers=case.headers)
    except httpx.TimeoutException:
        return "timeout", "no answer in time"
    except httpx.TransportError as exc:
        return "reset", f"transport error: {type(exc).__name__}: {exc}"
    status = response.status_code
    if not 400 <= status < 500:
        return str(status), f"HTTP {status}: {response.text[:300]}"
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(status), f"HTTP {status} without an OpenAI error body: {response.text[:300]}"
    return str(status), None if isinstance(message, str) and message else "an empty error message"


async def _send_grpc(channel: grpc.aio.Channel, case: GrpcCase) -> tuple[str, str | None]:
    if case.method == GENERATE:
        call: Any = channel.unary_stream(case.method)(case.body, timeout=TIMEOUT_S)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return _judge(exc)
    else:
        try:
            await channel.unary_unary(case.method)(case.body, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return _judge(exc)
    return "OK", "accepted"


def _judge(exc: grpc.aio.AioRpcError) -> tuple[str, str | None]:
    code = exc.code()
    if code not in CLIENT_ERRORS:
        return code.name, f"{code.name}: {exc.details()}"
    return code.name, None if exc.details() else "an empty status message"


async def _run_all(up: dict[str, Any]) -> tuple[dict[str, Counter[str]], list[str]]:
    base = up["openai"].removesuffix("/v1")
    rng = random.Random(SEED)
    http = http_cases(up["model"], rng)
    rpc = grpc_cases(rng)
    rng.shuffle(http)  # big and small interleaved, both endpoints at once
    gate = asyncio.Semaphore(CONCURRENCY)
    failures: list[str] = []
    seen: dict[str, Counter[str]] = {"http": Counter(), "grpc": Counter()}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
    async with (
        httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S, limits=limits) as client,
        grpc.aio.insecure_channel(up["router_grpc"], options=options) as channel,
    ):

        async def one(kind: str, case: Any) -> None:
            async with gate:
                if kind == "http":
                    status, problem = await _send_http(client, case)
                else:
                    status, problem = await _send_grpc(channel, case)
            seen[kind][status] += 1
            if problem is not None:
                failures.append(f"{kind} {case.name}: {problem}")

        await asyncio.gather(*(one("http", c) for c in http), *(one("grpc", c) for c in rpc))
    return seen, failures


def _peak_rss_mib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), MiB; the big prompts must not have grown it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def test_malformed_requests_get_client_errors(up: dict[str, Any]) -> None:
    start = time.monotonic()
    seen, failures = asyncio.run(_run_all(up))
    took = time.monotonic() - start
    http_total, grpc_total = sum(seen["http"].values()), sum(seen["grpc"].values())
    print(
        f"\nfuzz: {http_total} HTTP requests, statuses {dict(sorted(seen['http'].items()))}; "
        f"{grpc_total} gRPC requests, statuses {dict(sorted(seen['grpc'].items()))}; "
        f"{len(failures)} failures; {took:.1f} s"
    )
    print("peak RSS: " + ", ".join(f"{name} {_peak_rss_mib(pid)} MiB" for name, pid in up["pids"].items()))
    assert http_total >= 1500 and grpc_total >= 150
    assert not failures, "\n".join(failures[:40])

    # Every process is alive and a valid request is served at once, over HTTP and gRPC.
    assert up["process"].poll() is None
    for pid in up["pids"].values():
        os.kill(pid, 0)  # raises if that service died
    body = {"model": up["model"], "prompt": "The cat runs.", "max_tokens": 3}
    response = httpx.post(f"{up['openai']}/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    with grpc.insecure_channel(up["router_grpc"]) as channel:
        stub_call = channel.unary_stream(
            GENERATE,
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        outputs = list(stub_call(router_pb2.GenerateRequest(token_ids=[5, 6, 7]), timeout=TIMEOUT_S))
    assert outputs and outputs[-1].output.HasField("finish")
