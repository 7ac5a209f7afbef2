"""The gateway's small endpoints: /version."""

from __future__ import annotations

import httpx

from services.version import tandem_version


def test_version(http: httpx.Client) -> None:
    response = http.get("/version")
    assert response.status_code == 200
    assert response.json() == {"version": tandem_version()}
