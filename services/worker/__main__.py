"""`python -m services.worker`: a unified worker (prefill and decode in one engine)."""

from __future__ import annotations

import asyncio

from services.worker.args import parse_args
from services.worker.server import serve


def main() -> None:
    asyncio.run(serve(parse_args("unified"), "unified"))


if __name__ == "__main__":
    main()
