"""The `tandem` command line.

    tandem up [--model DIR|ORG/NAME] [--port 8000] [--prefill N] [--decode M]
                                 the whole suite: router, workers, OpenAI gateway (see launcher.py)
    tandem demo [--model DIR|ORG/NAME] [engine flags]
                                 run the offline engine on a model (default: a tiny local one)
    tandem --version             the installed version

Without `--model`, a tiny random-weight Llama is built once under $TANDEM_HOME (default
~/.cache/tandem) so that everything runs with no model hub and no download.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from services.common.model_dir import ModelError, resolve_model
from services.version import tandem_version
from shared import config_cli
from shared.config import EngineConfig


def tandem_home() -> Path:
    home = Path(os.environ.get("TANDEM_HOME", Path.home() / ".cache" / "tandem"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_model_path() -> Path:
    """The default tiny model, built on first use (a few seconds)."""
    path = tandem_home() / "models" / "tiny-llama"
    if not (path / "config.json").exists():
        from shared.tiny_model import make_tiny_model

        print(f"building the default tiny model in {path} ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        make_tiny_model(tmp, "llama", seed=0, num_hidden_layers=4, hidden_size=128, intermediate_size=256)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _demo(args: argparse.Namespace) -> int:
    from shared import Engine

    try:
        model = resolve_model(args.model).path if args.model else default_model_path()
    except ModelError as e:
        print(f"tandem demo: error: {e}", file=sys.stderr)
        return 2
    print(f"model: {model}", flush=True)
    if not args.model:
        print("(random weights, so the text is noise; pass --model DIR for a real checkpoint)")
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away,",
        "The three primary colors are",
    ]
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.7, "top_p": 0.9, "seed": 0}
    try:
        engine = Engine(model_path=str(model), **config_cli.options(args, EngineConfig, "unified"))
    except ValueError as e:  # a bad engine option: say so, like argparse, without a traceback
        print(f"tandem demo: error: {e}", file=sys.stderr)
        return 2
    with engine:
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
        assert isinstance(outs, list)
        for prompt, out in zip(prompts, outs):
            meta = out["meta_info"]
            print(
                f"\n>>> {prompt!r}\n{out['text']!r}\n    [{meta['completion_tokens']} tokens, "
                f"finish {meta['finish_reason']}]"
            )
        total = sum(o["meta_info"]["completion_tokens"] for o in outs)
        print(f"\nbatch of {len(prompts)}: {total} tokens in {elapsed:.2f}s ({total / elapsed:.0f} tok/s)")
        print("\nstreaming:", end=" ", flush=True)
        stream = engine.generate(prompts[0], params, stream=True)
        assert not isinstance(stream, dict | list)
        for chunk in stream:
            print(chunk["text"], end="", flush=True)
        print()
    return 0


# `tandem up`'s flags whose value is other flags: a value of one flag alone ("--worker-args
# --disable-radix-cache") would read as a flag to argparse, so it is attached with "=".
_FLAG_VALUED = ("--worker-args", "--prefill-args", "--decode-args", "--router-args", "--gateway-args")


def _attach_flag_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _FLAG_VALUED and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"tandem {tandem_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    from services.launcher import add_arguments, up

    up_parser = sub.add_parser("up", help="start router, workers and the OpenAI gateway on this machine")
    add_arguments(up_parser)
    up_parser.set_defaults(func=up)
    demo = sub.add_parser("demo", help="run the offline engine on a model")
    demo.add_argument(
        "--model", help="HF model directory or hub id ORG/NAME[@REVISION] (default: a tiny local model)"
    )
    demo.add_argument("--max-new-tokens", type=int, default=32)
    engine = demo.add_argument_group("engine", "options of the engine (shared/config.py:EngineConfig)")
    config_cli.add_arguments(engine, EngineConfig, "unified")
    demo.set_defaults(func=_demo)
    args, unknown = parser.parse_known_args(_attach_flag_values(sys.argv[1:] if argv is None else argv))
    if unknown:
        where = up_parser if args.command == "up" else demo
        hint = f" (a service's own flags go in {', '.join(_FLAG_VALUED[:-1])} or {_FLAG_VALUED[-1]})"
        where.error(f"unrecognized arguments: {' '.join(unknown)}" + (hint if args.command == "up" else ""))
    logging.basicConfig(level=logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
