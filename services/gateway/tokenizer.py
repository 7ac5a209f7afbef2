"""The served model's tokenizer, wrapped for the gateway: encode, chat template, token pieces.

Tokenization is CPU work on the event loop's thread; long inputs go to a worker thread instead
(`*_async`). HF fast tokenizers encode from several threads safely as long as nobody changes
their truncation/padding settings, which the gateway never does.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.gateway.protocol import bad_request

# Prompts longer than this (characters) are tokenized in a worker thread so the event loop keeps
# serving other requests; shorter ones are quicker inline than a thread hop.
_INLINE_TOKENIZE_CHARS = 4096
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Names a client's `chat_template_kwargs` may not use: HF's own arguments of apply_chat_template
# (`tokenize`, `return_dict`, ...) and the variables it sets itself.
RESERVED_TEMPLATE_KWARGS = frozenset(
    [*inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters, "messages", "kwargs"]
) - {"self"}


@dataclass(frozen=True)
class TokenPiece:
    """One token as logprobs show it: its text (U+FFFD where it splits a character) and exact bytes."""

    text: str
    raw: bytes


class Tokenizer:
    """The served model's HF tokenizer with the few operations the gateway needs."""

    def __init__(self, path: str) -> None:
        self._hf = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self._hf)
        decoder = getattr(getattr(self._hf, "backend_tokenizer", None), "decoder", None)
        self._byte_decoder = _byte_level_decoder() if type(decoder).__name__ == "ByteLevel" else None
        self._pieces: dict[int, TokenPiece] = {}  # bounded by the vocabulary

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    async def encode_async(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.encode, text, add_special_tokens)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._hf.decode(list(token_ids)))

    async def decode_async(self, token_ids: Sequence[int]) -> str:
        if len(token_ids) <= _INLINE_TOKENIZE_CHARS // 4:
            return self.decode(token_ids)
        return await asyncio.to_thread(self.decode, token_ids)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of `token_ids` (byte-level BPE's spelling, e.g. "Ġthe")."""
        return [str(t) for t in self._hf.convert_ids_to_tokens(list(token_ids))]

    @property
    def chat_template(self) -> str | None:
        """The chat template's text (several named templates joined), None without one."""
        template = self._hf.chat_template
        if isinstance(template, dict):
            return "\n".join(str(t) for t in template.values())
        return template or None

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> tuple[str, list[int]]:
        """The chat template's prompt text (with the assistant turn opened) and its token ids.

        `tools` (OpenAI's tool definitions) reach the template as its `tools` variable, each of
        `template_kwargs` (a request's `chat_template_kwargs`) as a variable of its name.
        """
        if not self._hf.chat_template:
            raise bad_request("the served model has no chat template; use /v1/completions", "messages")
        extra = template_kwargs or {}
        reserved = next((k for k in extra if k in RESERVED_TEMPLATE_KWARGS), None)
        if reserved is not None:
            raise bad_request(
                f"'chat_template_kwargs' may not set '{reserved}', which the server sets itself",
                f"chat_template_kwargs.{reserved}",
            )
        hf_tools: list[Any] | None = tools  # HF types it as a list of dicts or Python functions
        try:
            text = str(
                self._hf.apply_chat_template(
                    messages,
                    tools=hf_tools,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                    **extra,
                )
            )
        except jinja2.TemplateError as exc:  # templates raise on e.g. roles out of order
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from exc
        # The template already wrote BOS and friends; encoding must not add them again.
        return text, self.encode(text, add_special_tokens=False)

    async def render_chat_async(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> tuple[str, list[int]]:
        try:
            size = sum(len(m["content"]) for m in messages) + len(str(tools or ""))
            size += len(json.dumps(template_kwargs)) if template_kwargs else 0
            args = (messages, tools, template_kwargs, add_generation_prompt)
            if size <= _INLINE_TOKENIZE_CHARS:
                return self.render_chat(*args)
            return await asyncio.to_thread(self.render_chat, *args)
        except RecursionError as exc:
            # JSON nested a few hundred deep (a tool call's arguments, a tool's parameters,
            # chat_template_kwargs) outruns the recursion of the template's helpers.
            raise bad_request(
                "the request's messages, tools or chat_template_kwargs nest too deeply for the chat template",
                "messages",
            ) from exc

    def piece(self, token_id: int) -> TokenPiece:
        """Text and bytes of one token, cached."""
        piece = self._pieces.get(token_id)
        if piece is None:
            text = self.decode([token_id])
            piece = TokenPiece(text, self._raw_bytes(token_id) or text.encode())
            self._pieces[token_id] = piece
        return piece

    def _raw_bytes(self, token_id: int) -> bytes | None:
        # Decoding one token loses the bytes of a partial UTF-8 character; the vocabulary entry
        # keeps them (byte-level BPE maps each byte to a printable character, SentencePiece's
        # byte fallback spells them <0xAB>).
        token = self._hf.convert_ids_to_tokens(token_id)
        if not isinstance(token, str):
            return None
        if self._byte_decoder is not None:
            if all(ch in self._byte_decoder for ch in token):
                return bytes(self._byte_decoder[ch] for ch in token)
            return None
        match = _BYTE_TOKEN.fullmatch(token)
        return bytes([int(match.group(1), 16)]) if match else None


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return {ch: b for b, ch in table.items()}
