"""Moving a prompt's KV pages from a prefill engine into pages a decode engine reserved.

    pages.py    which bytes a page is in every pool buffer; copy pages out/in as bytes
    nixl.py     NIXL agent: one-sided WRITEs from our pages into a peer's, with a notification
    records.py  what travels between the two engines (the target, the commit record)

Two transports carry the same pages: NIXL (the engine writes straight into the peer's
memory; UCX over DRAM on CPU, VRAM on GPU) and bytes handed to the caller, who moves them over a
gRPC stream (`KvTarget.transport == "grpc"`, for hosts without NIXL).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from shared.lazy import lazy_attributes
from shared.transfer.records import KvCommit, KvTarget

if TYPE_CHECKING:
    from shared.transfer.pages import PageLayout

__all__ = ["KvCommit", "KvTarget", "PageLayout", "import_nixl", "nixl_available"]

# The workers' I/O processes use the records without importing torch.
__getattr__ = lazy_attributes(__name__, {"PageLayout": "pages"})


def import_nixl() -> tuple[Any, Any]:
    """(nixl_agent, nixl_agent_config) from whichever NIXL build is installed (here, not in
    nixl.py: `tandem up` asks whether NIXL is there without importing torch)."""
    for module in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            api = importlib.import_module(module)
        except ImportError:
            continue
        logging.getLogger("nixl").setLevel(logging.WARNING)
        return api.nixl_agent, api.nixl_agent_config
    raise ImportError("NIXL is not installed (pip install nixl, or nixl-cu12 / nixl-cu13)")


def nixl_available() -> bool:
    try:
        import_nixl()
    except ImportError:
        return False
    return True
