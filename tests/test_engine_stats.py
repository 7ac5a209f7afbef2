"""A worker's scrape of its engine's stats (`services.worker.metrics.EngineStats`): a busy engine
keeps its series in the graphs with its last answer while that is recent."""

from __future__ import annotations

import logging
from concurrent.futures import Future

import pytest

from services.worker.metrics import EngineStats
from shared.errors import RequestError


def _answered(stats: dict[str, int]) -> Future[dict[str, int]]:
    future: Future[dict[str, int]] = Future()
    future.set_result(stats)
    return future


def test_a_busy_engine_shows_its_last_stats_while_they_are_recent(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    # The engine answers the first scrape, then is in a long step for the next two.
    answers = [_answered({"running_requests": 3}), Future(), Future()]
    stats = EngineStats(lambda: answers.pop(0), timeout=0.01, max_age=15.0, clock=lambda: now[0])
    assert stats() == {"running_requests": 3}
    now[0] = 110.0
    with caplog.at_level(logging.WARNING):
        assert stats() == {"running_requests": 3}  # 10 s old: shown
        assert not caplog.records
        now[0] = 115.5
        assert stats() is None  # 15.5 s old: left out, and said why
    assert "did not report its stats within 0.01 s" in caplog.text
    # Answering again, it is shown again.
    answers.append(_answered({"running_requests": 5}))
    assert stats() == {"running_requests": 5}


def test_an_engine_that_refuses_gives_no_stats_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    refused: Future[dict[str, int]] = Future()
    refused.set_exception(RequestError("the engine is stopping"))
    stats = EngineStats(lambda: refused, timeout=1.0, max_age=15.0)
    with caplog.at_level(logging.WARNING):
        assert stats() is None
    assert "did not report its stats: the engine is stopping" in caplog.text
