"""Command line: `python -m shared.tiny_model --arch llama --out DIR` writes a tiny checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from shared.tiny_model.maker import ARCHS, make_tiny_model

# CLI flag -> HF config key; only flags the user gave become overrides.
_SHAPE_FLAGS = {
    "hidden_size": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "vocab_size": "vocab_size",
    "shards": "shards",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the tiny-model command line."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.tiny_model",
        description="Write a tiny random-weight Hugging Face model directory (no downloads).",
    )
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="model architecture")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--hidden-size", type=int, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 2)")
    parser.add_argument("--heads", type=int, help="attention heads (default 4)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default 2)")
    parser.add_argument("--head-dim", type=int, help="head dim (default hidden/heads)")
    parser.add_argument("--intermediate-size", type=int, help="MLP size (default 128)")
    parser.add_argument("--max-position-embeddings", type=int, help="context (default 1024)")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocab to train (default 512)")
    parser.add_argument("--shards", type=int, help="number of safetensors shards (default 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the model directory the arguments describe and print its path."""
    args = parse_args(argv)
    overrides: dict[str, Any] = {
        key: getattr(args, flag) for flag, key in _SHAPE_FLAGS.items() if getattr(args, flag) is not None
    }
    out = make_tiny_model(args.out, arch=args.arch, seed=args.seed, **overrides)
    print(out)


if __name__ == "__main__":
    main()
