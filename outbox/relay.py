"""The relay loop: claim a batch of due rows, publish it, record every outcome.

Plain Python with two collaborators (a :class:`~outbox.store.Store` and a
:class:`~outbox.publisher.Publisher`), so it runs the same under Celery, in a test, or in a script.

Per-key order inside one claim: the claimed rows are split into lanes by ordering key (one key
always lands in the same lane); each lane publishes its rows in id order, in requests of up to 10
events; lanes run concurrently. When a request fails transiently, the lane stops sending rows of
the failed keys (they are released, not charged an attempt) so nothing overtakes a retrying
event. When a request of several events fails permanently, its events are sent one by one so
that one bad event is dead-lettered alone and never blocks the others.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from outbox.errors import (
    ConfigurationError,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
)
from outbox.publisher import MAX_BATCH_EVENTS, OutgoingEvent, Publisher
from outbox.retry import RetryPolicy
from outbox.store import ClaimedEvent, Failure, Store, new_claimer_id, utcnow

logger = logging.getLogger("outbox.relay")


class RelayObserver(Protocol):
    """Receives what the relay does (metrics). Every method must be cheap and never raise."""

    def request(self, size: int, seconds: float, status: int | None) -> None: ...

    def claimed(self, count: int) -> None: ...

    def sent(self, events: Sequence[ClaimedEvent]) -> None: ...

    def failed(
        self, ev: ClaimedEvent, *, dead: bool, status: int | None, transient: bool
    ) -> None: ...

    def expired(self, count: int, type_names: Sequence[str] = ()) -> None: ...

    def released(self, count: int) -> None: ...

    def leases_lost(self, count: int) -> None: ...


class NullObserver:
    """The default observer: records nothing."""

    def request(self, size: int, seconds: float, status: int | None) -> None:
        pass

    def claimed(self, count: int) -> None:
        pass

    def sent(self, events: Sequence[ClaimedEvent]) -> None:
        pass

    def failed(self, ev: ClaimedEvent, *, dead: bool, status: int | None, transient: bool) -> None:
        pass

    def expired(self, count: int, type_names: Sequence[str] = ()) -> None:
        pass

    def released(self, count: int) -> None:
        pass

    def leases_lost(self, count: int) -> None:
        pass


@dataclass
class RelayReport:
    """What one relay pass did. Counts only; never payloads."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead: int = 0
    expired: int = 0
    released: int = 0
    lost_leases: int = 0
    requests: int = 0
    # The last claim took every claimable row (fewer than it asked for, none held by a
    # concurrent claimer): nothing committed before it started is left for a kick to deliver.
    exhausted: bool = False
    contended: bool = False  # the last claim passed over rows a concurrent claimer held
    sent_events: list[ClaimedEvent] = field(default_factory=list, repr=False)

    def add(self, other: RelayReport) -> None:
        self.claimed += other.claimed
        self.sent += other.sent
        self.retried += other.retried
        self.dead += other.dead
        self.expired += other.expired
        self.released += other.released
        self.lost_leases += other.lost_leases
        self.requests += other.requests
        self.exhausted = other.exhausted
        self.contended = other.contended


# How long a drain pauses before claiming again after a contended, empty claim, and for how
# long in all it keeps trying.
CONTENTION_PAUSE_SECONDS = (0.002, 0.02)
CONTENTION_BUDGET_SECONDS = 0.5

# Time kept in hand for recording outcomes after the last request of a pass.
LEASE_MARGIN_SECONDS = 1.0


class _Lease:
    """The lease of one claim, shared by its lanes.

    Before each request a lane makes sure the lease outlives that request (the publish timeout)
    plus the final write, extending it in the table when needed. A lane whose lease was taken
    over stops at once: its remaining rows belong to another worker now.
    """

    def __init__(
        self,
        store: Store,
        token: str,
        lease_seconds: float,
        needed_seconds: float,
        *,
        started: float,
    ) -> None:
        self.store = store
        self.token = token
        self.lease_seconds = lease_seconds
        self.needed_seconds = needed_seconds
        self.deadline = started + lease_seconds
        self.lost = False
        self.extensions = 0
        self._lock = threading.Lock()

    def ensure(self) -> bool:
        with self._lock:
            if self.lost:
                return False
            if self.deadline - time.monotonic() >= self.needed_seconds:
                return True
            started = time.monotonic()
            try:
                extended = self.store.extend_lease(self.token, lease_seconds=self.lease_seconds)
            except Exception as exc:  # noqa: BLE001 - whether we still own the rows is unknown
                logger.warning(
                    "outbox could not extend a lease; stopped publishing its rows",
                    extra={"error_class": type(exc).__name__},
                )
                extended = 0
            if extended == 0:
                self.lost = True
                return False
            self.extensions += 1
            self.deadline = started + self.lease_seconds
            return True


@dataclass
class _LaneResult:
    sent: list[ClaimedEvent] = field(default_factory=list)
    failed: list[tuple[ClaimedEvent, PublishError]] = field(default_factory=list)
    released: list[ClaimedEvent] = field(default_factory=list)
    requests: int = 0


@dataclass
class _Pass:
    """One claim on its way through the relay: claimed, published by lanes, recorded."""

    report: RelayReport
    token: str
    started_at: float  # monotonic: the claim began (the lease counts from no later than this)
    claimed_at: float
    more: bool = False  # the claim left claimable rows (its limit or its fair share)
    events: list[ClaimedEvent] = field(default_factory=list)  # to publish
    broken: list[Failure] = field(default_factory=list)
    lease: _Lease | None = None
    started: bool = False
    publish_started_at: float = 0.0
    published_at: float = 0.0
    futures: list[Future[_LaneResult]] = field(default_factory=list)
    sent: list[ClaimedEvent] = field(default_factory=list)
    released: list[ClaimedEvent] = field(default_factory=list)
    failed: list[tuple[ClaimedEvent, PublishError]] = field(default_factory=list)

    def failing_keys(self) -> set[str]:
        """Keys with a transient failure in this pass: their later rows must wait."""
        return {ev.ordering_key for ev, error in self.failed if error.transient}


class Relay:
    """Claim → publish → record. Safe to run in many processes at once."""

    def __init__(
        self,
        *,
        store: Store,
        publisher: Publisher,
        retry_policy: RetryPolicy | None = None,
        claim_batch_size: int = 100,
        lease_seconds: float = 30.0,
        publish_concurrency: int = 4,
        phi_retention_seconds: float = 0.0,
        observer: RelayObserver | None = None,
        publish_timeout_seconds: float = 5.0,
    ) -> None:
        if claim_batch_size < 1:
            raise ValueError("claim_batch_size must be at least 1")
        if lease_seconds < publish_timeout_seconds + LEASE_MARGIN_SECONDS:
            raise ConfigurationError(
                f"OUTBOX_LEASE_SECONDS ({lease_seconds:g}) must be at least "
                f"OUTBOX_PUBLISH_TIMEOUT_SECONDS + {LEASE_MARGIN_SECONDS:g} "
                f"({publish_timeout_seconds + LEASE_MARGIN_SECONDS:g}): a lease must outlive "
                "one publish request, or another worker could take rows over mid-request"
            )
        self.publish_timeout_seconds = publish_timeout_seconds
        if publish_concurrency < 1:
            raise ValueError("publish_concurrency must be at least 1")
        self.store = store
        self.publisher = publisher
        self.retry_policy = retry_policy or RetryPolicy()
        self.claim_batch_size = claim_batch_size
        self.lease_seconds = lease_seconds
        self.publish_concurrency = publish_concurrency
        self.erase_phi_now = phi_retention_seconds <= 0
        self.observer: RelayObserver = observer or NullObserver()
        # Lanes always run in threads, so that the relay's own thread can claim and record
        # while they publish.
        self._pool = ThreadPoolExecutor(publish_concurrency, thread_name_prefix="outbox-publish")
        # Wall-clock start of the latest claim that took every claimable row. Every row
        # committed before it was claimed then or is held back by an earlier row of its key
        # (whose relay claims again when done), so a kick sent before it has nothing to add.
        self.caught_up_at = 0.0
        # This relay's id in its lease tokens: claims count the relays at work by it.
        self.claimer = new_claimer_id()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # --- passes ----------------------------------------------------------------------------

    def run_once(self) -> RelayReport:
        """Claim one batch and deliver it. Returns what happened."""
        opened: list[_Pass] = []
        try:
            current = self._claim(opened=opened)
            if current.report.claimed:
                self._start(current, set())
                self._finish(current)
        except BaseException:
            self._abandon(opened)
            raise
        return self._record(current)

    def drain(self, *, max_seconds: float = 10.0) -> RelayReport:
        """Run passes until nothing is due or ``max_seconds`` have passed.

        Passes overlap when there is more to do than one claim takes: while a claim is being
        published, the next rows are claimed (the rows of the keys being published included:
        they follow them) and the previous claim's outcomes are written. The next claim's rows
        are published only once the current ones are done; its rows of a key that failed
        transiently are given back at once. After a claim that took everything due, the relay
        publishes, records, and claims once more: rows of its keys committed meanwhile were held
        back by its own lease, so no one else's claim could take them.

        If anything raises (the database goes away mid-drain), the lanes are waited for and
        what they did is recorded as far as possible before the error propagates, so rows
        already published are not published again and rows claimed ahead are given back.
        """
        deadline = time.monotonic() + max_seconds
        total = RelayReport()
        contended_since: float | None = None
        unrecorded: list[_Pass] = []  # claimed, outcomes not written yet

        def claim(following: str | None = None) -> _Pass:
            return self._claim(following, opened=unrecorded)

        def record(done: _Pass) -> None:
            unrecorded.remove(done)  # first: a pass whose recording failed is not retried
            total.add(self._record(done))

        try:
            current = claim()
            while True:
                if not current.report.claimed:
                    record(current)
                    if not current.report.contended:
                        break
                    # Another transaction holds earlier rows of the keys we would take (claims
                    # are serialized, so an operator's update or a stuck session): claim again
                    # shortly, a bounded number of times, then leave the rows to the sweep
                    # rather than spin.
                    now = time.monotonic()
                    contended_since = now if contended_since is None else contended_since
                    if now - contended_since >= CONTENTION_BUDGET_SECONDS or now >= deadline:
                        total.exhausted = True  # nothing a new kick could do sooner
                        break
                    time.sleep(random.uniform(*CONTENTION_PAUSE_SECONDS))
                    current = claim()
                    continue
                contended_since = None
                if not current.started:
                    self._start(current, set())
                ahead = None
                if current.more and time.monotonic() < deadline:
                    ahead = claim(following=current.token)
                self._finish(current)
                # The claim ahead took time out of the margin kept for recording: the lease
                # must still outlive the writes, or another relay could publish the rows again.
                lost = (
                    bool(current.events)  # rows were published under this lease
                    and current.lease is not None
                    and not current.lease.ensure()
                )
                if ahead is not None:
                    if lost:
                        # Our earlier rows were (or may be) taken over: the next ones could
                        # overtake them now. Give them back unpublished.
                        ahead.released.extend(ahead.events)
                        ahead.events = []
                    elif ahead.report.claimed:
                        # publishes while this pass is recorded
                        self._start(ahead, current.failing_keys())
                record(current)
                if lost:
                    if ahead is not None:
                        record(ahead)
                    total.exhausted = False  # the rows given back are owed to a new task
                    break
                if ahead is not None and ahead.report.claimed:
                    current = ahead
                    continue
                if ahead is not None:
                    record(ahead)
                if time.monotonic() >= deadline:
                    total.exhausted = False
                    break
                current = claim()
        except BaseException:
            self._abandon(unrecorded)
            raise
        return total

    def sweep(self, *, max_seconds: float = 10.0) -> RelayReport:
        """The periodic safety net: reclaim rows of dead workers, expire, then drain.

        Every non-terminal row is reachable from here: ``in_flight`` rows whose lease ran out
        return to ``pending``; ``pending`` rows are claimed or expired.
        """
        reclaimed = self.store.reclaim_expired_leases()
        if reclaimed:
            logger.warning("outbox reclaimed rows whose lease expired", extra={"rows": reclaimed})
        expired = self.store.expire_overdue()
        if expired:
            self.observer.expired(expired)
        report = self.drain(max_seconds=max_seconds)
        report.expired += expired
        return report

    # --- internals -----------------------------------------------------------------------

    def _claim(self, following: str | None = None, *, opened: list[_Pass]) -> _Pass:
        """Claim a batch (see :meth:`Store.claim` for ``following``) and sort it out.

        The pass joins ``opened`` as soon as it exists, before any other database work, so
        that an error from here on still finds its rows to give back.
        """
        claim_started = time.monotonic()  # the lease counts from no later than this
        claim_started_wall = time.time()
        claim = self.store.claim(
            limit=self.claim_batch_size,
            lease_seconds=self.lease_seconds,
            following=following,
            claimer=self.claimer,
        )
        claimed = claim.events
        report = RelayReport(
            claimed=len(claimed),
            contended=claim.contended,
            exhausted=not claim.more and not claim.contended,
        )
        current = _Pass(
            report=report,
            token=claim.token,
            started_at=claim_started,
            claimed_at=time.monotonic(),
            more=claim.more,
        )
        opened.append(current)
        if report.exhausted:
            # Assigned, not max(): a wall clock stepped back must not leave it in the future.
            self.caught_up_at = claim_started_wall
        self.observer.claimed(len(claimed))
        if not claimed:
            return current
        late: list[ClaimedEvent] = []
        for ev in claimed:
            if ev.overdue:
                late.append(ev)
            elif ev.data is None:
                current.broken.append(
                    Failure(ev, "payload missing (erased before delivery); cannot publish", None)
                )
            else:
                current.events.append(ev)
        try:
            expired_now = self.store.expire(late)
        except BaseException:
            current.released.extend(late)  # given back with the rest by the caller's cleanup
            raise
        report.expired += expired_now
        if expired_now:
            self.observer.expired(expired_now, [ev.type_name for ev in late])
        current.lease = _Lease(
            self.store,
            claim.token,
            self.lease_seconds,
            self.publish_timeout_seconds + LEASE_MARGIN_SECONDS,
            started=claim_started,
        )
        return current

    def _start(self, current: _Pass, blocked: set[str]) -> None:
        """Start publishing a pass in its lanes.

        Rows of ``blocked`` keys (an earlier row failed transiently after this pass was claimed)
        are given back at once, before the next claim: it must find them pending, ahead of
        their key's later rows, whether the failed row now waits for a retry or was dead-lettered.
        """
        current.publish_started_at = time.monotonic()
        live: list[ClaimedEvent] = []
        held: list[ClaimedEvent] = []
        for ev in current.events:
            (held if ev.ordering_key in blocked else live).append(ev)
        if held:
            current.report.released += self.store.release(held)
        lease = current.lease
        assert lease is not None
        current.futures = [
            self._pool.submit(self._publish_lane, lane, lease) for lane in self._lanes(live)
        ]
        current.started = True  # only now: an error before this gives every row back

    def _finish(self, current: _Pass) -> None:
        """Wait for every lane of a pass and collect what they did."""
        while current.futures:  # taken off as collected: an interrupted wait is resumed once
            future = current.futures.pop(0)
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - lanes catch everything; belt and braces
                logger.error(
                    "outbox publishing lane failed; its rows return when their lease expires",
                    extra={"error_class": type(exc).__name__},
                )
                continue
            current.sent.extend(result.sent)
            current.released.extend(result.released)
            current.failed.extend(result.failed)
            current.report.requests += result.requests
        current.published_at = time.monotonic()
        if current.lease is not None and current.lease.lost:
            logger.warning(
                "outbox lease taken over during a pass; stopped publishing its rows",
                extra={"rows": len(current.events)},
            )

    def _abandon(self, passes: Sequence[_Pass]) -> None:
        """After an error: wait for the lanes and write what is known, as far as possible."""
        for done in list(passes):
            if done.futures:
                self._finish(done)
            if not done.started:
                done.released.extend(done.events)
                done.events = []
            try:
                self._record(done)
            except Exception as exc:  # noqa: BLE001 - the original error is what propagates
                logger.warning(
                    "outbox could not record a pass after an error; its rows return to the "
                    "queue when their lease expires",
                    extra={"error_class": type(exc).__name__, "rows": done.report.claimed},
                )

    def _record(self, current: _Pass) -> RelayReport:
        """Write a finished pass's outcomes; returns its report."""
        report = current.report
        recording_started = time.monotonic()
        sent = current.sent
        # Retry delays (and Retry-After) count from the answers, not from the claim: a pass can
        # last several publish timeouts before its last request fails.
        answered_at = utcnow()
        failures = current.broken + [
            self._decide(ev, error, answered_at) for ev, error in current.failed
        ]
        owned = self.store.mark_sent(sent, erase_phi_now=self.erase_phi_now)
        report.sent = len(sent)
        report.sent_events = sent
        report.lost_leases += len(sent) - owned
        report.released += self.store.release(current.released)
        self.store.record_failures(failures)
        report.dead = sum(1 for f in failures if f.retry_in_seconds is None)
        report.retried = len(failures) - report.dead
        if not report.claimed:
            return report
        self.observer.sent(sent)
        self.observer.released(report.released)
        self.observer.leases_lost(report.lost_leases)
        for failure in failures:
            self.observer.failed(
                failure.event,
                dead=failure.retry_in_seconds is None,
                status=failure.status_code,
                transient=failure.retry_in_seconds is not None,
            )
        if report.lost_leases:
            logger.warning(
                "outbox lease lost before recording; another worker took the rows over",
                extra={"rows": report.lost_leases},
            )
        for failure in failures:
            logger.warning(
                "outbox publish failed",
                extra={
                    "event_id": failure.event.event_id,
                    "type": failure.event.type_name,
                    "attempt": failure.event.attempts,
                    "outcome": "dead" if failure.retry_in_seconds is None else "retry",
                    "reason": failure.reason,
                },
            )
        if logger.isEnabledFor(logging.DEBUG):
            published_at = current.published_at or recording_started
            publish_started_at = current.publish_started_at or published_at
            logger.debug(
                "outbox pass",
                extra={
                    "claimed": report.claimed,
                    "sent": report.sent,
                    "requests": report.requests,
                    "claim_ms": round((current.claimed_at - current.started_at) * 1000, 1),
                    "publish_ms": round((published_at - publish_started_at) * 1000, 1),
                    "record_ms": round((time.monotonic() - recording_started) * 1000, 1),
                },
            )
        return report

    def _lanes(self, claimed: Sequence[ClaimedEvent]) -> list[list[ClaimedEvent]]:
        """Split rows into at most ``publish_concurrency`` lanes, every key in one lane.

        Keys go to the least loaded lane, biggest first, so that lanes finish together (with
        a hash of the key, 16 keys over 4 lanes often gave one lane twice the rows of another).
        """
        by_key: dict[str, list[ClaimedEvent]] = {}
        for ev in claimed:
            by_key.setdefault(ev.ordering_key, []).append(ev)
        lanes: list[list[ClaimedEvent]] = [
            [] for _ in range(min(self.publish_concurrency, len(by_key)))
        ]
        for rows in sorted(by_key.values(), key=len, reverse=True):
            min(lanes, key=len).extend(rows)
        return [sorted(lane, key=lambda ev: ev.id) for lane in lanes]

    def _publish_lane(self, lane: Sequence[ClaimedEvent], lease: _Lease) -> _LaneResult:
        """Publish one lane in order; see the module docstring for the failure rules."""
        result = _LaneResult()
        queue = deque(lane)
        blocked: set[str] = set()
        singles = 0  # events left to send one by one after a permanent batch failure
        while queue:
            if not lease.ensure():
                break  # taken over: the remaining rows are another worker's now
            chunk: list[ClaimedEvent] = []
            limit = 1 if singles else MAX_BATCH_EVENTS
            while queue and len(chunk) < limit:
                ev = queue.popleft()
                if ev.ordering_key in blocked:
                    result.released.append(ev)
                else:
                    chunk.append(ev)
            if not chunk:
                break
            singles = max(singles - len(chunk), 0)
            started = time.perf_counter()
            error: PublishError
            try:
                result.requests += 1
                self.publisher.publish_batch(
                    [
                        OutgoingEvent(
                            ev.channel, ev.event_name, ev.data or "", ev.exclude_socket_id
                        )
                        for ev in chunk
                    ]
                )
            except PublishError as failure:
                error = failure
            except Exception as exc:  # noqa: BLE001 - a bug must not lose the lane's other results
                # Delivery unknown: charge an attempt (retried with backoff, dead-lettered in
                # the end) rather than loop on it. The class only: texts may carry data.
                logger.error(
                    "outbox publisher raised an unexpected error",
                    extra={"error_class": type(exc).__name__},
                )
                error = TransientPublishError(
                    f"unexpected {type(exc).__name__} while publishing; delivery unknown"
                )
            else:
                self.observer.request(len(chunk), time.perf_counter() - started, 200)
                result.sent.extend(chunk)
                continue
            self.observer.request(len(chunk), time.perf_counter() - started, error.status)
            if isinstance(error, PermanentPublishError) and len(chunk) > 1:
                singles = len(chunk)
                queue.extendleft(reversed(chunk))
                continue
            for ev in chunk:
                result.failed.append((ev, error))
                if error.transient:
                    blocked.add(ev.ordering_key)
        return result

    def _decide(self, ev: ClaimedEvent, error: PublishError, now: dt.datetime) -> Failure:
        age = (now - ev.created_at).total_seconds()
        delay = self.retry_policy.next_delay(attempts=ev.attempts, age_seconds=age, error=error)
        reason = error.reason
        if delay is None and error.transient:
            reason = f"{reason} (gave up after {ev.attempts} attempts)"
        return Failure(ev, reason, delay, error.status)
