"""A small read-only web dashboard: queue statistics, per-type counts, dead letters, live charts.

Routes (all ``GET``, all behind the token unless the server runs without auth on loopback):

- ``/``: the page (HTML, CSS and JavaScript shipped in ``outbox/static/``, inlined; no build
  step, nothing loaded from elsewhere). The token may be given as ``?token=`` here only; the page
  then sends it as ``Authorization: Bearer`` on its own requests.
- ``/api/stats``: the JSON document of ``outbox stats --json`` (same schema, same keys).
- ``/api/dead``: dead letters, newest first: ``id``, ``event_id``, ``type_name``, ``attempts``,
  ``last_error``, ``finished_at``. Never payloads.
- ``/api/info``: package version and database kind (never the URL: it can hold a password).
- ``/metrics``: Prometheus text from :func:`outbox.metrics.registry`.

The dashboard never changes a row, never returns payload values and never logs or echoes the
token. Starlette and uvicorn are imported only when the app is built (the ``dashboard`` extra),
so :func:`collect_stats` stays usable by the CLI without them.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import json
import logging
import secrets
import signal
import threading
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from outbox.errors import ConfigurationError
from outbox.store import Store

if TYPE_CHECKING:
    from types import FrameType

    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

STATS_SCHEMA_VERSION = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MIN_TOKEN_LENGTH = 16
DEAD_LETTER_LIMIT = 50
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

_SECURITY_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


def collect_stats(store: Store, worker_silence_seconds: float) -> dict[str, Any]:
    """The statistics of ``outbox stats``: :meth:`Store.stats` plus the workers alive.

    Worker entries carry ``worker_id``, ``host``, ``pid``, ``version`` and ``last_beat_at``.
    """
    data = store.stats()
    alive = store.workers_alive(within_seconds=worker_silence_seconds)
    data["workers"] = [
        {
            "worker_id": w["worker_id"],
            "host": w["host"],
            "pid": w["pid"],
            "version": w["version"],
            "last_beat_at": w["last_beat_at"],
        }
        for w in alive
    ]
    return data


def stats_document(store: Store, worker_silence_seconds: float) -> dict[str, Any]:
    """The ``outbox stats --json`` document: ``{"schema": 1, **collect_stats(...)}``."""
    return {"schema": STATS_SCHEMA_VERSION, **collect_stats(store, worker_silence_seconds)}


def dead_letters(store: Store, *, limit: int = DEAD_LETTER_LIMIT) -> list[dict[str, Any]]:
    """Newest dead rows as metadata only (an allow-list of columns: never the payload)."""
    return [
        {
            "id": row["id"],
            "event_id": row["event_id"],
            "type_name": row["type_name"],
            "attempts": row["attempts"],
            "last_error": row["last_error"],
            "finished_at": row["finished_at"],
        }
        for row in store.list_dead(limit=limit)
    ]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a ``Host`` header name) is this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(*, host: str, token: str | None, no_auth: bool) -> None:
    """Refuse an unsafe setup with :class:`ConfigurationError` (the message never has the token).

    A token must be at least ``MIN_TOKEN_LENGTH`` characters. Without one the server starts only
    when ``no_auth`` is set and ``host`` is a loopback address.
    """
    if token is not None and no_auth:
        raise ConfigurationError(
            "--no-auth was given but a dashboard token is configured (--token or "
            "OUTBOX_DASHBOARD_TOKEN); drop one of the two"
        )
    if token is not None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"the dashboard token is shorter than {MIN_TOKEN_LENGTH} characters; generate "
                "one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return
    if not no_auth:
        raise ConfigurationError(
            "no dashboard token: set OUTBOX_DASHBOARD_TOKEN (or --token), or pass --no-auth to "
            "serve without one on a loopback address"
        )
    if not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve without a token on {host}, which is not a loopback address: "
            "set OUTBOX_DASHBOARD_TOKEN, or bind --host 127.0.0.1"
        )


def _json_default(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=_json_default, separators=(",", ":")).encode()


def _static_text(name: str) -> str:
    return resources.files("outbox").joinpath("static", name).read_text(encoding="utf-8")


def _page_template() -> str:
    html = _static_text("dashboard.html")
    return html.replace("/*STYLE*/", _static_text("dashboard.css")).replace(
        "/*SCRIPT*/", _static_text("dashboard.js")
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _host_name(host_header: str) -> str:
    """``127.0.0.1:8765`` → ``127.0.0.1``; ``[::1]:8765`` → ``::1``."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.partition(":")[0]


class TokenGate:
    """ASGI middleware: every HTTP request needs the token; adds no-store and framing headers.

    The token is accepted as ``Authorization: Bearer <token>`` everywhere, and as ``?token=`` on
    the page (``/``) only, so API URLs never carry it. Comparison is constant-time. Without a
    token (loopback only, see :func:`check_access`) the ``Host`` header must name loopback, which
    stops web pages reaching the dashboard through DNS rebinding.
    """

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._allowed(scope):
            await self._unauthorized(send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _allowed(self, scope: Scope) -> bool:
        if self._token is None:
            return is_loopback(_host_name(_header(scope, b"host") or ""))
        presented: list[str] = []
        authorization = _header(scope, b"authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented.append(credentials.strip())
        if scope.get("path") == "/":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            presented.extend(query.get("token", [])[:1])
        return any(hmac.compare_digest(p.encode(), self._token) for p in presented)

    @staticmethod
    async def _unauthorized(send: Send) -> None:
        body = b"401 Unauthorized: send Authorization: Bearer <token> (or ?token= on the page)\n"
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="outbox"'),
                    *_SECURITY_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(
    store: Store, token: str | None, *, worker_silence_seconds: float = 60.0
) -> Starlette:
    """The dashboard as an ASGI app on ``store``, read-only.

    ``token`` protects every route; ``None`` serves without one (only for loopback binds: the
    caller checks with :func:`check_access`). Database reads run in worker threads; a failing
    read answers 503 with the exception class only (driver messages can quote row values).
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from outbox import __version__
    from outbox.metrics import registry

    template = _page_template()
    metrics_registry = registry(store)
    info = {"version": __version__, "database": store.engine.dialect.name}

    def json_response(value: Any, status_code: int = 200) -> Response:
        return Response(_dumps(value), status_code=status_code, media_type="application/json")

    def unavailable(exc: Exception) -> Response:
        logger.warning("dashboard cannot read the outbox (%s)", type(exc).__name__)
        return json_response({"error": f"cannot read the outbox ({type(exc).__name__})"}, 503)

    def page(request: Request) -> Response:
        nonce = secrets.token_urlsafe(18)
        csp = (
            "default-src 'none'; "
            f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        return Response(
            template.replace("__CSP_NONCE__", nonce),
            media_type="text/html",
            headers={"content-security-policy": csp},
        )

    def api_stats(request: Request) -> Response:
        try:
            return json_response(stats_document(store, worker_silence_seconds))
        except Exception as exc:  # noqa: BLE001 - answer 503, keep serving
            return unavailable(exc)

    def api_dead(request: Request) -> Response:
        try:
            return json_response({"rows": dead_letters(store), "limit": DEAD_LETTER_LIMIT})
        except Exception as exc:  # noqa: BLE001 - answer 503, keep serving
            return unavailable(exc)

    def api_info(request: Request) -> Response:
        return json_response(info)

    def metrics(request: Request) -> Response:
        try:
            body = generate_latest(metrics_registry)
        except Exception as exc:  # noqa: BLE001 - answer 503, keep serving
            logger.warning("dashboard cannot read the outbox (%s)", type(exc).__name__)
            return Response(b"# cannot read the outbox\n", status_code=503)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/stats", api_stats),
            Route("/api/dead", api_dead),
            Route("/api/info", api_info),
            Route("/metrics", metrics),
        ],
        middleware=[Middleware(TokenGate, token=token)],
    )


def serve(
    store: Store,
    *,
    token: str | None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    worker_silence_seconds: float = 60.0,
) -> None:
    """Serve the dashboard until SIGINT/SIGTERM, then stop gracefully (open requests finish).

    Either signal ends in :class:`KeyboardInterrupt` once uvicorn has shut down, so the caller
    cleans up the same way for Ctrl-C and for a container stop. The access log is off: page URLs
    can carry ``?token=``.
    """
    import uvicorn

    app = create_app(store, token, worker_silence_seconds=worker_silence_seconds)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on after a graceful shutdown; make SIGTERM land
    # as KeyboardInterrupt like SIGINT instead of killing the process before cleanup.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        server.run()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
