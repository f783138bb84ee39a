"""A real Pusher-protocol websocket subscriber for tests.

:class:`Subscriber` connects like a browser would (``/app/<key>?protocol=7``), subscribes to
public, private and ``private-encrypted-`` channels with the auth a callback returns, decrypts
encrypted events with the channel's shared secret, and records everything it receives.

The API is synchronous: an asyncio loop runs in a daemon thread owned by the subscriber, and
every blocking call is bounded by a timeout. A failure inside the thread (bad frame, event that
does not decrypt) is recorded, never raised there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlencode

import nacl.exceptions
import nacl.secret
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

__all__ = [
    "Authorize",
    "ReceivedEvent",
    "Subscriber",
    "SubscriptionError",
]

Authorize = Callable[[str, str], Mapping[str, Any]]
"""``(socket_id, channel_name) -> auth response``.

The response holds ``auth`` and, depending on the channel, ``shared_secret`` (base64, str or
bytes) and ``channel_data``.
"""

_T = TypeVar("_T")
_ENCRYPTED_PREFIX = "private-encrypted-"
_AUTH_PREFIXES = ("private-", "presence-")


class SubscriptionError(RuntimeError):
    """soketi refused a subscription (``pusher:subscription_error`` or ``pusher:error``)."""


@dataclass(frozen=True)
class ReceivedEvent:
    """One application event as the subscriber saw it.

    ``raw_data`` is the ``data`` string from the wire (for an encrypted channel the
    ``{"nonce", "ciphertext"}`` JSON). ``plaintext`` is the data string after decryption (the
    same as ``raw_data`` on other channels, None when decryption failed) and ``data`` is
    ``plaintext`` parsed as JSON (the string itself when it is not JSON, None on failure).
    """

    channel: str
    event: str
    raw_data: str
    data: Any
    decrypted: bool
    received_at: float
    received_monotonic: float
    plaintext: str | None = None
    decrypt_error: str | None = None


class Subscriber:
    """A websocket client of one Pusher app.

    >>> with Subscriber(server.ws_url, server.key) as sub:
    ...     sub.subscribe("private-encrypted-x", authorize)
    ...     events = sub.wait_for(1, timeout=5)
    """

    def __init__(
        self,
        ws_url: str,
        key: str,
        *,
        timeout_seconds: float = 10.0,
        client_name: str = "py-outbox-test",
        client_version: str = "0.1",
    ) -> None:
        query = urlencode({"protocol": 7, "client": client_name, "version": client_version})
        self.url = f"{ws_url.rstrip('/')}/app/{key}?{query}"
        self.timeout_seconds = timeout_seconds
        self._cond = threading.Condition()
        self._events: list[ReceivedEvent] = []
        self._frames: list[str] = []
        self._errors: list[dict[str, Any]] = []
        self._subscriptions: dict[str, str] = {}  # channel -> pending | succeeded | error text
        self._authorizers: dict[str, Authorize | None] = {}
        self._shared_secrets: dict[str, bytes] = {}
        self._socket_id: str | None = None
        self._closed_connection = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    # -- public API --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def socket_id(self) -> str | None:
        """The socket id of the current connection (None before connecting)."""
        with self._cond:
            return self._socket_id

    @property
    def connected(self) -> bool:
        with self._cond:
            return not self._closed_connection

    @property
    def events(self) -> list[ReceivedEvent]:
        """A copy of the application events received so far, in arrival order."""
        with self._cond:
            return list(self._events)

    @property
    def frames(self) -> list[str]:
        """A copy of every text frame received, verbatim (search them for canaries)."""
        with self._cond:
            return list(self._frames)

    @property
    def errors(self) -> list[dict[str, Any]]:
        """``pusher:error`` / ``pusher:subscription_error`` messages received so far."""
        with self._cond:
            return list(self._errors)

    def connect(self, timeout: float | None = None) -> Self:
        """Open the connection and wait for ``pusher:connection_established``."""
        timeout = self._timeout(timeout)
        if self._loop is None:
            self._start_loop()
        if self.connected:
            return self
        errors_before = len(self.errors)
        self._run(self._connect(), timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._socket_id is None:
                if self._closed_connection or self._errors_since(errors_before):
                    raise ConnectionError(f"connection refused: {self._errors[errors_before:]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no pusher:connection_established within {timeout:g}s")
                self._cond.wait(remaining)
        return self

    def subscribe(
        self,
        channel: str,
        authorize: Authorize | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Subscribe and wait for ``pusher_internal:subscription_succeeded``.

        ``authorize`` is required for private and presence channels; it is called here, in
        the caller's thread. Raises :class:`SubscriptionError` when soketi refuses and
        :class:`TimeoutError` when it does not answer in time.
        """
        timeout = self._timeout(timeout)
        socket_id = self.socket_id
        if socket_id is None:
            raise RuntimeError("not connected: call connect() first")
        data: dict[str, Any] = {"channel": channel}
        secret: bytes | None = None
        if channel.startswith(_AUTH_PREFIXES):
            if authorize is None:
                raise ValueError(f"channel {channel!r} needs an authorize callback")
            auth = authorize(socket_id, channel)
            data["auth"] = auth["auth"]
            if "channel_data" in auth:
                data["channel_data"] = auth["channel_data"]
            if channel.startswith(_ENCRYPTED_PREFIX):
                secret = _decode_shared_secret(auth.get("shared_secret"))
        errors_before = len(self.errors)
        with self._cond:
            self._authorizers[channel] = authorize
            if secret is not None:
                self._shared_secrets[channel] = secret
            self._subscriptions[channel] = "pending"
        self._send({"event": "pusher:subscribe", "data": data}, timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while (state := self._subscriptions.get(channel)) == "pending":
                if self._errors_since(errors_before):
                    error = self._errors[-1]
                    if error.get("channel") in (None, channel):
                        self._subscriptions.pop(channel, None)
                        raise SubscriptionError(f"subscription to {channel!r} refused: {error}")
                if self._closed_connection:
                    raise ConnectionError(f"connection closed while subscribing to {channel!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer to the subscription of {channel!r}")
                self._cond.wait(remaining)
            if state != "succeeded":
                self._subscriptions.pop(channel, None)
                raise SubscriptionError(f"subscription to {channel!r} refused: {state}")

    def unsubscribe(self, channel: str, *, timeout: float | None = None) -> None:
        with self._cond:
            self._subscriptions.pop(channel, None)
            self._authorizers.pop(channel, None)
            self._shared_secrets.pop(channel, None)
        self._send({"event": "pusher:unsubscribe", "data": {"channel": channel}}, timeout)

    def wait_for(self, count: int, timeout: float | None = None) -> list[ReceivedEvent]:
        """Return all events once at least ``count`` arrived; TimeoutError (saying how many
        arrived) otherwise."""
        timeout = self._timeout(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._events) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(self._events)} of {count} events arrived within {timeout:g}s"
                    )
                self._cond.wait(remaining)
            return list(self._events)

    def disconnect(self, timeout: float | None = None) -> None:
        """Close the websocket but keep the recorded events, frames and subscriptions."""
        if self._loop is not None and self.connected:
            self._run(self._close_ws(), self._timeout(timeout))

    def reconnect(self, timeout: float | None = None) -> None:
        """Reconnect (new socket id) and subscribe again to every channel, re-authorizing."""
        timeout = self._timeout(timeout)
        self.disconnect(timeout)
        with self._cond:
            channels = dict(self._authorizers)
            self._socket_id = None
        self.connect(timeout)
        for channel, authorize in channels.items():
            self.subscribe(channel, authorize, timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Close the connection and stop the background thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        timeout = self._timeout(timeout)
        with contextlib.suppress(Exception):
            self._run(self._close_ws(), timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    # -- loop plumbing -----------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout_seconds if timeout is None else timeout

    def _errors_since(self, index: int) -> bool:
        return len(self._errors) > index

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="pusher-subscriber", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Cancel what is left (a reader blocked on a dead socket) so the loop closes clean.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("subscriber is closed")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _send(self, message: Mapping[str, Any], timeout: float | None) -> None:
        self._run(self._send_async(json.dumps(message)), self._timeout(timeout))

    # -- coroutines run in the loop thread ----------------------------------------------------

    async def _connect(self) -> None:
        ws = await connect(
            self.url,
            proxy=None,  # never route test traffic through an environment proxy
            open_timeout=self.timeout_seconds,
            close_timeout=2,
            max_size=2**22,
        )
        with self._cond:
            self._ws = ws
            self._closed_connection = False
            self._socket_id = None
        self._reader = asyncio.create_task(self._read(ws))

    async def _send_async(self, text: str) -> None:
        if self._ws is None:
            raise ConnectionError("not connected")
        await self._ws.send(text)

    async def _close_ws(self) -> None:
        ws, reader = self._ws, self._reader
        if ws is not None:
            await ws.close()
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(reader, timeout=3)
        self._ws, self._reader = None, None

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                with self._cond:
                    self._frames.append(text)
                    self._cond.notify_all()
                reply = self._handle(text)
                if reply is not None:
                    await ws.send(json.dumps(reply))
        except (WebSocketException, OSError):
            pass
        finally:
            with self._cond:
                self._closed_connection = True
                self._cond.notify_all()

    # -- protocol -----------------------------------------------------------------------------

    def _handle(self, text: str) -> dict[str, Any] | None:
        """Record one frame; return the reply to send, if any. Never raises."""
        now, mono = time.time(), time.monotonic()
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            with self._cond:
                self._errors.append({"event": "invalid-frame"})
                self._cond.notify_all()
            return None
        event: str = message["event"]
        channel = message.get("channel")
        with self._cond:
            if event == "pusher:ping":
                return {"event": "pusher:pong", "data": {}}
            if event == "pusher:connection_established":
                self._socket_id = _socket_id_of(message.get("data"))
            elif event == "pusher_internal:subscription_succeeded" and isinstance(channel, str):
                if channel in self._subscriptions:
                    self._subscriptions[channel] = "succeeded"
            elif event in ("pusher:error", "pusher:subscription_error"):
                self._errors.append(message)
            elif not event.startswith(("pusher:", "pusher_internal:")) and isinstance(channel, str):
                self._events.append(self._received(message, channel, now, mono))
            self._cond.notify_all()
        return None

    def _received(
        self, message: Mapping[str, Any], channel: str, now: float, mono: float
    ) -> ReceivedEvent:
        raw = message.get("data")
        raw_data = raw if isinstance(raw, str) else json.dumps(raw)
        secret = self._shared_secrets.get(channel)
        event = str(message["event"])
        if not channel.startswith(_ENCRYPTED_PREFIX):
            return ReceivedEvent(
                channel, event, raw_data, _parse(raw_data), False, now, mono, plaintext=raw_data
            )
        try:
            if secret is None:
                raise ValueError("no shared secret for this channel")
            plaintext = _decrypt(secret, raw_data)
        except (ValueError, KeyError, TypeError, binascii.Error, nacl.exceptions.CryptoError) as e:
            return ReceivedEvent(
                channel,
                event,
                raw_data,
                None,
                False,
                now,
                mono,
                plaintext=None,
                decrypt_error=f"{type(e).__name__}: {e}",
            )
        return ReceivedEvent(
            channel, event, raw_data, _parse(plaintext), True, now, mono, plaintext=plaintext
        )


def _socket_id_of(data: Any) -> str | None:
    with contextlib.suppress(ValueError, TypeError):
        parsed = json.loads(data) if isinstance(data, str) else data
        socket_id = parsed.get("socket_id")
        return socket_id if isinstance(socket_id, str) else None
    return None


def _decode_shared_secret(value: Any) -> bytes:
    if isinstance(value, bytes):  # the SDK's authenticate() returns bytes
        value = value.decode("ascii")
    if not isinstance(value, str):
        raise ValueError("an encrypted channel's auth response needs a shared_secret")
    secret = base64.b64decode(value, validate=True)
    if len(secret) != nacl.secret.SecretBox.KEY_SIZE:
        raise ValueError(f"shared_secret must decode to {nacl.secret.SecretBox.KEY_SIZE} bytes")
    return secret


def _decrypt(secret: bytes, raw_data: str) -> str:
    envelope = json.loads(raw_data)
    nonce = base64.b64decode(envelope["nonce"], validate=True)
    ciphertext = base64.b64decode(envelope["ciphertext"], validate=True)
    plaintext: bytes = nacl.secret.SecretBox(secret).decrypt(ciphertext, nonce)
    return plaintext.decode("utf-8")


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
