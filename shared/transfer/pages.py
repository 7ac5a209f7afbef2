"""KV pages as bytes: where page p of each pool buffer lives, and copying pages out and in.

A pool is a list of buffers, each `[num_slots, ...]` with slot = page * page_size + offset, so
page p of a buffer is one contiguous byte range: `[p * page_bytes, (p + 1) * page_bytes)`. A
transfer moves the same pages of every buffer. Both ends must agree on the layout: the
fingerprint covers page size, buffer count, per-token shapes and dtypes (not the pool size).

Serialized form of pages [p0, p1, ...] (the gRPC transport): for each buffer in pool order, the
pages' bytes in the given page order.
"""

from __future__ import annotations

import hashlib

import torch


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

    def nbytes(self, num_pages: int) -> int:
        """Bytes that `num_pages` pages take across all buffers."""
        return num_pages * sum(self.page_bytes)

    def check_pages(self, pages: list[int]) -> None:
        if any(not 0 < p < self.num_pages for p in pages):  # page 0 is the padding page
            raise ValueError(f"page ids must be in [1, {self.num_pages})")

    def read_pages(self, pages: list[int]) -> bytes:
        idx = torch.tensor(pages, dtype=torch.int64, device=self.buffers[0].device)
        parts = [view[idx].reshape(-1) for view in self._pages]
        return torch.cat(parts).cpu().numpy().tobytes()

    def write_pages(self, pages: list[int], data: bytes) -> None:
        if len(data) != self.nbytes(len(pages)):
            raise ValueError(
                f"expected {self.nbytes(len(pages))} bytes for {len(pages)} pages, got {len(data)}"
            )
        device = self.buffers[0].device
        idx = torch.tensor(pages, dtype=torch.int64, device=device)
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        offset = 0
        for view, page_bytes in zip(self._pages, self.page_bytes):
            size = len(pages) * page_bytes
            view[idx] = flat[offset : offset + size].view(len(pages), page_bytes)
            offset += size
