"""Fixtures of the end-to-end suite tests. A module that runs `tandem up` defines its own
module-scoped `up` fixture (the ready-file's endpoints); `client` talks to that module's gateway."""

from __future__ import annotations

from typing import Any

import openai
import pytest


@pytest.fixture(scope="module")
def client(up: dict[str, Any]) -> openai.OpenAI:
    """The official OpenAI client on this module's `tandem up` gateway."""
    return openai.OpenAI(base_url=up["openai"], api_key="unused", max_retries=0)
