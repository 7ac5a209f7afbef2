"""The tiny test model's chat template: plain ChatML stays byte-identical, tools render Qwen2.5-style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

# The template before tool support; conversations without tools must still render exactly so.
CHATML_BEFORE_TOOLS = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat runs the page."}],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "héllo wörld 你好 🙂\n\nline two"},
        {"role": "assistant", "content": "Hello! <tool_call> is just text here."},
        {"role": "user", "content": '{"json": true}'},
    ],
    [{"role": "assistant", "content": "starts with the assistant"}, {"role": "user", "content": " "}],
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_without_tools_the_output_is_unchanged(
    tokenizer: Any, conversation: list[dict[str, Any]], generation_prompt: bool
) -> None:
    kwargs = {"add_generation_prompt": generation_prompt, "tokenize": False}
    before = tokenizer.apply_chat_template(conversation, chat_template=CHATML_BEFORE_TOOLS, **kwargs)
    assert tokenizer.apply_chat_template(conversation, **kwargs) == before
    assert tokenizer.apply_chat_template(conversation, tools=None, **kwargs) == before
    assert tokenizer.apply_chat_template(conversation, tools=[], **kwargs) == before


def test_tools_render_like_qwen25(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    text = tokenizer.apply_chat_template(
        messages, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string"}}}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    )
    without_system = tokenizer.apply_chat_template(messages[1:], tools=[WEATHER_TOOL], tokenize=False)
    assert without_system.startswith("<|begin_of_text|><|im_start|>system\n# Tools\n\n")


def test_tool_calls_and_tool_messages_render(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "21 C"},
        {"role": "tool", "tool_call_id": "b", "content": None},
        {"role": "assistant", "content": "Warm.", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "user", "content": None},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|><|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\n\n</tool_response>"
        "<|im_end|>\n"
        '<|im_start|>assistant\nWarm.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<|im_end|>\n"
    )
