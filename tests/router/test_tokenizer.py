"""The router's tokenizer loads on a thread while the router serves (services/router/tokenizer.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.launcher import free_port
from services.router.tokenizer import RouterTokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_encode_waits_for_the_load_and_equals_the_hf_tokenizer(tokenizer_dir: Path) -> None:
    tokenizer = RouterTokenizer(tokenizer_dir)
    text = "the sea, the sky: 42 gulls"
    assert tokenizer.encode(text) == AutoTokenizer.from_pretrained(tokenizer_dir).encode(text)
    assert tokenizer.loaded.done()
    assert tokenizer.encode(text, add_special_tokens=False) == tokenizer.loaded.result().encode(
        text, add_special_tokens=False
    )


def test_on_demand_the_first_encode_loads_it(tokenizer_dir: Path) -> None:
    """`--tokenizer-load on-demand`: nothing is loaded (no thread, no transformers) until a text
    request wants the tokenizer."""
    code = (
        "import sys, threading\n"
        "from services.router.tokenizer import RouterTokenizer\n"
        f"t = RouterTokenizer({str(tokenizer_dir)!r}, 'on-demand')\n"
        "assert not t.loaded.done() and threading.active_count() == 1\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "print(t.encode('the sea'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(AutoTokenizer.from_pretrained(tokenizer_dir).encode("the sea"))


def test_a_tokenizer_that_cannot_load_fails_encode_and_stops_the_router(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tokenizer_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    tokenizer = RouterTokenizer(broken)
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises, encode raises it
        tokenizer.encode("the sea")
    router = [sys.executable, "-m", "services.router", "--model", str(broken)]
    ports = ["--port", str(free_port()), "--admin-port", str(free_port())]
    done = subprocess.run([*router, *ports], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot load the tokenizer of {broken}" in done.stderr
