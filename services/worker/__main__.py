"""`python -m services.worker`: a unified worker (prefill and decode in one engine)."""

from __future__ import annotations

from services.common import event_loop
from services.worker.args import command_line
from services.worker.server import serve


def main() -> None:
    event_loop.run(serve(command_line("unified"), "unified"))


if __name__ == "__main__":
    main()
