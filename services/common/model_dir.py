"""`--model`: a local HF model directory or a Hugging Face Hub id, resolved to a directory before
any service starts, with a one-line message that says what to do instead of a child's traceback.

    model = resolve_model(args.model)        # ModelError(message) when it cannot be used
    model.path                                # the directory every service loads
    model.name                                # the default served model id

A path that exists is used as it is (its name is the model id) and must hold `config.json` (the
gateway and the router need only the tokenizer's files). Anything else of the form `ORG/NAME` or
`ORG/NAME@REVISION` is a hub id (its id, without the revision, is the model id):

    1. the local Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`): a complete snapshot is used with
       no network call;
    2. else, unless `HF_HUB_OFFLINE=1`, the hub: the configs, tokenizer files and `*.safetensors`
       only (not the `.bin`, `.pt`, `.gguf` or ONNX copies many repos carry), into that cache;
       a gated or private repo needs `HF_TOKEN`.

`tandem up` resolves once and hands every service the directory and the id, so workers, router and
gateway agree on both.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# What a hub download fetches: configs, tokenizers (json, sentencepiece, tiktoken, BPE merges,
# chat templates) and safetensors weights; not the other weight formats a repo may also carry.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
HUB_SKIPPED = ["original/*", "onnx/*", "openvino/*", "gguf/*", "*.gguf"]
_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


class ModelError(Exception):
    """`--model` cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Model:
    path: Path  # a local directory
    name: str  # the default served model id: the hub id, or the directory's name


def resolve_model(spec: str, files: Sequence[str] = MODEL_FILES) -> Model:
    """The model `spec` names (see the module docstring), holding one of `files`."""
    where = Path(spec).expanduser()
    hub = _HUB_ID.match(spec)
    if where.exists() or hub is None:
        problem = _dir_problem(where, files)
        if problem is not None:
            raise ModelError(f"not a model directory: {spec} ({problem})")
        return Model(where.resolve(), where.resolve().name)
    repo, revision = hub.group(1), hub.group(2)
    path = Path(_snapshot(repo, revision))
    problem = _dir_problem(path, files)
    if problem is not None:
        raise ModelError(f"{spec} is not a model repo ({path}: {problem})")
    return Model(path, repo)


def _dir_problem(where: Path, files: Sequence[str]) -> str | None:
    if not where.exists():
        return "no such directory; --model takes a local HF model directory or a hub id ORG/NAME"
    if not where.is_dir():
        return "a file, not a directory"
    if not any((where / name).is_file() for name in files):
        return f"it has no {' or '.join(files)}"
    return None


def _snapshot(repo: str, revision: str | None) -> str:
    """The local snapshot of `repo` at `revision`: from the cache, else downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(local_files_only: bool) -> str:
        return snapshot_download(
            repo,
            revision=revision,
            allow_patterns=HUB_FILES,
            ignore_patterns=HUB_SKIPPED,
            local_files_only=local_files_only,
        )

    what = f"{repo}@{revision}" if revision else repo
    try:
        return fetch(local_files_only=True)
    except LocalEntryNotFoundError:  # not cached, or only in part
        pass
    cache = constants.HF_HUB_CACHE
    not_here = f"{what}: no such local directory, and not in the Hugging Face cache ({cache})"
    if constants.is_offline_mode():
        raise ModelError(
            f"{not_here}, and HF_HUB_OFFLINE=1 forbids downloading it; download it where the hub is"
            f" reachable (`hf download {repo}`) or pass a local directory"
        ) from None
    print(f"fetching {what} from the Hugging Face Hub into {cache} ...", file=sys.stderr)
    try:
        return fetch(local_files_only=False)
    except GatedRepoError:
        raise ModelError(
            f"{what} is gated: accept its terms on {constants.ENDPOINT}/{repo} and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{not_here}, and the hub has no model {repo} (a private one needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo} has no revision {revision} on the hub") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = " (set HF_TOKEN)" if status in (401, 403) else ""
        raise ModelError(f"{what}: the hub answered {status}{hint}: {_first_line(e)}") from None
    except LocalEntryNotFoundError as e:  # the hub could not be reached, or failed
        cause = e.__cause__ or e
        failed = "answered" if isinstance(cause, HfHubHTTPError) else "could not be reached"
        raise ModelError(f"{not_here}, and the hub {failed}: {_first_line(cause)}") from None
    except (OSError, ValueError) as e:  # a full disk, an unwritable cache, a bad revision name
        raise ModelError(f"{what}: the download failed: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
