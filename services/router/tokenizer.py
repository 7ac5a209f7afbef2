"""The router's tokenizer, loaded on a thread while the router already serves (or on demand).

Only text-only requests need it (a gRPC client that sends text and no token ids, `Tokenize`,
`Embed` inputs given as text), and loading it takes seconds (transformers, and the torch it
imports). Meanwhile the router answers health checks, registers workers and routes token-id
requests (every gateway request), so a restarted router is back that much sooner. A text
request that comes first waits for the load. `--tokenizer-load on-demand` starts the load at the
first text request instead: a router that only gateways call never loads it. A load that fails
stops the router with the reason (`services/router/__main__.py`), as a failure before it served
would have.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any, Literal

TokenizerLoad = Literal["background", "on-demand"]


class RouterTokenizer:
    """`encode` as the model's Hugging Face tokenizer's, once `loaded` (a future of it) is done;
    the load starts at once (`background`) or at the first `encode` (`on-demand`)."""

    def __init__(self, path: Path, load: TokenizerLoad = "background") -> None:
        self.path = path
        self.loaded: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._started = threading.Lock()  # held once the load has started
        if load == "background":
            self._start()

    def _start(self) -> None:
        if self._started.acquire(blocking=False):
            threading.Thread(target=self._load, name="tokenizer-load", daemon=True).start()

    def _load(self) -> None:
        try:
            from transformers import AutoTokenizer

            self.loaded.set_result(AutoTokenizer.from_pretrained(self.path))
        except BaseException as e:  # handed to whoever waits for the tokenizer
            self.loaded.set_exception(e)

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        """The tokenizer's `encode`; blocks until it is loaded, so call it off the event loop."""
        self._start()
        ids: list[int] = self.loaded.result().encode(text, **kwargs)
        return ids
