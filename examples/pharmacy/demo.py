"""End-to-end demo: ``python -m examples.pharmacy.demo [--orders N] [--keep] [--timeout S]``.

With ``--serve [--interval S]`` it starts the same services, prints the address of the
pharmacists' page with each pharmacist's token, and creates an order every few seconds until
Ctrl-C, then stops everything it started (see :func:`serve`).

Needs only Python (the project's virtualenv) and Node (``npm ci`` installed soketi). In a
temporary directory it starts soketi (a local Pusher-protocol server), migrates an SQLite
outbox, starts a real Celery relay worker and beat, and the pharmacy app under uvicorn, each as
a subprocess in its own process group. One websocket subscriber per pharmacy authorizes its two
channels through the app's ``/pusher/auth`` with that pharmacy's pharmacist token. The intake
desk then creates orders through ``POST /orders``, and the demo checks that:

- every ``order.details`` event arrived on the pharmacy's encrypted channel, decrypted, and
  matches the order;
- every ``order.created`` event carried only the opaque order id, and fetching the order by that
  id with the pharmacist's token returns what was created;
- a pharmacy received nothing of the other pharmacy, and a pharmacist of one pharmacy is refused
  (403, nothing signed) the other's channels and orders;
- no patient name or medication appears in cleartext on the websocket or in any log.

The last line is ``delivered N/N events (M decrypted, K fetched by id)``; the exit status is 0
only when every event arrived intact. Everything is bounded by ``--timeout`` and every process
started is stopped on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy.engine import Engine

from examples.pharmacy import db
from examples.pharmacy.notifications import ORDER_CREATED, ORDER_DETAILS
from outbox.store import Store, create_engine
from outbox.testing.soketi import Soketi, SoketiError, find_free_port, parent_death_signal
from outbox.testing.subscriber import Subscriber, SubscriptionError

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 10.0
MAX_PROBLEMS_SHOWN = 15

# Fictional data. It stands in for PHI, so the demo checks it never shows up in the clear.
FIRST_NAMES = ("Avery", "Blake", "Casey", "Dana", "Emery", "Finley", "Harper", "Jordan")
LAST_NAMES = ("Quillfeather", "Marchbank", "Ostrowe", "Penhallow", "Thistlewood", "Varnell")
PRESCRIPTIONS = (
    ("Amoxicillin 500 mg capsules", "1 capsule three times a day for 7 days", 21),
    ("Lisinopril 10 mg tablets", "1 tablet once a day", 28),
    ("Metformin 850 mg tablets", "1 tablet twice a day with meals", 56),
    ("Salbutamol 100 micrograms inhaler", "2 puffs when needed", 1),
    ("Sertraline 50 mg tablets", "1 tablet each morning", 30),
    ("Atorvastatin 20 mg tablets", "1 tablet at night", 28),
)
DETAIL_FIELDS = ("patient_name", "medication", "dosage", "quantity")


class DemoError(Exception):
    """The demo could not run (a service did not start, a step timed out)."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self, cap: float | None = None) -> float:
        left = max(0.0, self.end - time.monotonic())
        return left if cap is None else min(left, cap)

    def check(self, doing: str) -> None:
        if self.remaining() <= 0:
            raise DemoError(f"overall deadline of {self.seconds:g}s passed while {doing}")


def say(message: str) -> None:
    print(message, flush=True)


# --- subprocesses ------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    term_group: bool


@dataclass
class Processes:
    """Subprocesses, each in its own process group, all stopped by :meth:`stop_all`."""

    items: list[Process] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_path: Path,
        term_group: bool = True,
    ) -> Process:
        """Start ``argv`` in a new process group with output to ``log_path``.

        ``term_group=False`` sends the first SIGTERM to the leader only: a Celery worker stops
        its pool itself, and pool children signalled directly die mid-task.
        """
        log_file = log_path.open("ab")
        try:
            popen = subprocess.Popen(  # noqa: S603 - argv built here from sys.executable
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(os.getpid()),  # started from the main thread
            )
        except BaseException:
            log_file.close()
            raise
        process = Process(name, popen, log_path, log_file, term_group)
        self.items.append(process)
        return process

    def check_alive(self) -> None:
        for process in self.items:
            code = process.popen.poll()
            if code is not None:
                raise DemoError(
                    f"{process.name} exited with code {code}; last lines of {process.log_path}:\n"
                    + tail(process.log_path)
                )

    def stop_all(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM all, wait up to the timeout, SIGKILL the groups still there. Never raises."""
        for process in reversed(self.items):
            if process.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if process.term_group:
                        os.killpg(process.popen.pid, signal.SIGTERM)
                    else:
                        process.popen.terminate()
        end = time.monotonic() + timeout_seconds
        for process in reversed(self.items):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.0, end - time.monotonic()))
        for process in self.items:
            if process.popen.poll() is None:  # not reaped: the group id is still ours
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=2)
            process.log_file.close()
        self.items.clear()


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def quietly(close: Callable[[], object]) -> None:
    """Run a cleanup step; its failure must neither hide the first error nor skip other steps."""
    try:
        close()
    except Exception as exc:  # noqa: BLE001 - reported, and the remaining cleanup goes on
        say(f"cleanup step failed: {type(exc).__name__}")


class Interrupted:
    """Set when Ctrl-C, SIGTERM or SIGHUP arrived (an error raised while unwinding is not a
    failure of the demo then)."""

    happened = False


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into KeyboardInterrupt so that cleanup runs like on Ctrl-C.

    A SIGINT that was ignored when the demo started (a background job) stays ignored.
    """

    def handler(signum: int, _frame: Any) -> None:
        Interrupted.happened = True
        raise KeyboardInterrupt(f"signal {signum}")

    signals = [signal.SIGTERM, signal.SIGHUP]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signals.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- the demo ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedOrder:
    order_id: str
    pharmacy_id: str
    details: dict[str, Any]


@dataclass
class Pharmacy:
    pharmacy_id: str
    name: str
    token: str
    subscriber: Subscriber

    @property
    def channels(self) -> tuple[str, str]:
        ids = {"pharmacy_id": self.pharmacy_id}
        return ORDER_CREATED.channel_for(ids), ORDER_DETAILS.channel_for(ids)


@dataclass
class Outcome:
    expected: int = 0
    delivered: int = 0
    decrypted: int = 0
    fetched: int = 0
    duplicates: int = 0
    ordered_channels: int = 0
    problems: list[str] = field(default_factory=list)


def child_env(workdir: Path, soketi: Soketi) -> dict[str, str]:
    # Inherited OUTBOX_*/PUSHER_* variables would point the children elsewhere.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OUTBOX_", "PUSHER_", "CELERY_"))
    }
    env.update(soketi.env())
    env.update(
        {
            "OUTBOX_DATABASE_URL": f"sqlite:///{workdir / 'outbox.db'}",
            "OUTBOX_BROKER_URL": "filesystem://",
            "OUTBOX_BROKER_DIR": str(workdir / "broker"),
            "PUSHER_ENCRYPTION_MASTER_KEY_BASE64": base64.b64encode(os.urandom(32)).decode(),
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def migrate(env: Mapping[str, str], workdir: Path, deadline: Deadline) -> str:
    """Run ``outbox migrate`` when the CLI exists, else the library call. Returns how."""
    cli = Path(sys.executable).with_name("outbox")
    has_cli = (REPO_ROOT / "outbox" / "cli.py").is_file() and cli.is_file()
    if has_cli:
        result = subprocess.run(  # noqa: S603 - our own console script
            [str(cli), "migrate"],
            cwd=workdir,
            env=dict(env),
            capture_output=True,
            timeout=deadline.remaining(cap=60),
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode("utf-8", "replace")
            raise DemoError(f"`outbox migrate` failed with code {result.returncode}:\n{output}")
        return "outbox migrate"
    from outbox.migration import upgrade_to_head

    upgrade_to_head(env["OUTBOX_DATABASE_URL"])
    return "outbox.migration.upgrade_to_head"


def wait_until(
    what: str,
    ready: Callable[[], bool],
    deadline: Deadline,
    processes: Processes,
    *,
    cap_seconds: float = 30.0,
) -> None:
    waited = deadline.remaining(cap=cap_seconds)
    end = time.monotonic() + waited
    while not ready():
        processes.check_alive()
        if time.monotonic() >= end:
            raise DemoError(f"{what} not ready within {waited:.1f}s")
        time.sleep(0.1)


def log_contains(path: Path, needle: str) -> bool:
    try:
        return needle in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def http_ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def authorizer_for(client: httpx.Client, base_url: str, token: str) -> Callable[[str, str], Any]:
    """What pusher-js does: post the socket id and channel name to the app's auth endpoint."""

    def authorize(socket_id: str, channel_name: str) -> Any:
        response = client.post(
            f"{base_url}/pusher/auth",
            data={"socket_id": socket_id, "channel_name": channel_name},
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code != 200:
            raise SubscriptionError(
                f"/pusher/auth answered {response.status_code} for {channel_name}"
            )
        return response.json()

    return authorize


def fake_order(rng: random.Random) -> dict[str, Any]:
    medication, dosage, quantity = rng.choice(PRESCRIPTIONS)
    return {
        "patient_name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "medication": medication,
        "dosage": dosage,
        "quantity": quantity,
    }


def unique_count(subscriber: Subscriber) -> int:
    ids = set()
    for event in subscriber.events:
        envelope = event.data
        if isinstance(envelope, dict) and isinstance(envelope.get("id"), str):
            ids.add(envelope["id"])
    return len(ids)


def check_refusals(
    client: httpx.Client, base_url: str, a: Pharmacy, b: Pharmacy, order_of_a: str | None
) -> list[str]:
    """A pharmacist of B must get nothing of A: no channel auth (403), no order (404)."""
    problems = []
    socket_id = b.subscriber.socket_id or "1.1"
    headers = {"Authorization": f"Bearer {b.token}"}
    for channel in a.channels:
        response = client.post(
            f"{base_url}/pusher/auth",
            data={"socket_id": socket_id, "channel_name": channel},
            headers=headers,
        )
        if response.status_code != 403 or "auth" in response.text:
            problems.append(
                f"pharmacist of {b.pharmacy_id} authorizing {channel}: expected 403 without a "
                f"signature, got {response.status_code}"
            )
    if order_of_a is not None:
        response = client.get(f"{base_url}/orders/{order_of_a}", headers=headers)
        if response.status_code != 404:
            problems.append(
                f"pharmacist of {b.pharmacy_id} fetching {order_of_a}: expected 404, got "
                f"{response.status_code}"
            )
    return problems


def verify(
    pharmacy: Pharmacy,
    others: Sequence[Pharmacy],
    orders: Mapping[str, CreatedOrder],
    client: httpx.Client,
    base_url: str,
    outcome: Outcome,
) -> None:
    """Check every event this pharmacy's subscriber got against the orders created."""
    own_channels = set(pharmacy.channels)
    got: set[tuple[str, str]] = set()
    sequences: dict[str, list[Any]] = {}
    seen_event_ids: set[str] = set()
    problems = outcome.problems
    for event in pharmacy.subscriber.events:
        where = f"{pharmacy.pharmacy_id}: {event.event} on {event.channel}"
        if event.channel not in own_channels:
            problems.append(f"{where}: not one of this pharmacy's channels")
            continue
        if event.channel == pharmacy.channels[1] and not event.decrypted:
            problems.append(f"{where}: did not decrypt ({event.decrypt_error})")
            continue
        envelope = event.data
        if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), dict):
            problems.append(f"{where}: data is not an outbox envelope")
            continue
        if envelope.get("id") in seen_event_ids:
            outcome.duplicates += 1  # at-least-once: drop repeats by event id
            continue
        seen_event_ids.add(str(envelope.get("id")))
        if "seq" in envelope:
            sequences.setdefault(event.channel, []).append(envelope["seq"])
        payload: dict[str, Any] = envelope["data"]
        order_id = str(payload.get("order_id"))
        order = orders.get(order_id)
        if order is None or order.pharmacy_id != pharmacy.pharmacy_id:
            problems.append(f"{where}: order {order_id} is not one of this pharmacy's orders")
            continue
        if event.event == ORDER_DETAILS.event:
            wrong = [name for name in DETAIL_FIELDS if payload.get(name) != order.details[name]]
            if wrong:
                problems.append(f"{where}: {order_id} differs in {', '.join(wrong)}")
                continue
            outcome.decrypted += 1
        elif event.event == ORDER_CREATED.event:
            if set(payload) != {"order_id", "status"}:
                problems.append(f"{where}: carries fields {sorted(payload)}, expected opaque id")
                continue
            response = client.get(
                f"{base_url}/orders/{order_id}",
                headers={"Authorization": f"Bearer {pharmacy.token}"},
            )
            if response.status_code != 200:
                problems.append(f"{where}: GET /orders/{order_id} -> {response.status_code}")
                continue
            fetched = response.json()
            wrong = [name for name in DETAIL_FIELDS if fetched.get(name) != order.details[name]]
            if wrong:
                problems.append(f"{where}: fetched {order_id} differs in {', '.join(wrong)}")
                continue
            outcome.fetched += 1
        else:
            problems.append(f"{where}: unexpected event name")
            continue
        got.add((order_id, event.event))
        outcome.delivered += 1
    for channel, seqs in sequences.items():
        # Per channel, numbers are gap-free and follow commit order: 1, 2, 3, ... as they arrive.
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"{channel}: sequence numbers arrived out of order or with gaps")
        else:
            outcome.ordered_channels += 1
    for order in orders.values():
        if order.pharmacy_id != pharmacy.pharmacy_id:
            continue
        for event_name in (ORDER_CREATED.event, ORDER_DETAILS.event):
            outcome.expected += 1
            if (order.order_id, event_name) not in got:
                problems.append(f"{pharmacy.pharmacy_id}: missing {event_name} of {order.order_id}")
    for frame in pharmacy.subscriber.frames:
        for other in others:
            if other.pharmacy_id in frame:
                problems.append(
                    f"{pharmacy.pharmacy_id}: received a frame naming {other.pharmacy_id}"
                )
                break


def phi_leaks(orders: Mapping[str, CreatedOrder], texts: Mapping[str, str]) -> list[str]:
    """Where a patient name or medication shows up in ``texts`` (logs, websocket frames)."""
    needles = set()
    for order in orders.values():
        needles.add(order.details["patient_name"])
        needles.add(order.details["medication"])
    leaks = []
    for where, text in texts.items():
        if any(needle in text for needle in needles):
            leaks.append(f"PHI in cleartext in {where}")
    return leaks


def start_services(processes: Processes, workdir: Path, env: Mapping[str, str]) -> tuple[str, Path]:
    """Start the Celery relay worker and beat and the app; return the app's URL and the
    worker's log. Each runs in its own process group, its output in a log file in ``workdir``."""
    python = sys.executable
    worker_log = workdir / "worker.log"
    celery = [python, "-m", "celery", "-A", "workers"]
    worker = "worker --loglevel=INFO --pool=prefork --concurrency=2 --without-gossip"
    worker += " --without-mingle --without-heartbeat -n"
    processes.start(
        "celery worker",
        [*celery, *worker.split(), f"pharmacy-demo-{os.getpid()}@%h"],
        cwd=workdir,
        env=env,
        log_path=worker_log,
        term_group=False,
    )
    processes.start(
        "celery beat",
        [*celery, "beat", "--loglevel=INFO"],
        cwd=workdir,
        env=env,
        log_path=workdir / "beat.log",
    )
    port = find_free_port()
    processes.start(
        "app (uvicorn)",
        [
            python,
            "-m",
            "uvicorn",
            "--factory",
            "examples.pharmacy.app:app_from_env",
            *f"--host 127.0.0.1 --port {port} --log-level info".split(),
        ],
        cwd=workdir,
        env=env,
        log_path=workdir / "app.log",
    )
    return f"http://127.0.0.1:{port}", worker_log


@dataclass
class Stack:
    """Everything :func:`start_stack` started, for the demo, ``--serve`` and browser tests."""

    workdir: Path
    soketi: Soketi
    env: dict[str, str]
    engine: Engine
    seeded: db.Seeded
    base_url: str
    client: httpx.Client
    processes: Processes

    def create_order(self, pharmacy_id: str, details: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /orders`` as the intake desk; the JSON answer (opaque ids only)."""
        response = self.client.post(
            f"{self.base_url}/orders",
            json={"pharmacy_id": pharmacy_id, **details},
            headers={"Authorization": f"Bearer {self.seeded.intake.token}"},
        )
        if response.status_code != 201:
            # Not the body: a validation error echoes the input, which is PHI.
            raise DemoError(f"POST /orders answered {response.status_code}")
        answer: dict[str, Any] = response.json()
        return answer


def start_stack(
    workdir: Path,
    processes: Processes,
    stack: contextlib.ExitStack,
    deadline: Deadline,
    step: Callable[[str], None],
) -> Stack:
    """Start soketi, migrate and seed an SQLite outbox, start the Celery worker and beat and the
    app; wait until all are ready. ``stack`` stops everything (workers before soketi)."""
    soketi = Soketi(log_path=workdir / "soketi.log", start_timeout_seconds=deadline.remaining(30))
    stack.callback(quietly, soketi.close)
    soketi.start()
    step(f"soketi (Pusher protocol) listening on {soketi.http_url}")

    env = child_env(workdir, soketi)
    how = migrate(env, workdir, deadline)
    step(f"outbox schema migrated ({how})")
    engine = create_engine(env["OUTBOX_DATABASE_URL"])
    stack.callback(quietly, engine.dispose)
    db.create_tables(engine)
    seeded = db.seed(engine)
    step(
        f"seeded {len(seeded.pharmacies)} pharmacies with one pharmacist each: "
        + ", ".join(seeded.pharmacies)
    )

    stack.callback(stop_uninterrupted, processes)  # before soketi stops: nothing publishes then
    base_url, worker_log = start_services(processes, workdir, env)

    client = httpx.Client(timeout=HTTP_TIMEOUT_SECONDS, trust_env=False)
    stack.callback(quietly, client.close)
    wait_until("the app", lambda: http_ok(client, f"{base_url}/healthz"), deadline, processes)
    step(f"app serving on {base_url}")
    wait_until(
        "the celery worker", lambda: log_contains(worker_log, " ready."), deadline, processes
    )
    step("celery relay worker and beat running")
    return Stack(workdir, soketi, env, engine, seeded, base_url, client, processes)


def run(
    args: argparse.Namespace, workdir: Path, processes: Processes, stack: contextlib.ExitStack
) -> tuple[int, str]:
    """Run the demo; return the exit status and the summary line."""
    started = time.monotonic()
    deadline = Deadline(args.timeout)

    def step(message: str) -> None:
        say(f"[{time.monotonic() - started:5.1f}s] {message}")

    step(f"working directory {workdir}")
    services = start_stack(workdir, processes, stack, deadline, step)
    soketi, engine, seeded = services.soketi, services.engine, services.seeded
    base_url, client = services.base_url, services.client

    pharmacies: list[Pharmacy] = []
    for pharmacy_id, name in seeded.pharmacies.items():
        account = seeded.pharmacists[pharmacy_id]
        subscriber = Subscriber(soketi.ws_url, soketi.key, timeout_seconds=10)
        stack.callback(quietly, subscriber.close)
        subscriber.connect(timeout=deadline.remaining(10))
        pharmacy = Pharmacy(pharmacy_id, name, account.token, subscriber)
        authorize = authorizer_for(client, base_url, account.token)
        for channel in pharmacy.channels:
            subscriber.subscribe(channel, authorize, timeout=deadline.remaining(10))
        pharmacies.append(pharmacy)
        step(f"{name} subscribed to {' and '.join(pharmacy.channels)}")

    rng = random.Random()
    orders: dict[str, CreatedOrder] = {}
    for index in range(args.orders):
        deadline.check("creating orders")
        pharmacy = pharmacies[index % len(pharmacies)]
        details = fake_order(rng)
        order_id = services.create_order(pharmacy.pharmacy_id, details)["order_id"]
        orders[order_id] = CreatedOrder(order_id, pharmacy.pharmacy_id, details)
    expected = 2 * len(orders)
    step(f"created {len(orders)} orders through POST /orders ({expected} notifications enqueued)")

    last_report = 0.0
    while True:
        received = sum(unique_count(pharmacy.subscriber) for pharmacy in pharmacies)
        if received >= expected or deadline.remaining() <= 0:
            break
        processes.check_alive()
        if time.monotonic() - last_report >= 2:
            step(f"received {received}/{expected} events so far")
            last_report = time.monotonic()
        time.sleep(0.05)
    step(f"received {received}/{expected} events")

    outcome = Outcome()
    first_order_of = {
        p.pharmacy_id: next(
            (o.order_id for o in orders.values() if o.pharmacy_id == p.pharmacy_id), None
        )
        for p in pharmacies
    }
    for pharmacy in pharmacies:
        others = [other for other in pharmacies if other is not pharmacy]
        verify(pharmacy, others, orders, client, base_url, outcome)
        for other in others:
            outcome.problems.extend(
                check_refusals(client, base_url, other, pharmacy, first_order_of[other.pharmacy_id])
            )
    step("refusals checked: pharmacists get 403 on other pharmacies' channels, 404 on their orders")

    frames = {
        f"a websocket frame received by {pharmacy.name}": "\n".join(pharmacy.subscriber.frames)
        for pharmacy in pharmacies
    }
    logs = {
        path.name: path.read_text(encoding="utf-8", errors="replace")
        for path in sorted(workdir.glob("*.log"))
    }
    outcome.problems.extend(phi_leaks(orders, {**frames, **logs}))
    step(f"privacy: looked for patient names and medications in {len(logs)} logs and all frames")

    stats = Store(engine).stats()["by_status"]
    step(
        "outbox rows: " + ", ".join(f"{count} {status}" for status, count in stats.items() if count)
    )
    if outcome.ordered_channels:
        step(
            f"order kept: on {outcome.ordered_channels} channels the events arrived numbered "
            "1, 2, 3, ... without gaps"
        )
    if outcome.duplicates:
        step(f"{outcome.duplicates} repeated deliveries dropped by event id (at-least-once)")

    for problem in outcome.problems[:MAX_PROBLEMS_SHOWN]:
        say(f"  problem: {problem}")
    if len(outcome.problems) > MAX_PROBLEMS_SHOWN:
        say(f"  ... and {len(outcome.problems) - MAX_PROBLEMS_SHOWN} more problems")
    step(f"checked in {time.monotonic() - started:.1f}s")
    ok = not outcome.problems and outcome.delivered == outcome.expected == expected
    summary = (
        f"delivered {outcome.delivered}/{outcome.expected} events "
        f"({outcome.decrypted} decrypted, {outcome.fetched} fetched by id)"
    )
    return (0 if ok else 1), summary


def serve(
    args: argparse.Namespace, workdir: Path, processes: Processes, stack: contextlib.ExitStack
) -> tuple[int, str]:
    """``--serve``: start everything, print the page's address with each pharmacist's token, and
    create an order every ``--interval`` seconds until Ctrl-C (or SIGTERM). Returns after the
    interrupt with status 0; ``stack`` then stops everything."""
    started = time.monotonic()

    def step(message: str) -> None:
        say(f"[{time.monotonic() - started:5.1f}s] {message}")

    step(f"working directory {workdir}")
    services = start_stack(workdir, processes, stack, Deadline(args.timeout), step)
    seeded = services.seeded
    (first_id, first_name), (second_id, second_name) = list(seeded.pharmacies.items())[:2]
    token = {
        pharmacy_id: seeded.pharmacists[pharmacy_id].token for pharmacy_id in seeded.pharmacies
    }
    page = services.base_url
    say("")
    say("Open the pharmacists' page (the tokens are valid for this run only):")
    width = max(len(first_name), len(second_name)) + 1
    # The token travels in the fragment: browsers never send it to the server (nor to logs).
    say(f"  {first_name + ':':<{width}} {page}/#token={token[first_id]}")
    say(f"  {second_name + ':':<{width}} {page}/#token={token[second_id]}")
    say(
        f"  {second_name}'s pharmacist trying {first_name}'s channels (access denied):\n"
        f"    {page}/?pharmacy={first_id}#token={token[second_id]}"
    )
    say(f"Creating an order every {args.interval:g}s, alternating pharmacies. Ctrl-C stops.")
    say("")

    rng = random.Random()
    pharmacy_ids = list(seeded.pharmacies)
    created = 0
    try:
        next_at = time.monotonic()
        while True:
            processes.check_alive()
            if time.monotonic() >= next_at:
                pharmacy_id = pharmacy_ids[created % len(pharmacy_ids)]
                order_id = services.create_order(pharmacy_id, fake_order(rng))["order_id"]
                created += 1
                step(f"order {order_id} created for {pharmacy_id}")
                next_at = time.monotonic() + args.interval
            time.sleep(0.1)
    except KeyboardInterrupt:
        say("stopping ...")
    return 0, f"served {created} orders on {page}; stopped everything the demo started"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.pharmacy.demo",
        description="Run the pharmacy example end to end against a local soketi.",
    )
    parser.add_argument("--orders", type=int, default=30, help="orders to create (default 30)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="overall deadline in seconds (default 90; with --serve: for starting up)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep serving the pharmacists' page (prints its address and tokens) and create an "
        "order every --interval seconds until Ctrl-C",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=4.0,
        help="with --serve: seconds between new orders (default 4)",
    )
    args = parser.parse_args(argv)
    if args.orders < 1:
        parser.error("--orders must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pharmacy-demo-"))
    processes = Processes()
    summary = f"delivered 0/{2 * args.orders} events (0 decrypted, 0 fetched by id)"
    if args.serve:
        summary = "served no page: stopped everything the demo started"
    code = 1
    try:
        with terminate_on_sigterm():
            try:
                with contextlib.ExitStack() as stack:
                    code, summary = (serve if args.serve else run)(args, workdir, processes, stack)
            except (
                DemoError,
                SoketiError,
                SubscriptionError,
                TimeoutError,
                httpx.HTTPError,
            ) as exc:
                if Interrupted.happened:
                    raise KeyboardInterrupt from exc
                say(f"demo failed: {type(exc).__name__}: {exc}")
                for path in sorted(workdir.glob("*.log")):
                    say(f"last lines of {path.name}:\n{tail(path, 10)}")
    except KeyboardInterrupt:
        say("interrupted; stopped everything the demo started")
        code = 130
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say(summary)
    return code


def stop_uninterrupted(processes: Processes) -> None:
    """Stop the subprocesses; a second Ctrl-C must not leave them running (bounded anyway)."""
    started = time.monotonic()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        processes.stop_all()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say(f"stopped the worker, beat and app in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
