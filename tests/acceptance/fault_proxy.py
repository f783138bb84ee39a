"""A small HTTP proxy in front of soketi that injects faults into the relay's publish requests.

soketi stays the real endpoint: a request the plan lets through (or a fault marked
``after_forward``) is forwarded to soketi, which delivers it to its websocket subscribers. The
proxy records every request (when it started, whether soketi got it, which events it carried) so
that a test can tell which events were inside the documented duplicate window: accepted by
Pusher, outcome never seen by the relay.

>>> with FaultProxy("127.0.0.1", soketi.port, plan=[None, Fault.status(503)]) as proxy:
...     env = {**soketi.env(), **proxy.pusher_env()}

Faults (see :class:`Fault`): an HTTP status (500/503, 429 with ``Retry-After``), a soketi-style
HTTP 200 ``{"error": …, "code": N}`` body, a timeout (hold the request longer than the client
waits, then hang up), a connection reset (RST, no answer) and a delay. ``timeout`` and ``reset``
can happen *after* forwarding: soketi delivered the events, the relay never learns it.

Only ``POST …/events`` and ``POST …/batch_events`` are publish requests: the plan is indexed by
them (0, 1, 2, … in arrival order); any other request is forwarded untouched.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

__all__ = ["Fault", "FaultProxy", "RequestRecord"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
UPSTREAM_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one publish request instead of (or after) forwarding it."""

    kind: str  # "status" | "error_body" | "timeout" | "reset" | "delay"
    status: int = 0
    seconds: float = 0.0
    retry_after: str | None = None
    after_forward: bool = False

    @classmethod
    def status_code(cls, status: int, *, retry_after: float | None = None) -> Fault:
        """Answer ``status`` without forwarding (e.g. 500, 503, 429 with ``Retry-After``)."""
        return cls(
            "status", status=status, retry_after=None if retry_after is None else f"{retry_after:g}"
        )

    @classmethod
    def rate_limited(cls, retry_after: float = 1) -> Fault:
        return cls.status_code(429, retry_after=retry_after)

    @classmethod
    def error_body(cls, code: int = 500) -> Fault:
        """HTTP 200 with soketi's error body ``{"error": …, "code": code}``; not forwarded."""
        return cls("error_body", status=code)

    @classmethod
    def timeout(cls, seconds: float, *, after_forward: bool = False) -> Fault:
        """Hold the request ``seconds`` (longer than the client's timeout), then hang up."""
        return cls("timeout", seconds=seconds, after_forward=after_forward)

    @classmethod
    def reset(cls, *, after_forward: bool = False) -> Fault:
        """Close the connection with a TCP reset, no answer."""
        return cls("reset", after_forward=after_forward)

    @classmethod
    def delay(cls, seconds: float, *, after_forward: bool = True) -> Fault:
        """Forward and answer normally, ``seconds`` later (before or after forwarding)."""
        return cls("delay", seconds=seconds, after_forward=after_forward)

    @property
    def forwards(self) -> bool:
        """Whether soketi receives the request under this fault."""
        return self.kind == "delay" or self.after_forward

    @property
    def answers(self) -> bool:
        """Whether the client gets soketi's answer (the request's outcome is known)."""
        return self.kind == "delay"

    def __str__(self) -> str:
        text = self.kind
        if self.kind in ("status", "error_body"):
            text += f" {self.status}"
        if self.retry_after is not None:
            text += f" retry-after={self.retry_after}"
        if self.seconds:
            text += f" {self.seconds:g}s"
        if self.after_forward and self.kind != "delay":
            text += " after-forward"
        return text


@dataclass
class RequestRecord:
    """One request the proxy received. Times are ``time.monotonic()``."""

    index: int | None  # publish-request index (None for other requests)
    method: str
    path: str
    started: float
    events: int = 0
    event_ids: list[str] = field(default_factory=list)  # readable ones (not encrypted)
    fault: Fault | None = None
    forwarded_at: float | None = None
    upstream_status: int | None = None
    upstream_error: str | None = None
    answered_at: float | None = None  # the client got a complete answer
    finished_at: float | None = None

    @property
    def delivered_unanswered(self) -> bool:
        """soketi accepted the events and the client never saw that answer."""
        return (
            self.upstream_status is not None
            and 200 <= self.upstream_status < 300
            and self.answered_at is None
        )


Plan = Sequence["Fault | None"] | Callable[[RequestRecord], "Fault | None"]


class _HungUp(Exception):
    """The handler closed the client connection on purpose."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out and go away are part of the game: never print tracebacks.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(_HungUp, OSError, ValueError):
            super().handle()

    def do_GET(self) -> None:
        self._proxy()

    def do_POST(self) -> None:
        self._proxy()

    def _proxy(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record = proxy._begin(self.command, self.path, body)
        fault = record.fault
        try:
            if fault is None or fault.forwards:
                if fault is not None and fault.kind == "delay" and not fault.after_forward:
                    time.sleep(fault.seconds)
                answer = self._forward(proxy, record, body)
                if fault is not None and fault.kind == "delay" and fault.after_forward:
                    time.sleep(fault.seconds)
                if answer is None:  # soketi unreachable: what a reverse proxy answers
                    self._answer(record, 502, b'{"error":"bad gateway"}', {})
                    return
                if fault is None or fault.kind == "delay":
                    status, payload, headers = answer
                    self._answer(record, status, payload, headers)
            if fault is None or fault.kind == "delay":
                return
            if fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._answer(record, fault.status, b'{"error":"injected by fault proxy"}', headers)
            elif fault.kind == "error_body":
                payload = json.dumps({"error": "injected by fault proxy", "code": fault.status})
                self._answer(record, 200, payload.encode(), {})
            elif fault.kind == "timeout":
                time.sleep(fault.seconds)
                self._hang_up(reset=False)
            elif fault.kind == "reset":
                self._hang_up(reset=True)
            else:  # pragma: no cover - a typo in a plan
                raise ValueError(f"unknown fault {fault.kind!r}")
        finally:
            record.finished_at = time.monotonic()

    def _forward(
        self, proxy: FaultProxy, record: RequestRecord, body: bytes
    ) -> tuple[int, bytes, dict[str, str]] | None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_SECONDS
        )
        try:
            record.forwarded_at = time.monotonic()
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            record.upstream_status = response.status
            kept = {
                k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | {"date"}
            }
            return response.status, payload, kept
        except OSError as exc:
            record.upstream_error = type(exc).__name__
            return None
        finally:
            connection.close()

    def _answer(
        self, record: RequestRecord, status: int, payload: bytes, headers: dict[str, str]
    ) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        record.answered_at = time.monotonic()

    def _hang_up(self, *, reset: bool) -> None:
        self.close_connection = True
        sock = self.connection
        if reset:  # SO_LINGER 0: close() sends RST instead of FIN
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError, ValueError):
            self.rfile.close()
            self.wfile.close()
            sock.close()
        raise _HungUp


class FaultProxy:
    """A threaded HTTP proxy to ``upstream_host:upstream_port`` with a fault plan.

    ``plan`` is a list (fault of the n-th publish request, ``None`` = pass through; requests past
    its end pass through) or a callable receiving the :class:`RequestRecord` (``index``,
    ``events``, ``event_ids`` are filled in). ``latency`` delays every passed-through publish
    request by that many seconds *after* soketi accepted it (a slow network on the way back:
    the widest duplicate window). Both may be changed while the proxy runs.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        plan: Plan | None = None,
        latency: float = 0.0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self._requested_port = port
        self.port = port
        self.plan: Plan = plan if plan is not None else []
        self.latency = latency
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._publish_count = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<FaultProxy {self.host}:{self.port} -> {self.upstream_host}:{self.upstream_port}>"

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = _Server((self.host, self._requested_port), _Handler)
        server.proxy = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"fault-proxy-{self.port}",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket (handlers still running finish)."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # -- use ------------------------------------------------------------------------------------

    def pusher_env(self) -> dict[str, str]:
        """``PUSHER_HOST``/``PUSHER_PORT``/``PUSHER_SCHEME`` pointing at the proxy."""
        return {"PUSHER_HOST": self.host, "PUSHER_PORT": str(self.port), "PUSHER_SCHEME": "http"}

    @property
    def records(self) -> list[RequestRecord]:
        """Every request so far, in arrival order (copies of the list, live records)."""
        with self._lock:
            return list(self._records)

    def publishes(self) -> list[RequestRecord]:
        return [r for r in self.records if r.index is not None]

    def faulted(self) -> list[RequestRecord]:
        return [r for r in self.publishes() if r.fault is not None and r.fault.kind != "delay"]

    def in_progress(self) -> list[RequestRecord]:
        return [r for r in self.publishes() if r.finished_at is None]

    def forwarded_ids(self, since: float = 0.0, until: float = float("inf")) -> list[str]:
        """Readable ids of events forwarded to soketi in ``[since, until]`` (monotonic)."""
        return [
            event_id
            for r in self.publishes()
            if r.forwarded_at is not None and since <= r.forwarded_at <= until
            for event_id in r.event_ids
        ]

    def summary(self) -> str:
        """One line per fault applied, for assertion messages."""
        lines = [
            f"#{r.index} {r.fault} events={r.events} upstream={r.upstream_status}"
            for r in self.faulted()
        ]
        return "\n".join(lines) or "(no fault applied)"

    # -- internals ------------------------------------------------------------------------------

    def _begin(self, method: str, path: str, body: bytes) -> RequestRecord:
        is_publish = method == "POST" and path.split("?", 1)[0].endswith(
            ("/events", "/batch_events")
        )
        record = RequestRecord(index=None, method=method, path=path, started=time.monotonic())
        if is_publish:
            record.events, record.event_ids = _events_of(body)
        with self._lock:
            if is_publish:
                record.index = self._publish_count
                self._publish_count += 1
            self._records.append(record)
        if is_publish:
            record.fault = self._fault_for(record)
        return record

    def _fault_for(self, record: RequestRecord) -> Fault | None:
        plan = self.plan
        fault: Fault | None
        if callable(plan):
            fault = plan(record)
        else:
            assert record.index is not None
            fault = plan[record.index] if record.index < len(plan) else None
        if fault is None and self.latency > 0:
            fault = Fault.delay(self.latency, after_forward=True)
        return fault


def _events_of(body: bytes) -> tuple[int, list[str]]:
    """(number of events, readable event ids) of a Pusher publish body."""
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return 0, []
    items = parsed.get("batch") if isinstance(parsed, dict) and "batch" in parsed else [parsed]
    ids: list[str] = []
    for item in items if isinstance(items, list) else []:
        data = item.get("data") if isinstance(item, dict) else None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            envelope = json.loads(data) if isinstance(data, str) else None
            event_id = envelope.get("id") if isinstance(envelope, dict) else None
            if isinstance(event_id, str):
                ids.append(event_id)
    return len(items) if isinstance(items, list) else 0, ids
