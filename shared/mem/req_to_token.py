"""The request -> token-slot table.

Each running request holds one row: `req_to_token[row, i]` is the KV slot of its token `i`, for
`i < seq_len`. Attention backends gather K/V through it. Cells past a request's length are stale or
zero (zero points into the reserved padding page 0), never read as real K/V.

On a GPU the table lives twice: the device copy the kernels read, and a host mirror the scheduler
reads and writes. Writes go to the mirror at once and reach the device in one batched scatter per
step (`flush`, called by the model runner before the forward), so scheduling a step costs no
per-request host<->device copies or syncs. With tensor parallelism (`record_writes`) the writes
are kept on CPU too: `flush` returns them, and rank 0 sends them to the other ranks' tables.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps a request row to the KV slots of its tokens: `req_to_token[row, i]` = slot of token i.

    The scheduler `alloc`s a row when a request starts running and `free`s it when the request
    finishes or is retracted; it alone writes the row. A freshly allocated row is not cleared:
    the owner writes cells `[0, seq_len)` before any forward reads them. Single-threaded, no locks.
    """

    def __init__(
        self, max_reqs: int, max_context_len: int, device: torch.device | str, record_writes: bool = False
    ) -> None:
        if max_reqs < 1 or max_context_len < 1:
            raise ValueError(
                f"need max_reqs >= 1 and max_context_len >= 1, got {max_reqs}, {max_context_len}"
            )
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((max_reqs, max_context_len), dtype=torch.int64, device=self.device)
        mirrored = self.device.type != "cpu"
        self.host = torch.zeros_like(self.req_to_token, device="cpu") if mirrored else self.req_to_token
        self._host_np = self.host.numpy()  # same memory; single cells without torch overhead
        self._record = record_writes  # keep writes in `_pending` for `flush` even without a mirror
        self._pending: list[tuple[int, int, torch.Tensor | list[int]]] = []  # not yet on the device
        self._free_rows = list(range(max_reqs - 1, -1, -1))  # a stack: row 0 goes out first
        self._is_free = [True] * max_reqs

    def alloc(self) -> int | None:
        """A free row, or None when all `max_reqs` rows are in use."""
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        assert 0 <= row < self.max_reqs and not self._is_free[row], f"double free of row {row}"
        self._is_free[row] = True
        self._free_rows.append(row)

    def num_free(self) -> int:
        return len(self._free_rows)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """`row[start : start + len(slots)] = slots` (slots on the host)."""
        self.host[row, start : start + len(slots)] = slots
        if (self.host is not self.req_to_token or self._record) and len(slots):
            self._pending.append((row, start, slots))

    def write_one(self, row: int, pos: int, slot: int) -> None:
        """`row[pos] = slot` (the decode step's cheap path)."""
        self._host_np[row, pos] = slot
        if self.host is not self.req_to_token or self._record:
            self._pending.append((row, pos, [slot]))

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """A host view of `row[start:end]` (valid until the row is written again)."""
        return self.host[row, start:end]

    def flush(self) -> torch.Tensor | None:
        """Bring the device table up to date with every write since the last flush; return those
        writes as a host tensor [3, n] of (row, column, slot), or None when there were none (always
        None on CPU unless `record_writes`)."""
        if not self._pending:
            return None
        # Plain lists, then a handful of torch ops: per-write torch calls would cost more host
        # time than the copies this saves.
        rows: list[int] = []
        cols: list[int] = []
        for row, start, slots in self._pending:
            rows += [row] * len(slots)
            cols += range(start, start + len(slots))
        self._pending.clear()
        index = torch.tensor([rows, cols], dtype=torch.int64)
        # Values come from the mirror, not the queued writes: a cell written twice since the last
        # flush (a row freed and reused within a step) appears twice here, and a scatter with
        # repeated indices keeps an arbitrary one of its values on CUDA.
        writes = torch.cat([index, self.host[index[0], index[1]][None]])  # one host->device copy
        if self.host is self.req_to_token:  # CPU, recording for the other ranks: already there
            return writes
        packed = writes.pin_memory() if self.req_to_token.is_cuda else writes
        packed = packed.to(self.req_to_token.device, non_blocking=True)
        self.req_to_token[packed[0], packed[1]] = packed[2]
        return writes

    def apply(self, writes: torch.Tensor) -> None:
        """Another rank's `flush` output [3, n] (on this table's device): write those cells."""
        self.req_to_token[writes[0], writes[1]] = writes[2]
