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
    # The prefill side gave the prompt up and will write nothing more into its pages: the decode
    # side frees them at once instead of waiting out a write that may still land.
    aborted: bool = False

    @staticmethod
    def abandon(rid: str) -> KvCommit:
        """The record that says no (more) KV is coming for `rid`."""
        return KvCommit(rid=rid, first_token=-1, cached_tokens=0, aborted=True)

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @staticmethod
    def decode(data: bytes) -> KvCommit:
        return _decoder.decode(data)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KvCommit)
