"""The outcome table: every answer and exception maps to retry or dead letter, payload-free."""

import json

import pusher
import pytest
import requests

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


class RecordingSession:
    def __init__(self, responses):
        self.responses = list(responses)
        self.bodies = []

    def request(self, method, url, headers=None, data=None, timeout=None, **kw):
        self.bodies.append(json.loads(data))
        status, text = self.responses.pop(0)
        response = requests.Response()
        response.status_code = status
        response._content = text.encode()
        return response


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
    session = RecordingSession([(500, ""), (200, "{}")])
    publisher.client._pusher_client.http._local.session = session
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
    """Sessions stop consulting the environment per request, but keep honouring it."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    publisher = PusherPublisher(app_id="1", key="k", secret="s", host="api.example", ssl=True)
    session = publisher.client._pusher_client.http.session
    assert session.trust_env is False
    assert session.proxies["https"] == "http://proxy.example:3128"
    assert session.verify == str(bundle)

    monkeypatch.setenv("NO_PROXY", "api.example")
    other = PusherPublisher(app_id="1", key="k", secret="s", host="api.example", ssl=True)
    assert "https" not in other.client._pusher_client.http.session.proxies
