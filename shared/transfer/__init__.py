"""Moving a prompt's KV pages from a prefill engine into pages a decode engine reserved.

    pages.py    which bytes a page is in every pool buffer; copy pages out/in as bytes
    nixl.py     NIXL agent: one-sided WRITEs from our pages into a peer's, with a notification
    records.py  what travels between the two engines (the target, the commit record)

Two transports carry the same pages: NIXL (the engine writes straight into the peer's
memory; UCX over DRAM on CPU, VRAM on GPU) and bytes handed to the caller, who moves them over a
gRPC stream (`KvTarget.transport == "grpc"`, for hosts without NIXL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.transfer.records import KvCommit, KvTarget

if TYPE_CHECKING:
    from shared.transfer.pages import PageLayout

__all__ = ["KvCommit", "KvTarget", "PageLayout", "nixl_available"]


def __getattr__(name: str) -> Any:
    # Lazy: the workers' I/O processes use the records without importing torch.
    if name == "PageLayout":
        from shared.transfer.pages import PageLayout

        return PageLayout
    raise AttributeError(name)


def nixl_available() -> bool:
    from shared.transfer.nixl import import_nixl

    try:
        import_nixl()
    except ImportError:
        return False
    return True
