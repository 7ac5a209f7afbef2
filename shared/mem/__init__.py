"""KV-cache memory: page allocator, KV pools, the request->token table and the radix prefix cache.

Ownership in one line: the allocator owns free pages; a running request owns its private pages
and its `req_to_token` row; the radix cache owns every page it stores (see each class).
"""

from __future__ import annotations

from shared.mem.allocator import PageAllocator
from shared.mem.kv_pool import KVPool, MHAKVPool, MLAKVPool, make_kv_pool
from shared.mem.radix_cache import MatchResult, RadixCache, TreeNode
from shared.mem.req_to_token import ReqToTokenPool

__all__ = [
    "KVPool",
    "MHAKVPool",
    "MLAKVPool",
    "MatchResult",
    "PageAllocator",
    "RadixCache",
    "ReqToTokenPool",
    "TreeNode",
    "make_kv_pool",
]
