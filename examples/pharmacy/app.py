"""The pharmacy service's HTTP API (FastAPI).

- ``POST /orders`` (intake desk, or a pharmacist for their own pharmacy) saves an order and
  enqueues both notifications in the same transaction: all three commit together or not at all.
- ``GET /orders/{order_id}`` returns an order's details to the pharmacists of its pharmacy only
  (404 for everyone else, so ids of other pharmacies' orders cannot be probed).
- ``POST /pusher/auth`` is the channel authorization endpoint pusher-js calls (form fields
  ``socket_id`` and ``channel_name``); :class:`outbox.ChannelAuthorizer` checks the request, asks
  :func:`may_subscribe` and signs only what it allows.
- ``GET /pusher/catchup?channel=…&after_seq=…`` returns what a client missed on a channel
  (:class:`outbox.CatchUp`), under the same rule as subscriptions.
- ``GET /orders`` lists the caller's pharmacy's pending orders with the position (last ``seq``)
  of each of its channels, read before the orders: a client starts its live feed from there and
  misses nothing. ``GET /me`` says who the caller is.
- ``GET /`` serves the pharmacists' page (``static/``), which loads pusher-js from
  ``node_modules`` and the client kit from ``clients/js`` (no build step).

Users authenticate with ``Authorization: Bearer <token>``. Run it with
``uvicorn --factory examples.pharmacy.app:app_from_env`` (settings from ``OUTBOX_*`` and
``PUSHER_*`` variables) or build it in tests with :func:`create_app`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from examples.pharmacy import db
from examples.pharmacy.notifications import KICK_WORKERS, ORDER_CREATED, ORDER_DETAILS, build_outbox
from outbox import (
    CatchUp,
    ChannelAuthorizer,
    NotificationType,
    Settings,
    load_settings,
    new_opaque_id,
)
from outbox.publisher import PusherPublisher
from outbox.store import Store, create_engine

MAX_AUTH_BODY_BYTES = 4096
MAX_LISTED_ORDERS = 200
REPO_ROOT = Path(__file__).resolve().parents[2]
STATIC_DIR = Path(__file__).resolve().parent / "static"
# Served as-is, no build step: the official SDK's browser build and our client kit.
PUSHER_JS = (
    REPO_ROOT / "node_modules" / "pusher-js" / "dist" / "web" / "pusher-with-encryption.min.js"
)
CLIENT_KIT = REPO_ROOT / "clients" / "js" / "pusher-outbox.js"
PAGE_FILES = {
    "pharmacy.css": "text/css; charset=utf-8",
    "pharmacy.js": "text/javascript; charset=utf-8",
}
# channel_history(after_seq=…) with a position no channel reaches: no rows, only last_seq.
_BEYOND_ANY_SEQ = 2**62


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, detached from any session. Holds opaque ids only."""

    user_id: str
    role: str
    pharmacy_id: str | None


class OrderIn(BaseModel):
    pharmacy_id: str = Field(max_length=64)
    patient_name: str = Field(min_length=1, max_length=200)
    medication: str = Field(min_length=1, max_length=200)
    dosage: str = Field(min_length=1, max_length=100)
    quantity: int  # the range is the database's rule (see db.Order)


def may_subscribe(
    user: Principal, channel: str, notification_type: NotificationType, ids: Mapping[str, str]
) -> bool:
    """The application's rule: pharmacists see their own pharmacy's channels, nothing else."""
    return (
        user.role == "pharmacist"
        and user.pharmacy_id is not None
        and ids.get("pharmacy_id") == user.pharmacy_id
    )


def order_json(order: db.Order) -> dict[str, Any]:
    created_at = order.created_at
    if created_at.tzinfo is None:  # SQLite returns the stored UTC time without its zone
        created_at = created_at.replace(tzinfo=dt.UTC)
    return {
        "order_id": order.public_id,
        "pharmacy_id": order.pharmacy.public_id,
        "status": order.status,
        "patient_name": order.patient_name,
        "medication": order.medication,
        "dosage": order.dosage,
        "quantity": order.quantity,
        "created_at": created_at.isoformat(),
    }


def current_user(request: Request) -> Principal:
    """The caller of ``Authorization: Bearer <token>``; 401 without a valid token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"}
        )
    with Session(request.app.state.engine) as session:
        user = db.user_for_token(session, token.strip())
        if user is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return Principal(
            user.public_id, user.role, user.pharmacy.public_id if user.pharmacy else None
        )


CurrentUser = Annotated[Principal, Depends(current_user)]


def pharmacy_channels(pharmacy_id: str) -> dict[str, str]:
    """The pharmacy's two channels: ``orders`` (opaque ids) and ``details`` (encrypted)."""
    ids = {"pharmacy_id": pharmacy_id}
    return {"orders": ORDER_CREATED.channel_for(ids), "details": ORDER_DETAILS.channel_for(ids)}


def channel_position(store: Store, channel: str) -> int:
    """The channel's newest ``seq`` (0 before its first event)."""
    return int(store.channel_history(channel, after_seq=_BEYOND_ANY_SEQ, limit=1)["last_seq"])


def page_headers(settings: Settings) -> dict[str, str]:
    """Headers of the page and its scripts: nothing but our own scripts runs, the websocket may
    reach only the configured Pusher host, and no URL (the page's carries a token) is sent on
    as a referrer."""
    if settings.pusher_host:
        scheme = "wss" if settings.pusher_scheme == "https" else "ws"
        port = f":{settings.pusher_port}" if settings.pusher_port else ""
        socket_origin = f"{scheme}://{settings.pusher_host}{port}"
    else:
        socket_origin = f"wss://ws-{settings.pusher_cluster or 'mt1'}.pusher.com"
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {socket_origin}; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def pusher_client_config(settings: Settings) -> dict[str, Any]:
    """What pusher-js needs to connect: the app key (public) and where the server is."""
    config: dict[str, Any] = {"key": settings.pusher_key, "cluster": settings.pusher_cluster}
    if settings.pusher_host:
        tls = settings.pusher_scheme == "https"
        port = settings.pusher_port or (443 if tls else 80)
        config.update(
            {
                "cluster": settings.pusher_cluster or "mt1",  # pusher-js insists on one
                "wsHost": settings.pusher_host,
                "wsPort": port,
                "wssPort": port,
                "forceTLS": tls,
                "enabledTransports": ["wss" if tls else "ws"],
            }
        )
    return config


def create_app(
    settings: Settings, *, on_commit: Any = KICK_WORKERS, engine: Engine | None = None
) -> FastAPI:
    """Build the app on ``settings`` (database, Pusher credentials, encryption master key).

    The outbox tables must already be migrated; the service's own tables are created here if
    missing. ``on_commit`` defaults to kicking the Celery relay (``workers.kick``).
    """
    owns_engine = engine is None
    engine = engine if engine is not None else create_engine(settings.database_url)
    db.create_tables(engine)
    outbox = build_outbox(settings, on_commit=on_commit)
    authorizer = ChannelAuthorizer(
        outbox=outbox,
        pusher_client=PusherPublisher.from_settings(settings).client,
        may_subscribe=may_subscribe,
        engine=engine,
        user_ref=lambda user: user.user_id,
    )
    store = Store(engine)
    catch_up = CatchUp(store=store, authorizer=authorizer)
    security_headers = page_headers(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_engine:
            engine.dispose()

    app = FastAPI(title="Pharmacy orders (pusher-outbox example)", lifespan=lifespan)
    app.state.engine = engine
    app.state.outbox = outbox

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default answer echoes the submitted values, here PHI that proxies and
        # client logs would keep. Name the fields and the rules only.
        errors = [
            {"loc": list(error.get("loc", ())), "type": error.get("type"), "msg": error.get("msg")}
            for error in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/orders", status_code=201)
    def create_order(order_in: OrderIn, user: CurrentUser) -> dict[str, Any]:
        if user.role != "intake" and user.pharmacy_id != order_in.pharmacy_id:
            raise HTTPException(403, "you may create orders for your own pharmacy only")
        try:
            with Session(engine) as session, session.begin():
                pharmacy = session.scalar(
                    select(db.Pharmacy).where(db.Pharmacy.public_id == order_in.pharmacy_id)
                )
                if pharmacy is None:
                    raise HTTPException(422, "unknown pharmacy_id")
                order = db.Order(
                    public_id=new_opaque_id("ord"),  # needed before the flush
                    pharmacy=pharmacy,
                    status="pending",
                    patient_name=order_in.patient_name,
                    medication=order_in.medication,
                    dosage=order_in.dosage,
                    quantity=order_in.quantity,
                )
                session.add(order)
                ids = {"pharmacy_id": pharmacy.public_id}
                created = outbox.enqueue(
                    session,
                    ORDER_CREATED,
                    ids=ids,
                    data={"order_id": order.public_id, "status": "pending"},
                    dedup_key=f"order.created:{order.public_id}",
                )
                details = outbox.enqueue(
                    session,
                    ORDER_DETAILS,
                    ids=ids,
                    data={
                        "order_id": order.public_id,
                        "patient_name": order.patient_name,
                        "medication": order.medication,
                        "dosage": order.dosage,
                        "quantity": order.quantity,
                    },
                    dedup_key=f"order.details:{order.public_id}",
                )
                # The order reaches the database only now, after both notifications were
                # written, and the database may still refuse it (the quantity CHECK). Then the
                # whole transaction rolls back: no order, no outbox rows, nothing is sent.
                session.flush()
                public_id = order.public_id
        except IntegrityError:
            # Never log or echo the exception: its text holds the statement's parameters (PHI).
            raise HTTPException(
                422,
                f"quantity must be between {db.MIN_QUANTITY} and {db.MAX_QUANTITY}; "
                "nothing was saved or sent",
            ) from None
        return {
            "order_id": public_id,
            "pharmacy_id": order_in.pharmacy_id,
            "status": "pending",
            "event_ids": [created.event_id, details.event_id],
        }

    @app.get("/me")
    def me(user: CurrentUser) -> dict[str, Any]:
        pharmacy = None
        if user.pharmacy_id is not None:
            with Session(engine) as session:
                name = session.scalar(
                    select(db.Pharmacy.name).where(db.Pharmacy.public_id == user.pharmacy_id)
                )
            pharmacy = {
                "pharmacy_id": user.pharmacy_id,
                "name": name,
                "channels": pharmacy_channels(user.pharmacy_id),
            }
        return {"user_id": user.user_id, "role": user.role, "pharmacy": pharmacy}

    @app.get("/orders")
    def list_orders(user: CurrentUser) -> dict[str, Any]:
        """The caller's pharmacy's pending orders (oldest first) and its channels' positions.

        Positions are read *before* the orders: an order committed in between is listed and
        also arrives as an event after the position (the client keys orders by id), so nothing
        falls between the list and the live feed.
        """
        if user.role != "pharmacist" or user.pharmacy_id is None:
            raise HTTPException(403, "only pharmacists have a list of orders")
        channels = pharmacy_channels(user.pharmacy_id)
        positions = {channel: channel_position(store, channel) for channel in channels.values()}
        with Session(engine) as session:
            orders = session.scalars(
                select(db.Order)
                .join(db.Order.pharmacy)
                .where(db.Pharmacy.public_id == user.pharmacy_id, db.Order.status == "pending")
                .order_by(db.Order.id.desc())
                .limit(MAX_LISTED_ORDERS)
            ).all()
            listed = [order_json(order) for order in reversed(orders)]
        return {"orders": listed, "positions": positions}

    @app.get("/orders/{order_id}")
    def get_order(order_id: str, user: CurrentUser) -> dict[str, Any]:
        with Session(engine) as session:
            order = session.scalar(select(db.Order).where(db.Order.public_id == order_id))
            # One answer for "no such order" and "not yours": ids cannot be probed.
            if order is None or order.pharmacy.public_id != user.pharmacy_id:
                raise HTTPException(404, "no such order")
            return order_json(order)

    @app.post("/pusher/auth")
    async def pusher_auth(request: Request, user: CurrentUser) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_AUTH_BODY_BYTES:
            return JSONResponse({"error": "request body too large"}, status_code=400)
        params = _auth_params(body, request.headers.get("content-type", ""))
        answer = await run_in_threadpool(authorizer.handle, user, params)
        return JSONResponse(answer.body, status_code=answer.status)

    @app.get("/pusher/catchup")
    async def pusher_catchup(request: Request, user: CurrentUser) -> JSONResponse:
        params = {key: request.query_params.get(key) for key in ("channel", "after_seq")}
        answer = await run_in_threadpool(catch_up.handle, user, params)
        return JSONResponse(
            answer.body, status_code=answer.status, headers={"Cache-Control": "no-store"}
        )

    # --- the pharmacists' page (static files, no build step) ---------------------------------

    @app.get("/pusher/config")
    def pusher_config() -> dict[str, Any]:
        return pusher_client_config(settings)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers=dict(security_headers),
        )

    @app.get("/static/{name}", include_in_schema=False)
    def page_file(name: str) -> FileResponse:
        media_type = PAGE_FILES.get(name)
        if media_type is None:  # a fixed list: no path from the URL reaches the file system
            raise HTTPException(404, "not found")
        return FileResponse(
            STATIC_DIR / name, media_type=media_type, headers=dict(security_headers)
        )

    @app.get("/vendor/pusher-with-encryption.min.js", include_in_schema=False)
    def pusher_js() -> Response:
        return _script(PUSHER_JS, security_headers, "run `make install` (npm ci) for pusher-js")

    @app.get("/kit/pusher-outbox.js", include_in_schema=False)
    def client_kit() -> Response:
        return _script(CLIENT_KIT, security_headers, "clients/js/pusher-outbox.js is missing")

    return app


def _script(path: Path, headers: Mapping[str, str], hint: str) -> Response:
    if not path.is_file():
        return JSONResponse({"error": f"not installed: {hint}"}, status_code=503)
    return FileResponse(path, media_type="text/javascript; charset=utf-8", headers=dict(headers))


def _auth_params(body: bytes, content_type: str) -> dict[str, Any]:
    """The form fields pusher-js posts (``application/x-www-form-urlencoded``), or JSON."""
    text = body.decode("utf-8", errors="replace")
    if content_type.split(";", 1)[0].strip().lower() == "application/json":
        try:
            parsed = json.loads(text)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return dict(parse_qsl(text, keep_blank_values=True))


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from the environment (and ``.env``)."""
    return create_app(load_settings())
