"""The outcome table: every answer and exception maps to retry or dead letter, payload-free."""

import json

import pusher
import pytest
import requests
import urllib3

from outbox.errors import PermanentPublishError, TransientPublishError
from outbox.publisher import OutgoingEvent, PusherPublisher, classify, translate_exception


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected", "retry_after"),
    [
        (200, '{"ok":true}', {}, None, None),
        (200, "{}", {}, None, None),
        (202, "", {}, None, None),
        # soketi: errors answered with HTTP 200 and a body
        (
            200,
            '{"error":"The secret authentication failed","code":401}',
            {},
            PermanentPublishError,
            None,
        ),
        (200, '{"error":"too large","code":413}', {}, PermanentPublishError, None),
        (200, '{"error":"rate","code":429}', {}, TransientPublishError, None),
        (200, '{"error":"no code"}', {}, PermanentPublishError, None),
        (429, "slow down", {"Retry-After": "7"}, TransientPublishError, 7.0),
        (500, "", {}, TransientPublishError, None),
        (502, "", {}, TransientPublishError, None),
        (503, "", {"Retry-After": "3"}, TransientPublishError, 3.0),
        (400, "bad", {}, PermanentPublishError, None),
        (401, "Invalid signature", {}, PermanentPublishError, None),
        (
            401,
            "Timestamp expired: Given timestamp (1) not within 600s",
            {},
            TransientPublishError,
            30.0,
        ),
        (403, "Over quota", {}, TransientPublishError, 300.0),
        (403, "App disabled", {}, PermanentPublishError, None),
        (404, "", {}, PermanentPublishError, None),
        (413, "", {}, PermanentPublishError, None),
        (418, "", {}, PermanentPublishError, None),
    ],
)
def test_every_answer_maps_to_one_outcome(status, body, headers, expected, retry_after):
    error = classify(status, body, headers)
    if expected is None:
        assert error is None
        return
    assert type(error) is expected
    assert error.retry_after_seconds == retry_after
    assert body[:20] not in error.reason or not body  # reasons are fixed texts


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (urllib3.exceptions.NewConnectionError(None, "refused CANARY"), TransientPublishError),
        (urllib3.exceptions.NameResolutionError("h", None, "CANARY"), TransientPublishError),
        (urllib3.exceptions.ConnectTimeoutError("x?auth_signature=s"), TransientPublishError),
        (
            urllib3.exceptions.ReadTimeoutError(None, "x?auth_signature=s", "CANARY"),
            TransientPublishError,
        ),
        (urllib3.exceptions.ProtocolError("reset CANARY"), TransientPublishError),
        (urllib3.exceptions.SSLError("CANARY"), TransientPublishError),
        (urllib3.exceptions.ProxyError("CANARY", None), TransientPublishError),
        (urllib3.exceptions.DecodeError("CANARY"), TransientPublishError),
        (requests.ConnectTimeout("https://x?auth_signature=s"), TransientPublishError),
        (requests.ReadTimeout("x"), TransientPublishError),
        (requests.ConnectionError("x"), TransientPublishError),
        (requests.TooManyRedirects("x"), TransientPublishError),
        (pusher.errors.PusherBadRequest("bad"), PermanentPublishError),
        (pusher.errors.PusherBadAuth("bad"), PermanentPublishError),
        (pusher.errors.PusherForbidden("bad"), PermanentPublishError),
        (pusher.errors.PusherBadStatus("503: busy"), TransientPublishError),
        (pusher.errors.PusherBadStatus("413: too big"), PermanentPublishError),
        (ValueError("Too much data CANARY"), PermanentPublishError),
        (RuntimeError("CANARY"), TransientPublishError),
    ],
)
def test_every_library_exception_is_translated_without_its_text(exc, expected):
    error = translate_exception(exc)
    assert type(error) is expected
    assert "CANARY" not in error.reason
    assert "auth_signature" not in error.reason


def test_retry_after_as_http_date_is_understood():
    error = classify(429, "", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert isinstance(error, TransientPublishError)
    assert error.retry_after_seconds == 0.0


class RecordingPool:
    """Stands in for the backend's urllib3 pool: records bodies, answers from a script."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.bodies = []

    def request(self, method, url, body=None, headers=None, **kw):
        self.bodies.append(json.loads(body))
        status, text = self.responses.pop(0)
        return urllib3.HTTPResponse(body=text.encode(), status=status, preload_content=True)


def test_a_retried_batch_is_encrypted_once_per_attempt_from_the_plaintext():
    """The SDK rewrites dicts in place; we must never pass it state we reuse."""
    import base64

    import nacl.secret

    key = b"m" * 32
    publisher = PusherPublisher(
        app_id="1",
        key="k",
        secret="s",
        host="127.0.0.1",
        port=1,
        ssl=False,
        encryption_master_key=key,
    )
    session = RecordingPool([(500, ""), (200, "{}")])
    publisher.client._pusher_client.http.pool = session
    event = OutgoingEvent("private-encrypted-x", "e", '{"id":"evt_1","data":{"a":"PHI"}}')
    with pytest.raises(TransientPublishError):
        publisher.publish_batch([event])
    publisher.publish_batch([event])
    from pusher.crypto import generate_shared_secret

    box = nacl.secret.SecretBox(generate_shared_secret(b"private-encrypted-x", key))
    for body in session.bodies:
        wire = json.loads(body["batch"][0]["data"])
        plain = box.decrypt(base64.b64decode(wire["ciphertext"]), base64.b64decode(wire["nonce"]))
        assert plain.decode() == event.data
        assert "PHI" not in body["batch"][0]["data"]


def test_proxy_and_ca_bundle_settings_are_read_from_the_environment_once(monkeypatch, tmp_path):
    """The backend reads the environment as requests does, once, when the publisher is built."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    publisher = PusherPublisher(app_id="1", key="k", secret="s", host="api.example", ssl=True)
    backend = publisher.client._pusher_client.http
    assert backend.proxy == "http://proxy.example:3128"
    assert isinstance(backend.pool, urllib3.ProxyManager)
    assert backend.ca_certs == str(bundle)
    assert backend.pool.connection_pool_kw["ca_certs"] == str(bundle)
    assert backend.pool.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED"

    monkeypatch.setenv("NO_PROXY", "api.example")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    other = PusherPublisher(app_id="1", key="k", secret="s", host="api.example", ssl=True)
    backend = other.client._pusher_client.http
    assert backend.proxy is None and not isinstance(backend.pool, urllib3.ProxyManager)
    assert backend.ca_certs == requests.utils.DEFAULT_CA_BUNDLE_PATH  # certifi, as requests


def test_the_backend_never_retries_or_follows_redirects_itself(monkeypatch):
    """The relay decides about retries: a refused connection comes back at once, classified."""
    publisher = PusherPublisher(
        app_id="1", key="k", secret="s", host="127.0.0.1", port=9, ssl=False
    )
    backend = publisher.client._pusher_client.http
    assert backend.pool.connection_pool_kw["retries"].total is False
    with pytest.raises(TransientPublishError, match="could not reach Pusher"):
        publisher.publish_batch([OutgoingEvent("c", "e", "{}")])


@pytest.mark.parametrize("n", [0, 1, 100, 7400])
def test_the_publisher_encrypts_byte_for_byte_as_the_sdk_does(monkeypatch, n):
    """Same key derivation, secretbox and wire format as ``pusher.crypto.encrypt``, and the size
    the enqueue-time check promised."""
    from pusher import crypto

    from outbox import policy
    from outbox.publisher import _Sealer

    nonce = bytes(range(24))
    monkeypatch.setattr("nacl.utils.random", lambda size: nonce[:size])
    key = b"k" * 32
    plaintext = json.dumps({"id": "evt_1", "data": {"note": "é" + "a" * n}})
    channel = "private-encrypted-pharmacy-pha_1"
    ours = _Sealer(key).seal(channel, plaintext)
    theirs = json.dumps(crypto.encrypt(channel, plaintext, key, nonce=nonce), ensure_ascii=False)
    assert ours == theirs
    assert len(ours.encode()) == policy.wire_data_bytes(plaintext, encrypted=True)


def test_each_event_gets_a_fresh_nonce_and_each_channel_its_own_key():
    import base64

    import nacl.secret
    from pusher.crypto import generate_shared_secret

    from outbox.publisher import _Sealer

    key = b"m" * 32
    sealer = _Sealer(key)
    a1, a2 = (json.loads(sealer.seal("private-encrypted-a", "same")) for _ in range(2))
    b1 = json.loads(sealer.seal("private-encrypted-b", "same"))
    assert a1["nonce"] != a2["nonce"] and a1["ciphertext"] != a2["ciphertext"]
    for channel, sealed in (("private-encrypted-a", a1), ("private-encrypted-b", b1)):
        box = nacl.secret.SecretBox(generate_shared_secret(channel.encode(), key))
        plain = box.decrypt(
            base64.b64decode(sealed["ciphertext"]), base64.b64decode(sealed["nonce"])
        )
        assert plain == b"same"
    with pytest.raises(nacl.exceptions.CryptoError):
        nacl.secret.SecretBox(generate_shared_secret(b"private-encrypted-a", key)).decrypt(
            base64.b64decode(b1["ciphertext"]), base64.b64decode(b1["nonce"])
        )
