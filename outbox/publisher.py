"""The Pusher side: publish batches with the official ``pusher`` SDK and classify every outcome.

The SDK builds and signs each request (right before it is sent, never ahead of time). We give it
a small HTTP backend of our own so that we can read the status, the body *and* the headers
(``Retry-After``) and translate every library error into a
:class:`~outbox.errors.TransientPublishError` or :class:`~outbox.errors.PermanentPublishError`
whose reason is a fixed, payload-free text.

Two SDK behaviours we deliberately avoid (see DESIGN.md, "Pusher facts that bite"):

* ``trigger_batch`` encrypts by rewriting the dicts it is given, and measures sizes with
  ``sys.getsizeof``. We build fresh dicts on every call, encrypt each event's data ourselves as
  the SDK's ``pusher.crypto.encrypt`` does (its key derivation, NaCl secretbox, its wire format;
  see :class:`_Sealer`), and pass ``already_encoded=True``. A retried batch is therefore
  encrypted exactly once per attempt, from the stored plaintext.
* soketi (and proxies) may answer an error with HTTP 200 and ``{"error": …, "code": N}``. The SDK
  returns such a body as success; we read the body and treat it as the error ``code`` says.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import json
import os
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import nacl.bindings
import nacl.secret
import nacl.utils
import pusher
import requests
import urllib3
from pusher import crypto
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from outbox.errors import (
    ConfigurationError,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
)
from outbox.policy import ENCRYPTED_PREFIX

MAX_BATCH_EVENTS = 10  # Pusher's limit for one batch request


@dataclass(frozen=True)
class OutgoingEvent:
    """One event to publish. ``data`` is the plaintext data text (JSON)."""

    channel: str
    name: str
    data: str
    socket_id: str | None = None


class Publisher(Protocol):
    """What the relay needs from the Pusher side."""

    def publish_batch(self, events: Sequence[OutgoingEvent]) -> None:
        """Publish up to :data:`MAX_BATCH_EVENTS` events in one request, or raise PublishError."""


# --- outcome classification ------------------------------------------------------------------
#
# Every outcome of a publish request maps to exactly one row of this table (tested one by one).
# Decisions taken from Pusher's HTTP API documentation:
#   * 401 with a timestamp complaint means our clock is off by more than ~600 s. A later attempt is
#     signed afresh and may succeed once NTP catches up: transient.
#   * 403 is "app disabled or over the message quota". Over-quota lifts when the quota resets
#     (daily) or the plan changes: transient with a long delay. Any other 403 is permanent.
#   * 413 and 400 describe the request itself; sending it again cannot succeed: permanent.

CLOCK_SKEW_DELAY_SECONDS = 30.0
QUOTA_DELAY_SECONDS = 300.0


def classify(status: int, body: str, headers: Any = None) -> PublishError | None:
    """Map an HTTP answer to ``None`` (accepted) or the error to raise."""
    code = status
    text = body or ""
    if status in (200, 202):
        error_code = _error_code_in_body(text)
        if error_code is None:
            return None
        code = error_code
    retry_after = _retry_after_seconds(headers)
    lowered = text.lower()
    if code == 429:
        return TransientPublishError(
            "HTTP 429 from Pusher: rate limited", status=code, retry_after_seconds=retry_after
        )
    if code >= 500:
        return TransientPublishError(
            f"HTTP {code} from Pusher: server error", status=code, retry_after_seconds=retry_after
        )
    if code == 401 and "timestamp" in lowered:
        return TransientPublishError(
            "HTTP 401 from Pusher: request timestamp rejected (clock skew); will re-sign",
            status=code,
            retry_after_seconds=max(retry_after or 0.0, CLOCK_SKEW_DELAY_SECONDS),
        )
    if code == 401:
        return PermanentPublishError(
            "HTTP 401 from Pusher: authentication failed (check PUSHER_KEY/PUSHER_SECRET)",
            status=code,
        )
    if code == 403 and ("quota" in lowered or "limit" in lowered or "over" in lowered):
        return TransientPublishError(
            "HTTP 403 from Pusher: over quota; will retry after the quota resets",
            status=code,
            retry_after_seconds=max(retry_after or 0.0, QUOTA_DELAY_SECONDS),
        )
    if code == 403:
        return PermanentPublishError(
            "HTTP 403 from Pusher: forbidden (app disabled or not allowed)", status=code
        )
    if code == 404:
        return PermanentPublishError(
            "HTTP 404 from Pusher: unknown app or path (check PUSHER_APP_ID and the host)",
            status=code,
        )
    if code == 407:
        # The proxy in between refused us (a forwarding proxy answers plain-HTTP requests
        # itself): nothing is wrong with the event, so keep it and retry while it is fixed.
        return TransientPublishError(
            "HTTP 407 from the proxy: proxy authentication required (check the credentials in "
            "HTTPS_PROXY/HTTP_PROXY/ALL_PROXY)",
            status=code,
            retry_after_seconds=retry_after,
        )
    if code == 413:
        return PermanentPublishError("HTTP 413 from Pusher: event data too large", status=code)
    if code == 400:
        return PermanentPublishError(
            "HTTP 400 from Pusher: request rejected as invalid", status=code
        )
    if 400 <= code < 500:
        return PermanentPublishError(f"HTTP {code} from Pusher: client error", status=code)
    return TransientPublishError(f"HTTP {code} from Pusher: unexpected status", status=code)


def _error_code_in_body(text: str) -> int | None:
    """The error code of a ``{"error": …, "code": N}`` body answered with HTTP 200, if any."""
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        return None
    if isinstance(parsed, dict) and "error" in parsed:
        code = parsed.get("code")
        return code if isinstance(code, int) and code >= 400 else 400
    return None


def _retry_after_seconds(headers: Any) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def translate_exception(exc: BaseException) -> PublishError:
    """Map an exception from the HTTP client or the SDK to a payload-free PublishError."""
    if isinstance(exc, PublishError):
        return exc
    # urllib3 (what the relay's backend sends with). NewConnectionError is a subclass of
    # ConnectTimeoutError: a refused or unresolvable host is "could not reach", not a timeout.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return TransientPublishError("connection error: could not reach Pusher")
    if isinstance(exc, urllib3.exceptions.ProxyError):
        return TransientPublishError(
            "proxy error: could not reach Pusher through the proxy "
            "(check HTTPS_PROXY/HTTP_PROXY/ALL_PROXY and NO_PROXY)"
        )
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return TransientPublishError("timeout: could not connect to Pusher in time; will retry")
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return TransientPublishError(
            "timeout: Pusher did not answer in time; delivery unknown, will retry"
        )
    if isinstance(exc, urllib3.exceptions.SSLError):
        return TransientPublishError("TLS error: could not establish a secure connection to Pusher")
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return TransientPublishError(
            "connection error: the connection to Pusher broke; delivery unknown, will retry"
        )
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return TransientPublishError(f"HTTP client error ({type(exc).__name__})")
    if isinstance(exc, requests.ConnectTimeout):
        return TransientPublishError("timeout: could not connect to Pusher in time; will retry")
    if isinstance(exc, requests.Timeout):
        return TransientPublishError(
            "timeout: Pusher did not answer in time; delivery unknown, will retry"
        )
    if isinstance(exc, requests.ConnectionError):
        return TransientPublishError("connection error: could not reach Pusher")
    if isinstance(exc, requests.RequestException):
        return TransientPublishError(f"HTTP client error ({type(exc).__name__})")
    if isinstance(exc, pusher.errors.PusherBadRequest):
        return PermanentPublishError(
            "HTTP 400 from Pusher: request rejected as invalid", status=400
        )
    if isinstance(exc, pusher.errors.PusherBadAuth):
        return PermanentPublishError("HTTP 401 from Pusher: authentication failed", status=401)
    if isinstance(exc, pusher.errors.PusherForbidden):
        return PermanentPublishError("HTTP 403 from Pusher: forbidden", status=403)
    if isinstance(exc, pusher.errors.PusherBadStatus):
        status = _leading_status(str(exc))
        return classify(status, "") or TransientPublishError("unexpected answer from Pusher")
    if isinstance(exc, ValueError | TypeError):
        # The SDK validates names and data before sending: nothing was sent.
        return PermanentPublishError(
            f"rejected by the Pusher SDK before sending ({type(exc).__name__})"
        )
    return TransientPublishError(f"unexpected error while publishing ({type(exc).__name__})")


def _leading_status(text: str) -> int:
    head = text.split(":", 1)[0].strip()
    return int(head) if head.isdigit() else 500


# Proxy schemes urllib3 speaks itself, and those it speaks once its SOCKS extra is installed.
HTTP_PROXY_SCHEMES = frozenset({"http", "https"})
SOCKS_PROXY_SCHEMES = frozenset({"socks4", "socks4a", "socks5", "socks5h"})
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@dataclass(frozen=True)
class _Proxy:
    """The proxy chosen for a publisher's host. ``url`` carries no credentials."""

    variable: str  # the environment variable it came from, named in error texts
    scheme: str
    url: str
    username: str = field(repr=False)
    password: str = field(repr=False)


def _proxy_for(url: str) -> _Proxy | None:
    """The proxy ``requests`` would use for ``url``, read from the environment, or ``None``.

    As ``requests`` does: ``NO_PROXY`` first (``get_environ_proxies`` gives nothing for a host it
    covers), then the first of ``scheme://host``, ``scheme``, ``all://host``, ``all``
    (``select_proxy``), so ``HTTPS_PROXY``/``HTTP_PROXY`` win over ``ALL_PROXY``. A proxy URL
    without ``://`` is read as ``http://`` (``requests`` means to, but misreads ``proxy:3128``
    as a scheme when the host has no dot). Credentials in the URL are percent-decoded
    (``get_auth_from_url``). Raises :class:`ConfigurationError` naming the variable, never its
    value, when the URL cannot be used.
    """
    proxies = requests.utils.get_environ_proxies(url)
    parts = urllib.parse.urlsplit(url)
    keys = (f"{parts.scheme}://{parts.hostname}", parts.scheme, f"all://{parts.hostname}", "all")
    key = next((key for key in keys if proxies.get(key)), None)
    if key is None:
        return None
    lowercase = f"{key}_proxy"  # urllib's getproxies prefers the lowercase variable
    variable = lowercase if os.environ.get(lowercase) else lowercase.upper()
    raw = proxies[key]
    if "://" not in raw:
        raw = f"http://{raw}"
    usage = (
        "set it to http://[user:password@]host:port (or https://...; socks4://, socks5:// "
        "and socks5h:// need urllib3[socks] installed), or unset it"
    )
    try:
        parsed = urllib3.util.parse_url(raw)
    except urllib3.exceptions.LocationValueError:
        raise ConfigurationError(f"{variable}: not a valid proxy URL; {usage}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in HTTP_PROXY_SCHEMES | SOCKS_PROXY_SCHEMES:
        raise ConfigurationError(f"{variable}: unsupported proxy scheme; {usage}")
    if scheme in SOCKS_PROXY_SCHEMES and _socks_proxy_manager() is None:
        raise ConfigurationError(
            f"{variable}: SOCKS proxy but urllib3's SOCKS support is not installed; "
            f"install urllib3[socks] or {usage}"
        )
    if not parsed.host:
        raise ConfigurationError(f"{variable}: the proxy URL has no host; {usage}")
    username, password = requests.utils.get_auth_from_url(raw)
    return _Proxy(
        variable=variable,
        scheme=scheme,
        url=parsed._replace(scheme=scheme, auth=None).url,
        username=username,
        password=password,
    )


def _proxy_headers(proxy: _Proxy) -> dict[str, str]:
    """``Proxy-Authorization`` from the proxy URL's credentials, built as ``requests`` builds it:
    Basic, Latin-1, and nothing when the URL has no user name."""
    if not proxy.username:
        return {}
    try:
        return urllib3.make_headers(proxy_basic_auth=f"{proxy.username}:{proxy.password}")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{proxy.variable}: the proxy user name and password must be Latin-1 text, as "
            "Basic authentication sends them; use credentials without other characters"
        ) from None


def _socks_proxy_manager() -> type[urllib3.PoolManager] | None:
    """urllib3's ``SOCKSProxyManager`` if PySocks is installed (as ``requests`` imports it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.DependencyWarning)
        try:
            from urllib3.contrib.socks import SOCKSProxyManager
        except ImportError:
            return None
    return SOCKSProxyManager


def _tls_from_environment() -> dict[str, Any]:
    """Certificate checks as ``requests`` sets them up: ``REQUESTS_CA_BUNDLE``, else
    ``CURL_CA_BUNDLE``; a directory goes to ``ca_cert_dir``, a file to ``ca_certs``; neither set
    means certifi's bundle. A path that names nothing is a :class:`ConfigurationError` now rather
    than an error on every request."""
    variable = next((name for name in CA_BUNDLE_VARIABLES if os.environ.get(name)), None)
    if variable is None:
        return {"cert_reqs": "CERT_REQUIRED", "ca_certs": DEFAULT_CA_BUNDLE_PATH}
    location = os.environ[variable]
    if os.path.isdir(location):
        return {"cert_reqs": "CERT_REQUIRED", "ca_cert_dir": location}
    if os.path.isfile(location):
        return {"cert_reqs": "CERT_REQUIRED", "ca_certs": location}
    raise ConfigurationError(
        f"{variable} names no file or directory; point it at a PEM bundle or a directory of "
        "hashed certificates (c_rehash), or unset it to use certifi's bundle"
    )


class _Backend:
    """An HTTP backend for the SDK that reads status, body and headers.

    The SDK builds and signs every request (right before it is sent); this backend sends it with
    ``urllib3``: one thread-safe connection pool per publisher keeping ``max_connections``
    connections (one per publishing lane), connections reused where the server allows it, no
    redirects, no automatic retries (the relay decides), and every error translated into a
    payload-free :class:`PublishError`. ``urllib3`` rather than ``requests`` (the SDK's default):
    ``requests`` costs about as much CPU per request again as everything else the relay does to
    publish it (0.76 vs 0.41 ms per request of 10 encrypted events, measured against soketi), and
    it is the relay's hottest path.

    The environment is honoured as ``requests`` reads it, once, when the publisher is built (its
    host never changes): the proxy from ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` unless
    ``NO_PROXY`` covers the host, with the URL's credentials sent as ``Proxy-Authorization``
    (see :func:`_proxy_for`), and the CA bundle (see :func:`_tls_from_environment`).
    """

    def __init__(self, client: Any, *, max_connections: int = 4, **options: Any) -> None:
        self.client = client
        scheme = "https" if client.ssl else "http"
        proxy = _proxy_for(f"{scheme}://{client.host}:{client.port}/")
        self.proxy: str | None = proxy.url if proxy else None
        tls: dict[str, Any] = {}
        if client.ssl or (proxy is not None and proxy.scheme == "https"):
            tls = _tls_from_environment()
        self.ca_certs: str | None = tls.get("ca_certs")
        self.ca_cert_dir: str | None = tls.get("ca_cert_dir")
        common: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": max_connections,
            "block": False,
            "retries": False,
            "timeout": urllib3.Timeout(connect=client.timeout, read=client.timeout),
            **tls,
            **options,
        }
        self.pool: urllib3.PoolManager
        if proxy is None:
            self.pool = urllib3.PoolManager(**common)
        elif proxy.scheme in SOCKS_PROXY_SCHEMES:
            socks_manager: Any = _socks_proxy_manager()
            self.pool = socks_manager(
                proxy.url,
                username=proxy.username or None,
                password=proxy.password or None,
                **common,
            )
        else:
            self.pool = urllib3.ProxyManager(
                proxy.url, proxy_headers=_proxy_headers(proxy), **common
            )

    def send_request(self, request: Any) -> Any:
        try:
            response = self.pool.request(
                request.method,
                request.url,
                body=request.body,
                headers=request.headers,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise translate_exception(exc) from None
        text = response.data.decode("utf-8", errors="replace")
        error = classify(response.status, text, response.headers)
        if error is not None:
            raise error
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return {}


# Channels whose encryption box a publisher keeps (see _Sealer).
SEALED_CHANNELS_KEPT = 4096


class _Sealer:
    """End-to-end encryption of an event's data, exactly as ``pusher.crypto.encrypt`` does it.

    The SDK derives a channel's key (SHA-256 of the channel name and the master key, its own
    ``generate_shared_secret``) and builds a NaCl ``SecretBox`` for every event it encrypts. The
    key depends on the channel only, so it is derived once per channel (the most recent
    :data:`SEALED_CHANNELS_KEPT` channels) and every event gets a fresh random nonce, as before:
    the output is the SDK's ``{"nonce": …, "ciphertext": …}`` in base64, byte for byte the same
    shape, and subscribers decrypt it with the shared secret the authorizer hands out.
    """

    def __init__(self, master_key: bytes) -> None:
        self._master_key = master_key
        self._key = functools.lru_cache(maxsize=SEALED_CHANNELS_KEPT)(self._derive_key)

    def _derive_key(self, channel: str) -> bytes:
        return bytes(crypto.generate_shared_secret(channel.encode("utf-8"), self._master_key))

    def seal(self, channel: str, data: str) -> str:
        nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
        # What SecretBox.encrypt does, without the nonce + ciphertext copy it also builds (the
        # binding of PyNaCl 1.5 and 1.6 alike); and json.dumps's output for two base64 strings
        # (nothing in them needs escaping).
        ciphertext = nacl.bindings.crypto_secretbox(data.encode("utf-8"), nonce, self._key(channel))
        return (
            '{"nonce": "'
            + base64.b64encode(nonce).decode("ascii")
            + '", "ciphertext": "'
            + base64.b64encode(ciphertext).decode("ascii")
            + '"}'
        )


class PusherPublisher:
    """Publishes batches with the official SDK. One instance per process (it holds a pool).

    ``publish_concurrency`` is how many batches are published at once (the relay's lanes); the
    connection pool keeps that many connections to Pusher, so no lane waits for or reopens one.
    """

    def __init__(
        self,
        *,
        app_id: str,
        key: str,
        secret: str,
        cluster: str | None = None,
        host: str | None = None,
        port: int | None = None,
        ssl: bool = True,
        encryption_master_key: bytes | None = None,
        timeout_seconds: float = 5.0,
        publish_concurrency: int = 4,
    ) -> None:
        if publish_concurrency < 1:
            raise ValueError("publish_concurrency must be at least 1")
        options: dict[str, Any] = {
            "app_id": app_id,
            "key": key,
            "secret": secret,
            "ssl": ssl,
            "timeout": timeout_seconds,
            "backend": _Backend,
            "max_connections": publish_concurrency,  # handed to _Backend by the SDK
        }
        if encryption_master_key is not None:
            # The client also answers channel authorization (shared_secret for encrypted channels).
            options["encryption_master_key_base64"] = base64.b64encode(encryption_master_key)
        if host:
            options["host"] = host
            if port:
                options["port"] = port
        elif cluster:
            options["cluster"] = cluster
        self._client = pusher.Pusher(**options)
        self._sealer = None if encryption_master_key is None else _Sealer(encryption_master_key)

    @classmethod
    def from_settings(cls, settings: Any) -> PusherPublisher:
        settings.require_pusher()
        return cls(
            app_id=settings.pusher_app_id,
            key=settings.pusher_key,
            secret=settings.pusher_secret.get_secret_value(),
            cluster=settings.pusher_cluster,
            host=settings.pusher_host,
            port=settings.pusher_port,
            ssl=settings.pusher_scheme == "https",
            encryption_master_key=settings.encryption_master_key,
            timeout_seconds=settings.publish_timeout_seconds,
            publish_concurrency=settings.publish_concurrency,
        )

    @property
    def client(self) -> Any:
        """The underlying ``pusher.Pusher`` client (used for channel authorization)."""
        return self._client

    def _wire(self, event: OutgoingEvent) -> dict[str, Any]:
        data = event.data
        if event.channel.startswith(ENCRYPTED_PREFIX):
            if self._sealer is None:
                raise PermanentPublishError(
                    "encrypted channel but no encryption master key configured "
                    "(set PUSHER_ENCRYPTION_MASTER_KEY_BASE64)"
                )
            data = self._sealer.seal(event.channel, data)
        wire: dict[str, Any] = {"channel": event.channel, "name": event.name, "data": data}
        if event.socket_id:
            wire["socket_id"] = event.socket_id
        return wire

    def publish_batch(self, events: Sequence[OutgoingEvent]) -> None:
        if not events:
            return
        if len(events) > MAX_BATCH_EVENTS:
            raise ValueError(f"at most {MAX_BATCH_EVENTS} events per batch request")
        # Fresh dicts every call: the SDK may rewrite what it is given.
        batch = [self._wire(event) for event in events]
        try:
            self._client.trigger_batch(batch, already_encoded=True)
        except PublishError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            raise translate_exception(exc) from None
