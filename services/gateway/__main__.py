"""`python -m services.gateway --router HOST:PORT --tokenizer MODEL_DIR|ORG/NAME [--port 8000]`."""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys

import uvicorn

from services.common.model_dir import TOKENIZER_FILES, ModelError, resolve_model
from services.common.parent import die_with_launcher
from services.gateway.args import parse_args


class _Server(uvicorn.Server):
    """uvicorn's server, saying once it listens (services/launcher.py waits for the line: an
    answer on the port alone could be another process's)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"tandem gateway listening on {self.config.host}:{self.config.port}", flush=True)


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
    from services.gateway.http import shared_socket, uvicorn_config
    from services.gateway.server import create_app  # heavy (transformers): not needed for --help

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = _Server(uvicorn_config(create_app(config), config))
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
