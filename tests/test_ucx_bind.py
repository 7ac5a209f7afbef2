"""A worker's KV transfers listen where the worker was told to (services/worker/ucx.py)."""

from __future__ import annotations

import os
import socket

import pytest

from services.worker.ucx import interface_of, keep_kv_transfers_on


def test_loopback_addresses_bind_lo(monkeypatch: pytest.MonkeyPatch) -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
        keep_kv_transfers_on(host)
        assert os.environ["UCX_NET_DEVICES"] == "lo", host


def test_a_wildcard_or_a_set_value_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    keep_kv_transfers_on("0.0.0.0")  # listen everywhere, as asked
    assert "UCX_NET_DEVICES" not in os.environ
    monkeypatch.setenv("UCX_NET_DEVICES", "mlx5_0:1")  # the user's choice wins
    keep_kv_transfers_on("127.0.0.1")
    assert os.environ["UCX_NET_DEVICES"] == "mlx5_0:1"


def test_an_interface_address_binds_that_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None  # held by no interface here
    assert interface_of("not-an-address") is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: picks the outgoing interface, sends nothing
        except OSError:
            pytest.skip("no IPv4 route on this machine")
        local = s.getsockname()[0]
    if local.startswith("127."):
        pytest.skip("only loopback here")
    name = interface_of(local)
    assert name is not None and name != "lo" and name in {n for _, n in socket.if_nameindex()}
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    keep_kv_transfers_on(local)
    assert os.environ["UCX_NET_DEVICES"] == name
