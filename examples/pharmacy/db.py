"""The pharmacy service's own tables, next to the outbox's in the same database.

They live in their own :class:`~sqlalchemy.MetaData` and are created with ``create_all``; the
outbox tables come from its Alembic migrations (``outbox migrate`` or
``outbox.migration.upgrade_to_head``). Sharing the database is the point: an order and its
notifications commit, or roll back, together.

Every record that leaves the service is named by an opaque id (``pha_…``, ``usr_…``, ``ord_…``
from :func:`outbox.new_opaque_id`); the integer primary keys stay inside. API tokens are stored
as SHA-256 digests only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, MetaData, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from outbox import new_opaque_id

MIN_QUANTITY = 1
MAX_QUANTITY = 1000
QUANTITY_CHECK = "ck_pharmacy_orders_quantity_range"


class Base(DeclarativeBase):
    metadata = MetaData()


class Pharmacy(Base):
    __tablename__ = "pharmacy_pharmacies"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(
        String(64), unique=True, default=lambda: new_opaque_id("pha")
    )
    name: Mapped[str] = mapped_column(String(200))


class User(Base):
    """A person using the API: a pharmacist of one pharmacy, or the service's intake desk."""

    __tablename__ = "pharmacy_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(
        String(64), unique=True, default=lambda: new_opaque_id("usr")
    )
    role: Mapped[str] = mapped_column(String(20))  # "pharmacist" | "intake"
    pharmacy_id: Mapped[int | None] = mapped_column(ForeignKey(Pharmacy.id))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)

    pharmacy: Mapped[Pharmacy | None] = relationship(lazy="joined")


class Order(Base):
    """A prescription order to be filled and posted by one pharmacy. Holds PHI."""

    __tablename__ = "pharmacy_orders"
    __table_args__ = (
        # Checked by the database when the order is flushed, which the app does after enqueueing
        # the notifications: a refused order shows that they roll back with it.
        CheckConstraint(f"quantity BETWEEN {MIN_QUANTITY} AND {MAX_QUANTITY}", name=QUANTITY_CHECK),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(
        String(64), unique=True, default=lambda: new_opaque_id("ord")
    )
    pharmacy_id: Mapped[int] = mapped_column(ForeignKey(Pharmacy.id), index=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    patient_name: Mapped[str] = mapped_column(String(200))
    medication: Mapped[str] = mapped_column(String(200))
    dosage: Mapped[str] = mapped_column(String(100))
    quantity: Mapped[int]
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: dt.datetime.now(dt.UTC)
    )

    pharmacy: Mapped[Pharmacy] = relationship(lazy="joined")


def create_tables(engine: Engine) -> None:
    """Create the service's tables if they are missing (the outbox's are migrated separately)."""
    Base.metadata.create_all(engine)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def user_for_token(session: Session, token: str) -> User | None:
    """The user whose API token is ``token``, or ``None``."""
    return session.scalar(select(User).where(User.token_sha256 == token_digest(token)))


@dataclass(frozen=True)
class Account:
    """A seeded user and the API token to act as them (shown once, stored hashed)."""

    user_id: str
    role: str
    pharmacy_id: str | None
    token: str


@dataclass(frozen=True)
class Seeded:
    pharmacies: dict[str, str]  # opaque pharmacy id -> display name
    pharmacists: dict[str, Account]  # opaque pharmacy id -> its pharmacist
    intake: Account


def seed(engine: Engine, pharmacy_names: tuple[str, ...] = ("Riverside", "Hilltop")) -> Seeded:
    """Add one pharmacy per name with one pharmacist each, plus an intake desk account."""
    pharmacies: dict[str, str] = {}
    pharmacists: dict[str, Account] = {}
    with Session(engine) as session, session.begin():
        for name in pharmacy_names:
            pharmacy = Pharmacy(name=f"{name} Pharmacy")
            token = _new_token()
            user = User(role="pharmacist", pharmacy=pharmacy, token_sha256=token_digest(token))
            session.add_all([pharmacy, user])
            session.flush()
            pharmacies[pharmacy.public_id] = pharmacy.name
            pharmacists[pharmacy.public_id] = Account(
                user.public_id, user.role, pharmacy.public_id, token
            )
        token = _new_token()
        intake = User(role="intake", token_sha256=token_digest(token))
        session.add(intake)
        session.flush()
        intake_account = Account(intake.public_id, intake.role, None, token)
    return Seeded(pharmacies=pharmacies, pharmacists=pharmacists, intake=intake_account)


def _new_token() -> str:
    return "tok_" + secrets.token_urlsafe(32)
