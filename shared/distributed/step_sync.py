"""What rank 0 tells the follower ranks before each forward, so that every rank runs the same one.

Rank 0 alone schedules, caches prefixes and samples; the followers only need the forward batch's
inputs and the req_to_token cells written since the last step (their own tables are otherwise
never touched). One step is two broadcasts of int64 tensors from rank 0, on the model's device:

    header   [5]   kind (STOP / EXTEND / DECODE / PING), T tokens, B requests, N logit rows, W writes
    payload  [3T + 4B + N + 3W], in this order:
             input_ids [T] | positions [T] | out_cache_loc [T]
             | req_pool_indices [B] | seq_lens [B] | extend_prefix_lens [B] | extend_seq_lens [B]
             | logits_indices [N] | req_to_token writes: rows [W] | columns [W] | slots [W]

Everything else a forward needs (weights, the KV pool shard, the attention backend) each rank
holds itself. A follower reads the header, then the payload, and returns `None` on STOP. A PING
(a header alone) carries nothing: an idle rank 0 sends one now and then when some ranks are on
other nodes, where no process of its own would see them die; the broadcast fails if one did.

A prefill/decode engine also sends TRANSFER items between steps: the header's second int is the
length of an int64 payload of KV-transfer instructions for the followers' own shards, which
shared/transfer/shards.py writes and reads (and any replies it collects right after).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.batch import ForwardBatch, ForwardMode

_STOP, _EXTEND, _DECODE, _TRANSFER, _PING = 0, 1, 2, 3, 4
_HEADER_LEN = 5


@dataclass(frozen=True)
class StepInputs:
    """One forward's inputs as a follower receives them (device tensors, host copies of B-vectors)."""

    mode: ForwardMode
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T]
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    extend_prefix_lens: torch.Tensor  # [B]
    extend_seq_lens: torch.Tensor  # [B]
    logits_indices: torch.Tensor  # [N]
    writes: torch.Tensor  # [3, W] req_to_token (row, column, slot)
    host: list[list[int]]  # req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens


@dataclass(frozen=True)
class TransferOps:
    """KV-transfer instructions for a follower's shard (shared/transfer/shards.py decodes them)."""

    words: list[int]


class StepBroadcast:
    """Rank 0's `send`, `send_transfer` and `stop`, the followers' `recv`; one instance per rank,
    same device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps_sent = 0  # forwards rank 0 broadcast so far

    def send(self, fb: ForwardBatch, writes: torch.Tensor | None) -> None:
        """Rank 0, before its own forward of `fb`: `writes` are req_to_token's flushed cells."""
        w = writes.to(self.device) if writes is not None else fb.input_ids.new_empty((3, 0))
        kind = _DECODE if fb.mode is ForwardMode.DECODE else _EXTEND
        counts = [fb.num_tokens, fb.batch_size, int(fb.logits_indices.shape[0]), int(w.shape[1])]
        self._broadcast(torch.tensor([kind, *counts], dtype=torch.int64, device=self.device))
        parts = [
            fb.input_ids,
            fb.positions,
            fb.out_cache_loc,
            fb.req_pool_indices,
            fb.seq_lens,
            fb.extend_prefix_lens,
            fb.extend_seq_lens,
            fb.logits_indices,
            w.reshape(-1),
        ]
        self._broadcast(torch.cat([p.to(torch.int64) for p in parts]))
        self.steps_sent += 1

    def send_transfer(self, words: list[int]) -> None:
        """Rank 0, between forwards: KV-transfer instructions (`TransferOps` on the followers)."""
        header = [_TRANSFER, len(words)] + [0] * (_HEADER_LEN - 2)
        self._broadcast(torch.tensor(header, dtype=torch.int64, device=self.device))
        self._broadcast(torch.tensor(words, dtype=torch.int64, device=self.device))

    def stop(self) -> None:
        """Rank 0: release the followers from their loop."""
        self._header_only(_STOP)

    def ping(self) -> None:
        """Rank 0, idle: raises when a rank died (its connection closed)."""
        self._header_only(_PING)

    def recv(self) -> StepInputs | TransferOps | None:
        """A follower: the next step's inputs (or transfer instructions), or None when rank 0
        stopped."""
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        while header[0].item() == _PING:
            self._broadcast(header)
        kind, t, b, n, w = header.tolist()
        if kind == _STOP:
            return None
        if kind == _TRANSFER:
            words = torch.empty(t, dtype=torch.int64, device=self.device)
            self._broadcast(words)
            return TransferOps(words.tolist())
        payload = torch.empty(3 * t + 4 * b + n + 3 * w, dtype=torch.int64, device=self.device)
        self._broadcast(payload)
        ids, pos, loc, rows, seq, pre, ext, logits, writes = payload.split([t, t, t, b, b, b, b, n, 3 * w])
        return StepInputs(
            ForwardMode.DECODE if kind == _DECODE else ForwardMode.EXTEND,
            ids,
            pos,
            loc,
            rows,
            seq,
            pre,
            ext,
            logits,
            writes.reshape(3, w),
            torch.stack([rows, seq, pre, ext]).tolist() if b else [[], [], [], []],
        )

    def _header_only(self, kind: int) -> None:
        header = [kind] + [0] * (_HEADER_LEN - 1)
        self._broadcast(torch.tensor(header, dtype=torch.int64, device=self.device))

    @staticmethod
    def _broadcast(t: torch.Tensor) -> None:
        dist.broadcast(t, src=0)
