"""Configuration from environment variables (and a ``.env`` file).

Only this module, the CLI and ``workers/`` read the environment; library objects take explicit
keyword arguments. :func:`load_settings` turns validation failures into a
:class:`~outbox.errors.ConfigurationError` that names the variable and never prints its value.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox.errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite:///.outbox/outbox.db"
DEFAULT_BROKER_URL = "filesystem://"

PositiveSeconds = Annotated[float, Field(gt=0)]


def decode_master_key(value: str) -> bytes:
    """Decode a base64 encryption master key; raise ``ValueError`` unless it is exactly 32 bytes.

    The message never contains the key.
    """
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "is not valid base64; generate a key with `outbox keygen` "
            "(or `openssl rand -base64 32`)"
        ) from None
    if len(raw) != 32:
        raise ValueError(
            f"must decode to exactly 32 bytes, got {len(raw)}; generate a key with "
            "`outbox keygen` (or `openssl rand -base64 32`)"
        )
    return raw


# How long a migration on PostgreSQL waits for a table lock before it gives up (changing
# nothing): a migration's exclusive lock queued behind a long query would otherwise block every
# query that arrives after it.
DEFAULT_MIGRATION_LOCK_TIMEOUT_SECONDS = 10.0


class Settings(BaseSettings):
    """Every setting of pusher-outbox. Field names map to the environment variables shown."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
        populate_by_name=True,
    )

    # --- storage and broker -------------------------------------------------------------
    database_url: str = Field(
        DEFAULT_DATABASE_URL, validation_alias=AliasChoices("OUTBOX_DATABASE_URL")
    )
    broker_url: str = Field(DEFAULT_BROKER_URL, validation_alias=AliasChoices("OUTBOX_BROKER_URL"))
    broker_dir: str = Field(".outbox/broker", validation_alias=AliasChoices("OUTBOX_BROKER_DIR"))
    migration_lock_timeout_seconds: PositiveSeconds = Field(
        DEFAULT_MIGRATION_LOCK_TIMEOUT_SECONDS,
        validation_alias=AliasChoices("OUTBOX_MIGRATION_LOCK_TIMEOUT_SECONDS"),
    )

    # --- Pusher -------------------------------------------------------------------------
    pusher_app_id: str | None = Field(None, validation_alias=AliasChoices("PUSHER_APP_ID"))
    pusher_key: str | None = Field(None, validation_alias=AliasChoices("PUSHER_KEY"))
    pusher_secret: SecretStr | None = Field(None, validation_alias=AliasChoices("PUSHER_SECRET"))
    pusher_cluster: str | None = Field(None, validation_alias=AliasChoices("PUSHER_CLUSTER"))
    pusher_host: str | None = Field(None, validation_alias=AliasChoices("PUSHER_HOST"))
    pusher_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=AliasChoices("PUSHER_PORT")
    )
    pusher_scheme: Literal["http", "https"] = Field(
        "https", validation_alias=AliasChoices("PUSHER_SCHEME")
    )
    pusher_encryption_master_key_base64: SecretStr | None = Field(
        None, validation_alias=AliasChoices("PUSHER_ENCRYPTION_MASTER_KEY_BASE64")
    )
    publish_timeout_seconds: PositiveSeconds = Field(
        5.0, validation_alias=AliasChoices("OUTBOX_PUBLISH_TIMEOUT_SECONDS")
    )

    # --- relay --------------------------------------------------------------------------
    claim_batch_size: int = Field(
        100, ge=1, le=1000, validation_alias=AliasChoices("OUTBOX_CLAIM_BATCH_SIZE")
    )
    lease_seconds: PositiveSeconds = Field(
        30.0, validation_alias=AliasChoices("OUTBOX_LEASE_SECONDS")
    )
    publish_concurrency: int = Field(
        4, ge=1, le=64, validation_alias=AliasChoices("OUTBOX_PUBLISH_CONCURRENCY")
    )
    drain_seconds: PositiveSeconds = Field(
        10.0, validation_alias=AliasChoices("OUTBOX_DRAIN_SECONDS")
    )
    kick_coalesce_seconds: float = Field(
        0.01, ge=0, le=1, validation_alias=AliasChoices("OUTBOX_KICK_COALESCE_SECONDS")
    )
    sweep_interval_seconds: PositiveSeconds = Field(
        5.0, validation_alias=AliasChoices("OUTBOX_SWEEP_INTERVAL_SECONDS")
    )
    max_payload_bytes: int = Field(
        10_240, ge=256, le=1_048_576, validation_alias=AliasChoices("OUTBOX_MAX_PAYLOAD_BYTES")
    )

    # --- retries ------------------------------------------------------------------------
    retry_max_attempts: int = Field(
        10, ge=1, le=1000, validation_alias=AliasChoices("OUTBOX_RETRY_MAX_ATTEMPTS")
    )
    retry_base_delay_seconds: PositiveSeconds = Field(
        1.0, validation_alias=AliasChoices("OUTBOX_RETRY_BASE_DELAY_SECONDS")
    )
    retry_max_delay_seconds: PositiveSeconds = Field(
        300.0, validation_alias=AliasChoices("OUTBOX_RETRY_MAX_DELAY_SECONDS")
    )
    retry_max_age_seconds: PositiveSeconds = Field(
        3600.0, validation_alias=AliasChoices("OUTBOX_RETRY_MAX_AGE_SECONDS")
    )

    # --- monitoring ---------------------------------------------------------------------
    log_format: Literal["text", "json", "kv"] = Field(
        "text", validation_alias=AliasChoices("OUTBOX_LOG_FORMAT")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias=AliasChoices("OUTBOX_LOG_LEVEL")
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=AliasChoices("OUTBOX_METRICS_PORT")
    )
    metrics_host: str = Field("127.0.0.1", validation_alias=AliasChoices("OUTBOX_METRICS_HOST"))
    heartbeat_seconds: PositiveSeconds = Field(
        10.0, validation_alias=AliasChoices("OUTBOX_HEARTBEAT_SECONDS")
    )
    dashboard_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OUTBOX_DASHBOARD_TOKEN")
    )

    # --- retention ----------------------------------------------------------------------
    phi_retention_seconds: float = Field(
        0.0, ge=0, validation_alias=AliasChoices("OUTBOX_PHI_RETENTION_SECONDS")
    )
    payload_retention_seconds: float = Field(
        86_400.0, ge=0, validation_alias=AliasChoices("OUTBOX_PAYLOAD_RETENTION_SECONDS")
    )
    dead_retention_seconds: float = Field(
        7 * 86_400.0, ge=0, validation_alias=AliasChoices("OUTBOX_DEAD_RETENTION_SECONDS")
    )
    row_retention_seconds: float = Field(
        30 * 86_400.0, ge=0, validation_alias=AliasChoices("OUTBOX_ROW_RETENTION_SECONDS")
    )

    @field_validator("pusher_encryption_master_key_base64")
    @classmethod
    def _check_master_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        decode_master_key(value.get_secret_value())
        return value

    @field_validator("dashboard_token")
    @classmethod
    def _check_dashboard_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # an empty variable means "not configured"
        return value

    @field_validator("pusher_app_id")
    @classmethod
    def _check_app_id(cls, value: str | None) -> str | None:
        if value is not None and not value.isdigit():
            raise ValueError("must be the numeric app id shown in the Pusher dashboard")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError(
                "must be a SQLAlchemy URL for SQLite (sqlite:///path.db) or PostgreSQL "
                "(postgresql+psycopg://user@host/db)"
            )
        return value

    @property
    def encryption_master_key(self) -> bytes | None:
        """The decoded 32-byte master key, or ``None`` when encrypted channels are disabled."""
        if self.pusher_encryption_master_key_base64 is None:
            return None
        return decode_master_key(self.pusher_encryption_master_key_base64.get_secret_value())

    def require_pusher(self) -> None:
        """Raise :class:`ConfigurationError` unless the Pusher credentials are complete."""
        missing = [
            env
            for env, value in (
                ("PUSHER_APP_ID", self.pusher_app_id),
                ("PUSHER_KEY", self.pusher_key),
                ("PUSHER_SECRET", self.pusher_secret),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(
                f"missing Pusher credentials: set {', '.join(missing)} (from the app's "
                "'App Keys' page in the Pusher dashboard)"
            )
        if not self.pusher_cluster and not self.pusher_host:
            raise ConfigurationError(
                "missing Pusher endpoint: set PUSHER_CLUSTER (e.g. mt1) or PUSHER_HOST "
                "(with PUSHER_PORT and PUSHER_SCHEME for a self-hosted server)"
            )


def _variable_name(loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]) if loc else "?"
    field = Settings.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return name.upper()


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise :class:`ConfigurationError` on bad values.

    The error names every wrong variable and the fix; it never contains a value.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = [
            f"{_variable_name(error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
