"""Structured logs: one JSON object per line, on the stderr of the moment."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from shared.logs import configure_logging, event


@pytest.fixture
def configured() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("INFO")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_lines_are_json_with_the_event_fields(configured: None, monkeypatch: pytest.MonkeyPatch) -> None:
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    event(logging.getLogger("vitrine.test"), "recommend", user_id="u1", k=10)
    line = json.loads(captured.getvalue())
    assert (line["msg"], line["user_id"], line["k"], line["level"]) == ("recommend", "u1", 10, "info")


def test_a_thread_logging_after_stderr_was_swapped_and_closed_writes_to_the_new_one(
    configured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background thread (e.g. the ranker's tree compiler) may log after whoever owned
    stderr at configuration time closed it: the line goes to the current stderr, with no
    '--- Logging error ---'."""
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    event(logging.getLogger("vitrine.test"), "before")
    monkeypatch.setattr(sys, "stderr", second)
    first.close()
    thread = threading.Thread(target=lambda: event(logging.getLogger("vitrine.test"), "compiled ranker ready"))
    thread.start()
    thread.join()
    assert [json.loads(line)["msg"] for line in second.getvalue().splitlines()] == ["compiled ranker ready"]
