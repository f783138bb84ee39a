"""The after-commit kick: coalesced per process, never delayed when the process was quiet."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from workers.tasks import KICK_HINT_LIMIT, KickCoalescer


class Sender:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[float, list[int]]] = []
        self.fail = fail
        self.done = threading.Event()

    def __call__(self, ids):
        self.sent.append((time.monotonic(), list(ids)))
        self.done.set()
        if self.fail:
            raise ConnectionError("broker down")


def test_a_kick_after_a_quiet_window_goes_out_at_once():
    sender = Sender()
    kick = KickCoalescer(0.05, sender)
    started = time.monotonic()
    kick([1])
    assert [ids for _, ids in sender.sent] == [[1]]
    assert sender.sent[0][0] - started < 0.01
    time.sleep(0.06)
    kick([2])
    assert [ids for _, ids in sender.sent] == [[1], [2]]


def test_kicks_within_the_window_are_merged_into_one_sent_when_it_closes():
    sender = Sender()
    kick = KickCoalescer(0.05, sender)
    kick([1])
    sender.done.clear()
    kick([2])
    kick([3, 4])
    assert len(sender.sent) == 1  # the merged kick waits for the window
    assert sender.done.wait(1)
    (first, _), (merged_at, merged) = sender.sent
    assert merged == [2, 3, 4]
    assert 0.04 <= merged_at - first < 0.5
    time.sleep(0.06)
    kick([5])  # quiet again: at once
    assert sender.sent[-1][1] == [5]


def test_a_merged_kick_carries_a_bounded_number_of_hints():
    sender = Sender()
    kick = KickCoalescer(0.02, sender)
    kick([0])
    sender.done.clear()
    for i in range(1, 500):
        kick([i])
    assert sender.done.wait(1)
    assert len(sender.sent[-1][1]) == KICK_HINT_LIMIT


def test_a_failed_merged_kick_is_logged_without_ids_and_does_not_raise(caplog):
    sender = Sender(fail=True)
    kick = KickCoalescer(0.02, sender)
    with pytest.raises(ConnectionError):
        kick([1])  # the first kick fails in the caller, whose after-commit hook logs it
    sender.done.clear()
    with caplog.at_level(logging.WARNING, logger="workers.tasks"):
        kick([123456789])
        assert sender.done.wait(1)
        time.sleep(0.05)
    [record] = [r for r in caplog.records if "kick failed" in r.getMessage()]
    assert "123456789" not in record.getMessage() and record.rows == 1


def test_window_zero_sends_every_kick_and_flush_sends_a_waiting_one():
    sender = Sender()
    kick = KickCoalescer(0, sender)
    kick([1])
    kick([2])
    assert [ids for _, ids in sender.sent] == [[1], [2]]
    waiting = Sender()
    kick = KickCoalescer(60, waiting)
    kick([1])
    kick([2])
    kick.flush()  # at exit: the merged kick is not lost with the process
    assert [ids for _, ids in waiting.sent] == [[1], [2]]


def test_a_timer_that_cannot_start_sends_the_kick_at_once_and_keeps_working(monkeypatch):
    sender = Sender()
    kick = KickCoalescer(0.05, sender)
    kick([1])

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Timer, "start", no_thread)
    kick([2])  # within the window, but no timer: sent now instead of wedging the coalescer
    monkeypatch.undo()
    time.sleep(0.06)
    kick([3])
    assert [ids for _, ids in sender.sent] == [[1], [2], [3]]


def test_the_sweep_erases_and_purges_even_when_its_follow_up_kick_fails(monkeypatch):
    from workers import tasks

    calls = []
    store = type(
        "Store",
        (),
        {
            "erase_payloads": lambda self, **kw: calls.append("erase") or 0,
            "purge": lambda self, **kw: calls.append("purge") or 0,
        },
    )()
    report = type(
        "Report",
        (),
        {
            "exhausted": False,
            **dict.fromkeys(("claimed", "sent", "retried", "dead", "expired", "released"), 0),
        },
    )()
    relay = type("Relay", (), {"sweep": lambda self, **kw: report})()
    settings = type(
        "Settings",
        (),
        dict.fromkeys(
            (
                "drain_seconds",
                "phi_retention_seconds",
                "payload_retention_seconds",
                "dead_retention_seconds",
                "row_retention_seconds",
            ),
            1.0,
        ),
    )
    runtime = type("Runtime", (), {"relay": relay, "store": store, "settings": settings})

    def broker_down(ids):
        raise ConnectionError("broker down")

    monkeypatch.setattr(tasks.runtime, "get", lambda: runtime)
    monkeypatch.setattr(tasks, "send_kick", broker_down)
    assert tasks.sweep.run()["erased"] == 0
    assert calls == ["erase", "purge"]
