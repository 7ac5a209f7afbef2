"""`python -m services.decode`: a decode worker."""

from __future__ import annotations

import asyncio

from services.decode.handler import add_servicers
from services.worker.args import parse_args
from services.worker.server import serve


def main() -> None:
    asyncio.run(serve(parse_args("decode"), "decode", add_servicers))


if __name__ == "__main__":
    main()
