"""`--model` names a local HF model directory: checked before any service starts, with a message
that says what to do instead of a traceback from a child process.

Tandem never downloads: its machines may have no hub access, and a model is a directory an
operator placed (`huggingface-cli download ID --local-dir DIR` where the hub is reachable).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def model_dir_problem(path: str, files: Sequence[str] = MODEL_FILES) -> str | None:
    """What is wrong with `path` as a model directory holding one of `files`; None when nothing."""
    where = Path(path).expanduser()
    if where.is_dir():
        if any((where / name).is_file() for name in files):
            return None
        return f"{path} is not a model directory: it has no {' or '.join(files)}"
    what = "is a file, not a directory" if where.exists() else "no such directory"
    hub_id = path if _looks_like_hub_id(path) and not where.exists() else "ID"
    return (
        f"{path}: {what}; Tandem loads local HF directories; download with "
        f"`huggingface-cli download {hub_id} --local-dir DIR` and pass --model DIR"
    )


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))
