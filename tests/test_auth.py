"""services/common/auth.py: where secrets come from and how they are checked (no processes; the
real listeners are exercised in tests/suite/test_auth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.auth import API_KEY_ENV, Secrets, bearer_token, load_secrets
from services.gateway.args import parse_args


def test_secrets_come_from_flags_the_environment_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nfile-1\n\n  file-2  \nflag\n")
    monkeypatch.setenv(API_KEY_ENV, " env ")
    secrets = load_secrets(["flag"], [str(keys)], API_KEY_ENV)
    assert secrets.values == ("flag", "env", "file-1", "file-2")  # in order, once each
    assert secrets.first == "flag" and secrets.enabled
    monkeypatch.delenv(API_KEY_ENV)
    assert not load_secrets([], [], API_KEY_ENV).enabled
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no secret"):
        load_secrets([], [str(tmp_path / "empty")], API_KEY_ENV)
    with pytest.raises(ValueError, match="empty secret"):
        load_secrets([" "], [], API_KEY_ENV)


def test_any_configured_secret_is_accepted_as_a_bearer_token() -> None:
    secrets = Secrets(("alpha", "beta"))
    assert secrets.check("alpha") and secrets.check("beta")
    assert not secrets.check("alph") and not secrets.check("alphaa") and not secrets.check(None)
    assert not secrets.check("ünïcode")
    assert secrets.check_bearer("Bearer beta") and secrets.check_bearer("bearer  alpha ")
    assert not secrets.check_bearer("beta") and not secrets.check_bearer("Basic beta")
    assert not secrets.check_bearer("Bearer ") and not secrets.check_bearer(None)
    assert bearer_token("Bearer x y") == "x y"
    assert not Secrets().check("anything")


def test_gateway_sends_its_own_key_to_the_router_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv("TANDEM_ROUTER_API_KEY", raising=False)
    base = ["--router", "r:1", "--tokenizer", "t"]
    assert parse_args(base).api_keys == () and parse_args(base).router_api_key is None
    config = parse_args([*base, "--api-key", "a", "--api-key", "b"])
    assert config.api_keys == ("a", "b") and config.router_api_key == "a"
    assert parse_args([*base, "--api-key", "a", "--router-api-key", "r"]).router_api_key == "r"
    monkeypatch.setenv("TANDEM_ROUTER_API_KEY", "from-env")
    assert parse_args([*base, "--api-key", "a"]).router_api_key == "from-env"
