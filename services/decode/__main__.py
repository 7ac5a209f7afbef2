"""`python -m services.decode`: a decode worker."""

from __future__ import annotations

from services.common import event_loop
from services.decode.handler import add_servicers
from services.worker.args import command_line
from services.worker.server import serve


def main() -> None:
    event_loop.run(serve(command_line("decode"), "decode", add_servicers))


if __name__ == "__main__":
    main()
