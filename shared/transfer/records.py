"""Records the two engines of a PD pair exchange (msgpack via msgspec; never pickle)."""

from __future__ import annotations

from typing import Literal

import msgspec

Transport = Literal["nixl", "grpc"]


class KvTarget(msgspec.Struct, frozen=True):
    """Where a prefill request's KV goes: page i of the prompt -> `pages[i]` of the peer."""

    transport: Transport
    pages: list[int]
    peer: str = ""  # the decode engine's NIXL agent name (nixl transport)


class KvCommit(msgspec.Struct, frozen=True):
    """Sent after the pages: the decode engine continues the request from `first_token`."""

    rid: str
    first_token: int
    cached_tokens: int
    logprob: float | None = None
    top_logprobs: list[tuple[float, int]] | None = None

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @staticmethod
    def decode(data: bytes) -> KvCommit:
        return _decoder.decode(data)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KvCommit)
