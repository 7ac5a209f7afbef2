"""How the services' gRPC servers take their ports: alone, and a port they cannot have is one line.

grpc turns SO_REUSEPORT on by default on Linux, so a second router or worker started on a port in
use would bind it too and take part of its calls (one gateway's requests split across two
clusters) instead of failing. Every server here turns it off (`EXCLUSIVE_PORT`)."""

from __future__ import annotations

import grpc

EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def listen(server: grpc.aio.Server, address: str, who: str) -> int:
    """`server.add_insecure_port(address)`: the port bound, or a one-line exit naming `who` and
    the address (grpc raises a RuntimeError with a hint about its debug logs)."""
    try:
        return server.add_insecure_port(address)
    except RuntimeError:
        raise SystemExit(
            f"{who}: error: cannot listen on {address}: the port is taken or the address is not this host's"
        ) from None
