"""What the gateway's request validation costs a completion request, by prompt length, on the CPU.

Every request's body goes through pydantic (`CompletionRequest.model_validate`) and the gateway's
own checks (valid Unicode everywhere, token ids in range) on the gateway's one event loop, before
the router hears of it: under load that time is on every request's way in.

    PYTHONPATH=. python bench/gateway_validate.py [--prompt-lens 16,1024,8192] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.gateway.protocol import CompletionRequest


def per_request_us(prompt_len: int, repeat: int) -> float:
    body = {
        "model": "m",
        "prompt": list(range(1000, 1000 + prompt_len)),
        "max_tokens": 128,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for _ in range(min(50, repeat)):
        CompletionRequest.model_validate(body).prompts()
    start = time.perf_counter()
    for _ in range(repeat):
        CompletionRequest.model_validate(body).prompts()
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--prompt-lens", default="16,1024,8192")
    p.add_argument("--repeat", type=int, default=2000)
    args = p.parse_args()
    for n in (int(x) for x in args.prompt_lens.split(",")):
        repeat = max(1, args.repeat * 1024 // max(n, 1024))  # about the same time for each length
        print(f"{n:>6}-token prompt: {per_request_us(n, repeat):7.1f} us a request")


if __name__ == "__main__":
    main()
