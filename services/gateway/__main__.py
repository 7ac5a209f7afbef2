"""`python -m services.gateway --router HOST:PORT --tokenizer MODEL_DIR|ORG/NAME [--port 8000]`."""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from services.common.model_dir import TOKENIZER_FILES, ModelError, resolve_model
from services.common.parent import die_with_launcher
from services.gateway.args import parse_args

if TYPE_CHECKING:
    from fastapi import FastAPI


class _Server(uvicorn.Server):
    """uvicorn's server, saying once it listens (services/launcher.py waits for the line: an
    answer on the port alone could be another process's), and stopping on a signal during the
    app's start-up too (`stop_starting`)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"tandem gateway listening on {self.config.host}:{self.config.port}", flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if not self.started:
            from services.gateway.server import stop_starting  # imported by now

            stop_starting(self.app)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until interrupted."""
    config = parse_args(argv)
    try:  # a hub id resolves to its local snapshot here, before transformers sees it
        tokenizer = resolve_model(config.tokenizer, TOKENIZER_FILES).path
    except ModelError as e:
        problem = str(e).replace("--model", "--tokenizer")
        print(f"python -m services.gateway: error: {problem}", file=sys.stderr)
        return 2
    config = dataclasses.replace(config, tokenizer=str(tokenizer))
    die_with_launcher()
    try:
        from services.gateway.http import shared_socket, uvicorn_config
        from services.gateway.server import create_app  # heavy (transformers): not for --help
    except KeyboardInterrupt:  # Ctrl-C while importing: a normal stop, no traceback
        return 0

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(config)
    server = _Server(uvicorn_config(app, config), app)
    try:
        sockets = [shared_socket(config.host, config.port)] if config.reuse_port else None
    except OSError as e:  # e.g. the port is held by a process that does not share it
        where = f"{config.host}:{config.port}"
        print(f"python -m services.gateway: error: cannot listen on {where}: {e}", file=sys.stderr)
        return 1
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        # uvicorn re-raises the SIGINT it shut down gracefully on; Ctrl-C is a normal way to stop.
        return 0
    # uvicorn returns (rather than raising) when startup fails, e.g. the router never answered.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
