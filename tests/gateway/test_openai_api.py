"""The gateway's OpenAI surface against the stub router, through the official `openai` client."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from services.gateway.responses import Job, ResponseBuilder
from services.gateway.tokenizer import Tokenizer
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2
from tests.gateway.stub_router import MODEL_ID, StubRouter

pytestmark = pytest.mark.xdist_group("gateway_api")

PROMPT = "The cat runs the page."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert models[0].object == "model"
    assert models[0].owned_by == "tandem"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


@pytest.mark.parametrize(("seed", "sent"), [(-1, 2**63 - 1), (-(2**63), 0), (2**63 - 1, 2**63 - 1), (0, 0)])
def test_any_int64_seed_reaches_the_router_in_the_engines_range(
    client: openai.OpenAI, stub: StubRouter, seed: int, sent: int
) -> None:
    # vLLM takes any int64; the engine's seeds are [0, 2**63): a negative one is folded in.
    client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2, seed=seed)
    (request,) = stub.service.requests
    assert request.sampling_params.seed == sent


def test_chat_request_sent_to_router(client: openai.OpenAI, stub: StubRouter, hf_tokenizer) -> None:
    client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0.5, top_p=0.9, seed=7)
    (request,) = stub.service.requests
    rendered = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert request.text == rendered
    # The template wrote BOS itself: exactly one BOS in front.
    assert list(request.token_ids) == hf_tokenizer.encode(rendered, add_special_tokens=False)
    assert request.token_ids[0] == hf_tokenizer.bos_token_id and request.token_ids[1] != request.token_ids[0]
    params = request.sampling_params
    assert (
        params.temperature == pytest.approx(0.5) and params.top_p == pytest.approx(0.9) and params.seed == 7
    )
    # Only what the user gave is set; the chat default runs to the end of the context (256).
    for unset in ("top_k", "min_p", "presence_penalty", "repetition_penalty", "ignore_eos", "min_new_tokens"):
        assert not params.HasField(unset), unset
    assert params.max_new_tokens == 256 - len(request.token_ids)
    assert request.n == 1 and not request.return_logprob


def test_chat_plain_and_streamed_agree(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content
    assert plain.usage.completion_tokens == 6
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 6
    assert plain.usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens // 2

    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format(http: httpx.Client) -> None:
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert all("usage" not in c for c in chunks)  # no include_usage: no usage key


def test_streamed_text_is_compact_utf8_json_with_every_character_escaped_as_json_says(
    http: httpx.Client, stub: StubRouter
) -> None:
    """Each event is `data: ` and compact JSON, non-ASCII text raw UTF-8 and the characters JSON
    must escape escaped, so the deltas join to the text the model wrote, byte for byte."""
    pieces = ["caf\u00e9 \u2014 \u65e5\u672c", ' "quoted" \\ back', "\n\ttab\r", "\x00\x1f\x7f", "\U0001f600"]
    stub.script(pieces)
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 8, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        raw = response.read()
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    payloads = [e.removeprefix(b"data: ") for e in events[:-2]]
    # As compact json.dumps(ensure_ascii=False) writes them: no spaces, the same escapes.
    assert all(
        json.dumps(json.loads(p), ensure_ascii=False, separators=(",", ":")).encode() == p for p in payloads
    )
    assert "caf\u00e9 \u2014 \u65e5\u672c".encode() in raw and "\U0001f600".encode() in raw  # not \u-escaped
    assert b"\\u0000\\u001f" in raw and b"\\n\\t" in raw and b'\\"quoted\\" \\\\ back' in raw
    text = "".join(json.loads(p)["choices"][0]["text"] for p in payloads)
    assert text == "".join(pieces)


def test_completion_string_prompt(client: openai.OpenAI, stub: StubRouter, hf_tokenizer) -> None:
    result = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=50)
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert result.choices[0].text == PROMPT  # the stub echoes the prompt's tokens
    assert result.choices[0].finish_reason == "stop"
    (request,) = stub.service.requests
    assert list(request.token_ids) == hf_tokenizer.encode(PROMPT)  # with BOS, like OpenAI
    assert request.text == PROMPT and request.sampling_params.max_new_tokens == 50


def test_completion_default_max_tokens_is_16(client: openai.OpenAI, stub: StubRouter) -> None:
    client.completions.create(model=MODEL_ID, prompt=PROMPT)
    assert stub.service.requests[0].sampling_params.max_new_tokens == 16


def test_completion_token_id_prompts(client: openai.OpenAI, stub: StubRouter, hf_tokenizer) -> None:
    ids = hf_tokenizer.encode(PROMPT)
    single = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=50)
    assert single.choices[0].text == PROMPT
    assert list(stub.service.requests[0].token_ids) == ids and stub.service.requests[0].text == ""
    other = hf_tokenizer.encode("A dog")
    batch = client.completions.create(model=MODEL_ID, prompt=[ids, other], max_tokens=50)
    assert [c.text for c in batch.choices] == [PROMPT, "A dog"]
    assert batch.usage.prompt_tokens == len(ids) + len(other)


def test_completion_list_prompts_with_n(client: openai.OpenAI, stub: StubRouter) -> None:
    result = client.completions.create(model=MODEL_ID, prompt=["The cat", "A dog sees"], n=2, max_tokens=50)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    # Choice prompt_idx * n + sample_idx.
    assert [c.text for c in result.choices] == ["The cat", "The cat", "A dog sees", "A dog sees"]
    assert len(stub.service.requests) == 2 and all(r.n == 2 for r in stub.service.requests)
    prompt_lens = [len(r.token_ids) for r in stub.service.requests]
    assert result.usage.prompt_tokens == sum(prompt_lens)  # each prompt once, not n times
    assert result.usage.completion_tokens == 2 * sum(n - 1 for n in prompt_lens)  # minus BOS


def test_completion_list_prompts_streamed(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL_ID, prompt=["The cat", "A dog sees"], n=2, max_tokens=50, stream=True
    )
    texts = ["", "", "", ""]
    finishes = [None] * 4
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == ["The cat", "The cat", "A dog sees", "A dog sees"]
    assert finishes == ["stop"] * 4


def test_chat_n2_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=2, max_tokens=4, stream=True)
    )
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts[0] == texts[1] and texts[0]
    assert finishes == {0: "length", 1: "length"}


def test_stop_strings(client: openai.OpenAI, stub: StubRouter) -> None:
    result = client.completions.create(model=MODEL_ID, prompt=PROMPT, stop=[" runs", "xyz"], max_tokens=50)
    assert result.choices[0].text == "The cat" and result.choices[0].finish_reason == "stop"
    assert list(stub.service.requests[0].sampling_params.stop) == [" runs", "xyz"]
    single = client.completions.create(model=MODEL_ID, prompt=PROMPT, stop=" the", max_tokens=50)
    assert single.choices[0].text == "The cat runs"


def test_completion_top_logprobs_of_one_text_keep_the_likeliest(tokenizer_dir: Path) -> None:
    """Candidates that read the same (a partial UTF-8 character's bytes all read "\ufffd") share
    the legacy format's text-keyed entry: the likeliest one's value, the sampled token's here,
    not the last one listed."""
    tokenizer = Tokenizer(str(tokenizer_dir))
    alike = [i for i in range(tokenizer.vocab_size) if tokenizer.piece(i).text == "\ufffd"][:2]
    other = next(i for i in range(tokenizer.vocab_size) if tokenizer.piece(i).text not in ("\ufffd", ""))
    assert len(alike) == 2
    job = Job(
        kind="completion", id="cmpl-1", model=MODEL_ID, n=1, requests=[router_pb2.GenerateRequest()],
        echo_texts=[""], logprobs=True, top_logprobs=3, include_usage=False,
    )  # fmt: skip
    sampled = alike[0]
    entry = common_pb2.TokenLogprob(token_id=sampled, logprob=-0.5)
    for token_id, logprob in ((sampled, -0.5), (other, -1.0), (alike[1], -2.0)):
        entry.top_logprobs.add(token_id=token_id, logprob=logprob)
    body, _ = ResponseBuilder(job, tokenizer)._logprobs([entry], 0)
    assert body["token_logprobs"] == [-0.5]
    assert body["top_logprobs"] == [{"\ufffd": -0.5, tokenizer.piece(other).text: -1.0}]


def test_completion_logprobs_shape(client: openai.OpenAI, stub: StubRouter) -> None:
    result = client.completions.create(model=MODEL_ID, prompt=PROMPT, logprobs=2, max_tokens=4)
    request = stub.service.requests[0]
    assert request.return_logprob and request.top_logprobs_num == 2
    logprobs = result.choices[0].logprobs
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert logprobs.token_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert logprobs.text_offset == [0, 3, 7, 12]
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs):
        assert token in top and 1 <= len(top) <= 3

    streamed = list(
        client.completions.create(model=MODEL_ID, prompt=PROMPT, logprobs=2, max_tokens=4, stream=True)
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    tokens = [t for p in parts for t in p.tokens]
    offsets = [o for p in parts for o in p.text_offset]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


def test_chat_logprobs_shape(client: openai.OpenAI, stub: StubRouter) -> None:
    result = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, logprobs=True, top_logprobs=3, max_tokens=3
    )
    assert stub.service.requests[0].top_logprobs_num == 3
    content = result.choices[0].logprobs.content
    assert len(content) == 3 and "".join(e.token for e in content) == result.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes) == entry.token.encode()
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert all(isinstance(t.bytes, list) for t in entry.top_logprobs)
    no_top = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, logprobs=True, max_tokens=2)
    assert stub.service.requests[1].return_logprob and stub.service.requests[1].top_logprobs_num == 0
    assert [e.top_logprobs for e in no_top.choices[0].logprobs.content] == [[], []]


def test_chat_logprobs_bytes_of_split_characters(client: openai.OpenAI) -> None:
    # 你 is three UTF-8 bytes spread over byte-level tokens: each token's text is U+FFFD but its
    # bytes are exact, and the bytes of all tokens put together decode to the text.
    result = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "你好"}], logprobs=True, max_tokens=20
    )
    content = result.choices[0].logprobs.content
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode() == result.choices[0].message.content
    assert any(e.token == "\ufffd" for e in content)


def test_echo(client: openai.OpenAI, hf_tokenizer) -> None:
    result = client.completions.create(model=MODEL_ID, prompt="The cat", echo=True, max_tokens=50)
    assert result.choices[0].text == "The catThe cat"
    ids = hf_tokenizer.encode("A dog")
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, echo=True, max_tokens=50)
    assert by_ids.choices[0].text == hf_tokenizer.decode(ids) + "A dog"
    streamed = client.completions.create(
        model=MODEL_ID, prompt="The cat", echo=True, max_tokens=50, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == "The catThe cat"


def test_completion_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "The cat runs"


def test_sglang_extras_reach_the_router(client: openai.OpenAI, stub: StubRouter) -> None:
    extra = {
        "top_k": 5,
        "min_p": 0.1,
        "min_tokens": 2,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "stop_token_ids": [7, 9],
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    client.completions.create(
        model=MODEL_ID,
        prompt=PROMPT,
        max_tokens=4,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        extra_body=extra,
    )
    params = stub.service.requests[0].sampling_params
    assert (params.top_k, params.min_new_tokens, params.ignore_eos) == (5, 2, True)
    assert params.min_p == pytest.approx(0.1) and params.repetition_penalty == pytest.approx(1.1)
    assert list(params.stop_token_ids) == [7, 9]
    assert params.skip_special_tokens is False and params.no_stop_trim is True
    assert params.presence_penalty == pytest.approx(0.5) and params.frequency_penalty == pytest.approx(-0.5)


def test_text_content_parts_and_developer_role(client: openai.OpenAI, stub: StubRouter) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "The cat"}, {"type": "text", "text": "runs."}]},
    ]
    client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=1)
    text = stub.service.requests[0].text
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text and "The cat\nruns." in text


def test_trace_context_is_forwarded(http: httpx.Client, stub: StubRouter) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1}
    response = http.post("/v1/completions", json=body, headers={"traceparent": traceparent})
    assert response.status_code == 200
    assert stub.service.metadata[0]["traceparent"] == traceparent
