"""The pharmacy service's HTTP API (FastAPI).

- ``POST /orders`` (intake desk, or a pharmacist for their own pharmacy) saves an order and
  enqueues both notifications in the same transaction: all three commit together or not at all.
- ``GET /orders/{order_id}`` returns an order's details to the pharmacists of its pharmacy only
  (404 for everyone else, so ids of other pharmacies' orders cannot be probed).
- ``POST /pusher/auth`` is the channel authorization endpoint pusher-js calls (form fields
  ``socket_id`` and ``channel_name``); :class:`outbox.ChannelAuthorizer` checks the request, asks
  :func:`may_subscribe` and signs only what it allows.

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
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from examples.pharmacy import db
from examples.pharmacy.notifications import KICK_WORKERS, ORDER_CREATED, ORDER_DETAILS, build_outbox
from outbox import ChannelAuthorizer, NotificationType, Settings, load_settings, new_opaque_id
from outbox.publisher import PusherPublisher
from outbox.store import create_engine

MAX_AUTH_BODY_BYTES = 4096


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

    return app


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
