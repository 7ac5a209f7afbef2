"""KV pages as bytes: where page p of each pool buffer lives, and copying pages out and in.

A pool is a list of buffers, each `[num_slots, ...]` with slot = page * page_size + offset, so
page p of a buffer is one contiguous byte range: `[p * page_bytes, (p + 1) * page_bytes)`. A
transfer moves the same pages of every buffer. Both ends must agree on the layout: the
fingerprint covers page size, buffer count, per-token shapes and dtypes (not the pool size).

Serialized form of pages [p0, p1, ...] (the gRPC transport): for each buffer in pool order, the
pages' bytes in the given page order.

    buffer 0: | p0 | p1 | p2 |  buffer 1: | p0 | p1 | p2 |  ...   (each | p | is page_bytes[b])

Copies (docs/kv_transfer.md): from a host pool, `read_pages` joins the bytes of each run of
pages straight out of the pool into the returned `bytes` (one copy) and `write_pages` copies
each buffer's pages into the pool with one numpy scatter (one copy; torch's `index_copy_` moves
rows of bytes several times slower). On a GPU, `read_pages` gathers on the device, copies once
to pinned host memory and once into the `bytes`; `write_pages` copies once to the device and
scatters there. No Python loop runs per page.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Protocol

import numpy as np
import torch

from shared.errors import InvalidRequest


class KvPages(Protocol):
    """What the KV hand-off (shared/disagg/) needs of a pool's pages: `PageLayout` for one pool,
    `ShardedPageLayout` (shared/transfer/shards.py) for a tensor-parallel engine's shards."""

    page_size: int
    fingerprint: str

    def nbytes(self, num_pages: int) -> int: ...

    def check_pages(self, pages: list[int]) -> None: ...

    def read_pages(self, pages: list[int]) -> bytes | bytearray: ...

    def write_pages(self, pages: list[int], data: bytes | bytearray | memoryview) -> None: ...


class PageLayout:
    def __init__(self, buffers: list[torch.Tensor], page_size: int) -> None:
        for buf in buffers:
            if not buf.is_contiguous() or buf.shape[0] % page_size:
                raise ValueError("KV buffers must be contiguous and hold whole pages")
        self.buffers = buffers
        self.page_size = page_size
        self.num_pages = buffers[0].shape[0] // page_size
        # [num_pages, page_bytes] byte views of each buffer (no copies)
        self._pages = [buf.view(torch.uint8).view(self.num_pages, -1) for buf in buffers]
        self.page_bytes = [int(view.shape[1]) for view in self._pages]
        shapes = [(tuple(buf.shape[1:]), str(buf.dtype)) for buf in buffers]
        digest = hashlib.sha256(repr((page_size, shapes)).encode()).hexdigest()[:16]
        self.fingerprint = f"p{page_size}-b{len(buffers)}-{digest}"
        self._device = buffers[0].device
        # a host pool's buffers as numpy [num_pages, page_bytes] arrays and flat byte views
        self._arrays = [v.numpy() for v in self._pages] if self._device.type == "cpu" else []
        self._flat = [a.data.cast("B") for a in self._arrays]

    def nbytes(self, num_pages: int) -> int:
        """Bytes that `num_pages` pages take across all buffers."""
        return num_pages * sum(self.page_bytes)

    def check_pages(self, pages: list[int]) -> None:
        if any(not 0 < p < self.num_pages for p in pages):  # page 0 is the padding page
            raise InvalidRequest(f"page ids must be in [1, {self.num_pages})")

    def read_pages(self, pages: list[int]) -> bytes:
        """The serialized form of `pages` (see the module docstring)."""
        if self._device.type == "cpu":
            # Even 64 buffers x 1024 one-page runs join faster than a gather and a copy out.
            return self._join_runs(page_runs(pages))
        staged = self._gather(pages)  # [nbytes] on the device
        host = torch.empty(staged.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(staged)
        return host.numpy().tobytes()

    def write_pages(self, pages: list[int], data: bytes | bytearray | memoryview) -> None:
        """Copy the serialized form of `pages` (as `read_pages` returns it) into the pool."""
        size = memoryview(data).nbytes
        if size != self.nbytes(len(pages)):
            raise InvalidRequest(
                f"expected {self.nbytes(len(pages))} bytes for {len(pages)} pages, got {size}"
            )
        if not pages:
            return
        n, offset = len(pages), 0
        if self._device.type == "cpu":
            src = np.frombuffer(data, dtype=np.uint8)
            rows = np.asarray(pages, dtype=np.int64)
            for array, page_bytes in zip(self._arrays, self.page_bytes):
                array[rows] = src[offset : offset + n * page_bytes].reshape(n, page_bytes)
                offset += n * page_bytes
            return
        with warnings.catch_warnings():  # a read-only buffer: we only ever read from it
            warnings.simplefilter("ignore", UserWarning)
            staged = torch.frombuffer(data, dtype=torch.uint8).to(self._device)
        idx = torch.tensor(pages, dtype=torch.int64, device=self._device)
        for view, page_bytes in zip(self._pages, self.page_bytes):
            view.index_copy_(0, idx, staged[offset : offset + n * page_bytes].view(n, page_bytes))
            offset += n * page_bytes

    def _gather(self, pages: list[int]) -> torch.Tensor:
        idx = torch.tensor(pages, dtype=torch.int64, device=self._device)
        out = torch.empty(self.nbytes(len(pages)), dtype=torch.uint8, device=self._device)
        offset = 0
        for view, page_bytes in zip(self._pages, self.page_bytes):
            size = len(pages) * page_bytes
            torch.index_select(view, 0, idx, out=out[offset : offset + size].view(len(pages), page_bytes))
            offset += size
        return out

    def _join_runs(self, runs: np.ndarray) -> bytes:
        """One copy: the bytes of each run of each buffer, in serialized order."""
        starts, lengths = runs[:, 0].tolist(), runs[:, 2].tolist()
        parts = []
        for flat, page_bytes in zip(self._flat, self.page_bytes):
            parts += [flat[s * page_bytes : (s + n) * page_bytes] for s, n in zip(starts, lengths)]
        return b"".join(parts)


def page_runs(src: list[int], dst: list[int] | None = None) -> np.ndarray:
    """Maximal runs where the page lists advance by one (both of them, given two):
    rows (src start, dst start, length); dst start repeats src start for one list."""
    s = np.asarray(src, dtype=np.int64)
    d = s if dst is None else np.asarray(dst, dtype=np.int64)
    if not len(s):
        return np.zeros((0, 3), dtype=np.int64)
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(s)]]))
    return np.stack([s[starts], d[starts], lengths], 1)
