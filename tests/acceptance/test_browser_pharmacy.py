"""The pharmacists' page in a real browser: what our Python relay encrypts, pusher-js decrypts.

The services are the example's own, started exactly as ``make demo`` starts them
(:func:`examples.pharmacy.demo.start_stack`): soketi, an SQLite outbox, a real Celery relay
worker and beat on the embedded broker, and the app under uvicorn. The page is the app's static
page with the official pusher-js (encryption build, from ``node_modules``) and the client kit
(``clients/js``), in Debian's chromium driven by Playwright.

Screenshots go to ``artifacts/`` (gitignored).
"""

from __future__ import annotations

import base64
import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from examples.pharmacy.demo import Deadline, Processes, Stack, fake_order, start_stack
from outbox.models import audit, events
from outbox.producer import encode_envelope
from outbox.publisher import OutgoingEvent, PusherPublisher
from outbox.testing.soketi import SoketiError
from tests.conftest import REPO_ROOT, service_missing

ARTIFACTS = REPO_ROOT / "artifacts"
STARTUP_SECONDS = 60
WAIT_MS = 20_000
PAGE_TIMEOUT_MS = 15_000

pytestmark = [pytest.mark.soketi, pytest.mark.slow]


# --- services and pages ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The example's services for this module; all stopped afterwards, also on failure."""
    if not (REPO_ROOT / "node_modules/pusher-js/dist/web/pusher-with-encryption.min.js").is_file():
        service_missing("node_modules/pusher-js is missing: run `make install` (npm ci)")
    workdir = tmp_path_factory.mktemp("pharmacy-browser")
    with contextlib.ExitStack() as exit_stack:
        try:
            services = start_stack(
                workdir, Processes(), exit_stack, Deadline(STARTUP_SECONDS), lambda _: None
            )
        except SoketiError as exc:
            service_missing(f"soketi unavailable: {exc}")
        yield services


@pytest.fixture(scope="module")
def publisher(stack: Stack) -> PusherPublisher:
    """A publisher with the relay's own credentials and master key (for forced re-sends)."""
    env = stack.env
    return PusherPublisher(
        app_id=env["PUSHER_APP_ID"],
        key=env["PUSHER_KEY"],
        secret=env["PUSHER_SECRET"],
        host=env["PUSHER_HOST"],
        port=int(env["PUSHER_PORT"]),
        ssl=False,
        encryption_master_key=base64.b64decode(env["PUSHER_ENCRYPTION_MASTER_KEY_BASE64"]),
    )


@dataclass
class Created:
    order_id: str
    event_ids: list[str]
    details: dict[str, Any]


@dataclass
class PharmacyPage:
    """One pharmacist's page, with everything it wrote to the console."""

    page: Any
    pharmacy_id: str
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def state(self, expression: str) -> Any:
        return self.page.evaluate(f"window.pharmacyPage.{expression}")

    def order_ids(self) -> list[str]:
        ids: list[str] = self.state("orderIds()")
        return ids

    def feeds(self) -> list[dict[str, Any]]:
        feeds: list[dict[str, Any]] = self.state("feeds()")
        return feeds

    def total(self, stat: str) -> int:
        return sum(feed["stats"][stat] for feed in self.feeds())

    def row(self, order_id: str) -> Any:
        return self.page.locator(f'#orders tbody tr[data-order-id="{order_id}"]')

    def wait_live(self) -> None:
        from playwright.sync_api import expect

        expect(self.page.locator("#connection")).to_have_attribute(
            "data-state", "live", timeout=WAIT_MS
        )

    def wait_shown(self, orders: Sequence[Created]) -> None:
        """Every order is on the page with its details (decrypted or fetched by id)."""
        from playwright.sync_api import expect

        for order in orders:
            row = self.row(order.order_id)
            expect(row).to_have_count(1, timeout=WAIT_MS)
            expect(row.locator("td.patient")).to_have_text(
                order.details["patient_name"], timeout=WAIT_MS
            )
            expect(row.locator("td.medication")).to_have_text(order.details["medication"])

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.fixture
def open_page(browser: Any, stack: Stack) -> Iterator[Callable[..., PharmacyPage]]:
    """Open a pharmacist's page (``/#token=…``); every context is closed after the test."""
    contexts: list[Any] = []

    def open_(
        pharmacy_id: str, *, as_pharmacist_of: str | None = None, query: str = ""
    ) -> PharmacyPage:
        token = stack.seeded.pharmacists[as_pharmacist_of or pharmacy_id].token
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        opened = PharmacyPage(page, pharmacy_id)
        page.on("console", lambda message: _console(opened, message))
        page.on("pageerror", lambda exc: opened.errors.append(f"pageerror: {exc}"))
        # As `make demo SERVE=1` prints it: the token in the fragment, never sent to the server.
        page.goto(f"{stack.base_url}/{query}#token={token}", timeout=PAGE_TIMEOUT_MS)
        opened.wait_live()
        assert token not in page.url, "the page keeps the token out of the address bar"
        return opened

    yield open_
    for context in contexts:
        with contextlib.suppress(Exception):
            context.close()


def _console(page: PharmacyPage, message: Any) -> None:
    page.console.append(message.text)
    if message.type == "error":
        page.errors.append(message.text)


_rng = random.Random()


def create_orders(stack: Stack, pharmacy_id: str, count: int) -> list[Created]:
    created = []
    for _ in range(count):
        details = fake_order(_rng)
        answer = stack.create_order(pharmacy_id, details)
        created.append(Created(answer["order_id"], answer["event_ids"], details))
    return created


def wait_sent(stack: Stack, orders: Sequence[Created], timeout: float = 20.0) -> None:
    """Wait until the relay published (and recorded) every event of ``orders``."""
    ids = [event_id for order in orders for event_id in order.event_ids]
    end = time.monotonic() + timeout
    while True:
        with stack.engine.connect() as conn:
            statuses = conn.execute(
                sa.select(events.c.status).where(events.c.event_id.in_(ids))
            ).scalars()
            if sorted(statuses) == ["sent"] * len(ids):
                return
        stack.processes.check_alive()
        assert time.monotonic() < end, f"events not sent within {timeout:g}s"
        time.sleep(0.1)


def assert_in_creation_order(page: PharmacyPage, orders: Sequence[Created]) -> None:
    """Exactly once each, newest first (other tests' orders may be on the page too)."""
    shown = page.order_ids()
    ours = [order_id for order_id in shown if order_id in {o.order_id for o in orders}]
    assert ours == [o.order_id for o in reversed(orders)]
    assert len(shown) == len(set(shown))
    for order in orders:
        assert page.row(order.order_id).count() == 1


def assert_delivered_in_seq_order(page: PharmacyPage) -> None:
    """Per channel the kit handed over seq n, n+1, n+2, ...: no repeat, no hole."""
    delivered: dict[str, list[int]] = page.state("delivered")
    assert len(delivered) == 2
    for channel, seqs in delivered.items():
        assert pharmacy_channel_owner(channel) == page.pharmacy_id
        if seqs:
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), channel


def pharmacy_channel_owner(channel: str) -> str:
    return channel.rsplit("-", 1)[-1]


def assert_no_phi_in_console_or_logs(
    pages: Sequence[PharmacyPage], orders: Sequence[Created], workdir: Path
) -> None:
    needles = {o.details["patient_name"] for o in orders} | {
        o.details["medication"] for o in orders
    }
    for page in pages:
        leaked = [text for text in page.console if any(n in text for n in needles)]
        assert leaked == [], "the page wrote order details to the console"
    for log in workdir.glob("*.log"):
        text = log.read_text(encoding="utf-8", errors="replace")
        assert not [n for n in needles if n in text], f"order details in {log.name}"


# --- tests -----------------------------------------------------------------------------------


def test_orders_created_by_the_app_appear_live_decrypted_by_pusher_js(
    open_page: Callable[..., PharmacyPage], stack: Stack
) -> None:
    first, _ = stack.seeded.pharmacies
    page = open_page(first)
    decrypted_before = page.state("decrypted")

    orders = create_orders(stack, first, 3)

    page.wait_shown(orders)
    assert_in_creation_order(page, orders)
    # order.details came encrypted by our relay (PyNaCl via the pusher SDK) and pusher-js's
    # encryption build decrypted every one of them in the browser.
    wait_for(lambda: page.state("decrypted") - decrypted_before == 3, "3 decrypted events")
    assert_delivered_in_seq_order(page)
    assert page.errors == []
    page.page.wait_for_timeout(600)  # the fresh-row highlight fades
    page.screenshot("pharmacy-live.png")
    assert_no_phi_in_console_or_logs([page], orders, stack.workdir)
    # The token rode in the URL's fragment: no request, so no access log line, carried it.
    assert stack.seeded.pharmacists[first].token not in (stack.workdir / "app.log").read_text()


def test_another_pharmacys_pharmacist_is_denied_and_never_sees_the_orders(
    open_page: Callable[..., PharmacyPage], stack: Stack
) -> None:
    from playwright.sync_api import expect

    first, second = stack.seeded.pharmacies
    intruder = open_page(second, query=f"?pharmacy={first}")
    owner = open_page(first)

    result = intruder.page.locator("#access-result")
    expect(result).to_have_attribute("data-result", "denied", timeout=WAIT_MS)
    expect(result.locator('li[data-outcome="denied"]')).to_have_count(2)
    expect(result).to_contain_text("Access denied (HTTP 403)")
    expect(intruder.page.locator("#denied-banner")).to_be_visible()
    orders = create_orders(stack, first, 2)
    owner.wait_shown(orders)
    wait_sent(stack, orders)
    intruder.page.wait_for_timeout(1_000)

    assert not {o.order_id for o in orders} & set(intruder.order_ids())
    body = intruder.page.locator("body").inner_text()
    assert not [o for o in orders if o.details["patient_name"] in body]
    assert {pharmacy_channel_owner(f["channel"]) for f in intruder.feeds()} == {second}
    with stack.engine.connect() as conn:
        decisions = set(
            conn.execute(
                sa.select(audit.c.decision).where(
                    audit.c.channel.in_(
                        [f"private-pharmacy-{first}", f"private-encrypted-pharmacy-{first}"]
                    ),
                    audit.c.user_ref == stack.seeded.pharmacists[second].user_id,
                )
            ).scalars()
        )
    assert decisions == {"deny"}
    # Chromium reports the two refused /pusher/auth requests as errors: expected here.
    assert [e for e in intruder.errors if "403" not in e] == []
    intruder.screenshot("pharmacy-denied.png")
    assert_no_phi_in_console_or_logs([intruder, owner], orders, stack.workdir)


def test_orders_created_while_offline_appear_once_each_in_order_after_reconnecting(
    open_page: Callable[..., PharmacyPage], stack: Stack
) -> None:
    from playwright.sync_api import expect

    first, _ = stack.seeded.pharmacies
    page = open_page(first)
    caught_up_before = page.total("caughtUp")

    page.page.click("#toggle-connection")  # pusher.disconnect(): the websocket is gone
    expect(page.page.locator("#connection")).to_have_attribute("data-state", "offline")
    wait_for(lambda: page.state("connectionState") == "disconnected", "the socket to close")
    orders = create_orders(stack, first, 4)
    wait_sent(stack, orders)  # published while the page was away: missed live
    page.page.wait_for_timeout(500)
    assert not {o.order_id for o in orders} & set(page.order_ids())
    page.screenshot("pharmacy-offline.png")

    page.page.click("#toggle-connection")  # pusher.connect(): resubscribes, the kit catches up

    page.wait_shown(orders)
    page.wait_live()
    assert_in_creation_order(page, orders)
    assert_delivered_in_seq_order(page)
    # 4 order.created with their ids, 4 order.details whose PHI the server had already erased.
    assert page.total("caughtUp") - caught_up_before >= 8
    assert page.errors == []
    page.page.wait_for_timeout(600)
    page.screenshot("pharmacy-after-reconnect.png")
    assert_no_phi_in_console_or_logs([page], orders, stack.workdir)


def test_a_forced_duplicate_publish_is_shown_once(
    open_page: Callable[..., PharmacyPage], stack: Stack, publisher: PusherPublisher
) -> None:
    first, _ = stack.seeded.pharmacies
    page = open_page(first)
    [order] = create_orders(stack, first, 1)
    page.wait_shown([order])
    wait_sent(stack, [order])
    duplicates_before = page.total("duplicates")

    with stack.engine.connect() as conn:
        rows = {
            row.event_name: row
            for row in conn.execute(
                sa.select(events.c.channel, events.c.event_name, events.c.seq, events.c.data).where(
                    events.c.event_id.in_(order.event_ids)
                )
            )
        }
    created, details = rows["order.created"], rows["order.details"]
    assert details.data is None  # PHI is erased once sent: rebuild the exact envelope
    details_id = order.event_ids[1]
    details_text = encode_envelope(
        details_id, details.seq, {"order_id": order.order_id, **order.details}
    )
    # What a relay does when it dies after Pusher accepted the batch: send the same events again.
    publisher.publish_batch(
        [
            OutgoingEvent(created.channel, created.event_name, created.data),
            OutgoingEvent(details.channel, details.event_name, details_text),
        ]
    )

    wait_for(lambda: page.total("duplicates") - duplicates_before >= 2, "2 repeats dropped")
    page.page.wait_for_timeout(300)
    assert page.row(order.order_id).count() == 1
    assert page.order_ids().count(order.order_id) == 1
    assert page.total("duplicates") - duplicates_before == 2
    assert_delivered_in_seq_order(page)
    assert page.errors == []
    page.screenshot("pharmacy-duplicate.png")
    assert_no_phi_in_console_or_logs([page], [order], stack.workdir)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_MS / 1000) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)
