"""The request -> token-slot table.

Each running request holds one row: `req_to_token[row, i]` is the KV slot of its token `i`, for
`i < seq_len`. Attention backends gather K/V through it. Cells past a request's length are stale or
zero (zero points into the reserved padding page 0), never read as real K/V.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps a request row to the KV slots of its tokens: `req_to_token[row, i]` = slot of token i.

    The scheduler `alloc`s a row when a request starts running and `free`s it when the request
    finishes or is retracted; it alone writes the row. A freshly allocated row is not cleared:
    the owner writes cells `[0, seq_len)` before any forward reads them. Single-threaded, no locks.
    """

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device | str) -> None:
        if max_reqs < 1 or max_context_len < 1:
            raise ValueError(
                f"need max_reqs >= 1 and max_context_len >= 1, got {max_reqs}, {max_context_len}"
            )
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((max_reqs, max_context_len), dtype=torch.int64, device=self.device)
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
