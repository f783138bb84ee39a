"""The outcome table: every answer and exception maps to retry or dead letter, payload-free.

And the HTTP backend, against local servers: proxy and CA settings read as ``requests`` reads
them (once, when the publisher is built), no redirects, no retries of its own."""

import base64
import http.server
import json
import os
import sys
import threading

import pusher
import pytest
import requests
import urllib3

from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.publisher import OutgoingEvent, PusherPublisher, classify, translate_exception
from outbox.settings import Settings


@pytest.fixture(autouse=True)
def no_proxy_or_ca_bundle_from_the_machine(monkeypatch):
    """The proxy and CA settings of whoever runs the tests must not leak into them."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in (
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "REQUEST_METHOD",
        ):
            monkeypatch.delenv(name)


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
        # a forwarding proxy refusing a plain-HTTP request: keep the event, retry
        (407, "Proxy Authentication Required", {}, TransientPublishError, None),
        (418, "", {}, PermanentPublishError, None),
    ],
)
def test_every_answer_maps_to_one_outcome(status, body, headers, expected, retry_after):
    error = classify(status, body, headers)
    if expected is None:
        assert error is None
        return
    assert type(error) is expected
    if status == 407:
        assert "HTTPS_PROXY" in error.reason
    assert error.retry_after_seconds == retry_after
    assert body[:20] not in error.reason or not body  # reasons are fixed texts


UNKNOWN = "delivery unknown"  # the request may have reached Pusher
UNREACHED = "could not reach Pusher"  # nothing was sent


@pytest.mark.parametrize(
    ("exc", "expected", "fragment", "status"),
    [
        (
            urllib3.exceptions.NewConnectionError(None, "refused CANARY"),
            TransientPublishError,
            UNREACHED,
            None,
        ),
        (
            urllib3.exceptions.NameResolutionError("h", None, "CANARY"),
            TransientPublishError,
            UNREACHED,
            None,
        ),
        (
            urllib3.exceptions.ConnectTimeoutError("x?auth_signature=s"),
            TransientPublishError,
            "could not connect to Pusher in time",
            None,
        ),
        (
            urllib3.exceptions.ReadTimeoutError(None, "x?auth_signature=s", "CANARY"),
            TransientPublishError,
            f"did not answer in time; {UNKNOWN}",
            None,
        ),
        (
            urllib3.exceptions.ProtocolError("reset CANARY"),
            TransientPublishError,
            f"connection to Pusher broke; {UNKNOWN}",
            None,
        ),
        (urllib3.exceptions.SSLError("CANARY"), TransientPublishError, "TLS error", None),
        (
            urllib3.exceptions.ProxyError("CANARY", None),
            TransientPublishError,
            f"{UNREACHED} through the proxy",
            None,
        ),
        (
            urllib3.exceptions.DecodeError("CANARY"),
            TransientPublishError,
            "HTTP client error (DecodeError)",
            None,
        ),
        (
            requests.ConnectTimeout("https://x?auth_signature=s"),
            TransientPublishError,
            "could not connect to Pusher in time",
            None,
        ),
        (
            requests.ReadTimeout("x"),
            TransientPublishError,
            f"did not answer in time; {UNKNOWN}",
            None,
        ),
        (requests.ConnectionError("x"), TransientPublishError, UNREACHED, None),
        (
            requests.TooManyRedirects("x"),
            TransientPublishError,
            "HTTP client error (TooManyRedirects)",
            None,
        ),
        (pusher.errors.PusherBadRequest("bad"), PermanentPublishError, "HTTP 400", 400),
        (pusher.errors.PusherBadAuth("bad"), PermanentPublishError, "authentication failed", 401),
        (pusher.errors.PusherForbidden("bad"), PermanentPublishError, "forbidden", 403),
        (pusher.errors.PusherBadStatus("503: busy"), TransientPublishError, "server error", 503),
        (pusher.errors.PusherBadStatus("413: too big"), PermanentPublishError, "too large", 413),
        (
            ValueError("Too much data CANARY"),
            PermanentPublishError,
            "rejected by the Pusher SDK before sending (ValueError)",
            None,
        ),
        (
            RuntimeError("CANARY"),
            TransientPublishError,
            "unexpected error while publishing (RuntimeError)",
            None,
        ),
    ],
)
def test_every_library_exception_is_translated_without_its_text(exc, expected, fragment, status):
    error = translate_exception(exc)
    assert type(error) is expected
    assert error.transient is (expected is TransientPublishError)
    assert fragment in error.reason
    assert error.status == status
    assert "CANARY" not in error.reason
    assert "auth_signature" not in error.reason
    # "unknown" only where the request may have been sent; the relay's reports rely on it
    assert (UNKNOWN in error.reason) is (UNKNOWN in fragment)


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


# --- the HTTP backend against local servers --------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request (method, target, headers) and answers with ``server.answer``.

    HTTP/1.0, so every connection closes after one answer. Serves as a Pusher stand-in, a
    redirecting server and a forward proxy (absolute-form POST, CONNECT) alike.
    """

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, self.headers))
        status, headers = self.server.answer
        body = b"{}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_CONNECT = do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """``serve(status, headers)`` starts a recording server on 127.0.0.1; all stop afterwards."""
    servers = []

    def start(status=200, headers=None):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        server.seen = []
        server.answer = (status, headers or {})
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _publisher(port=None, *, host="pusher.invalid", ssl=False, **options):
    return PusherPublisher(
        app_id="1", key="k", secret="s", host=host, port=port, ssl=ssl, **options
    )


def _backend(publisher):
    return publisher.client._pusher_client.http


def _basic(credentials):
    return "Basic " + base64.b64encode(credentials.encode("latin-1")).decode()


EVENT = OutgoingEvent("c", "e", "{}")


def test_proxy_credentials_reach_the_proxy_percent_decoded(monkeypatch, serve):
    proxy = serve()
    monkeypatch.setenv("HTTP_PROXY", f"http://us%40er:p%3Aw%20rd@127.0.0.1:{proxy.server_port}")
    publisher = _publisher()
    publisher.publish_batch([EVENT])
    [(method, target, headers)] = proxy.seen
    assert method == "POST" and target.startswith("http://pusher.invalid:80/apps/1/batch_events")
    assert headers["Proxy-Authorization"] == _basic("us@er:p:w rd")
    assert _backend(publisher).proxy == f"http://127.0.0.1:{proxy.server_port}"  # no credentials


def test_an_https_tunnel_through_the_proxy_carries_the_credentials(monkeypatch, serve):
    proxy = serve(407, {"Proxy-Authenticate": 'Basic realm="p"'})
    monkeypatch.setenv("HTTPS_PROXY", f"http://alice:hunter2@127.0.0.1:{proxy.server_port}")
    with pytest.raises(TransientPublishError, match="through the proxy") as info:
        _publisher(ssl=True).publish_batch([EVENT])
    [(method, target, headers)] = proxy.seen
    assert (method, target) == ("CONNECT", "pusher.invalid:443")
    assert headers["Proxy-Authorization"] == _basic("alice:hunter2")
    assert "hunter2" not in info.value.reason


def test_a_proxy_without_a_scheme_is_an_http_proxy(monkeypatch, serve):
    """``requests`` misreads ``localhost:3128`` as scheme ``localhost``; we take it as http://."""
    proxy = serve()
    monkeypatch.setenv("HTTP_PROXY", f"alice:hunter2@localhost:{proxy.server_port}")
    publisher = _publisher()
    assert _backend(publisher).proxy == f"http://localhost:{proxy.server_port}"
    publisher.publish_batch([EVENT])
    [(_, _, headers)] = proxy.seen
    assert headers["Proxy-Authorization"] == _basic("alice:hunter2")


@pytest.mark.parametrize("variable", ["ALL_PROXY", "all_proxy"])
def test_all_proxy_is_used_when_no_scheme_proxy_is_set(monkeypatch, serve, variable):
    proxy = serve()
    monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.server_port}")
    _publisher().publish_batch([EVENT])
    assert [method for method, _, _ in proxy.seen] == ["POST"]


@pytest.mark.parametrize(
    ("ssl", "expected"),
    [(True, "http://https.example:2"), (False, "http://http.example:3")],
)
def test_the_proxy_for_the_scheme_wins_over_all_proxy(monkeypatch, ssl, expected):
    monkeypatch.setenv("ALL_PROXY", "http://all.example:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://https.example:2")
    monkeypatch.setenv("HTTP_PROXY", "http://http.example:3")
    assert _backend(_publisher(ssl=ssl)).proxy == expected
    monkeypatch.delenv("HTTPS_PROXY" if ssl else "HTTP_PROXY")
    assert _backend(_publisher(ssl=ssl)).proxy == "http://all.example:1"


@pytest.mark.parametrize("proxy_variable", ["HTTP_PROXY", "ALL_PROXY"])
@pytest.mark.parametrize(
    ("no_proxy", "through_proxy"),
    [
        ("127.0.0.1", False),
        ("pusher.invalid, 10.0.0.0/8,127.0.0.0/8", False),
        ("other.example", True),
        ("", True),
    ],
)
def test_no_proxy_sends_directly_to_the_hosts_it_names(
    monkeypatch, serve, proxy_variable, no_proxy, through_proxy
):
    proxy, pusher_server = serve(), serve()
    monkeypatch.setenv(proxy_variable, f"http://127.0.0.1:{proxy.server_port}")
    monkeypatch.setenv("no_proxy", no_proxy)
    _publisher(pusher_server.server_port, host="127.0.0.1").publish_batch([EVENT])
    assert (len(proxy.seen), len(pusher_server.seen)) == ((1, 0) if through_proxy else (0, 1))


def test_the_environment_is_read_when_the_publisher_is_built_not_per_request(monkeypatch, serve):
    proxy, pusher_server = serve(), serve()
    publisher = _publisher(pusher_server.server_port, host="127.0.0.1")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
    publisher.publish_batch([EVENT])
    assert (len(proxy.seen), len(pusher_server.seen)) == (0, 1)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTPS_PROXY", "socks5://alice:hunter2@proxy:1080"),
        ("ALL_PROXY", "socks5h://alice:hunter2@proxy:1080"),
        ("https_proxy", "ftp://alice:hunter2@proxy:21"),
        ("HTTPS_PROXY", "http://alice:hunter2@proxy:port"),
        ("HTTPS_PROXY", "http://alice:hunter2@:3128"),
        ("HTTPS_PROXY", "http://alice:hunter2%E2%82%AC@proxy:3128"),  # not Latin-1
    ],
)
def test_an_unusable_proxy_is_a_configuration_error_naming_the_variable(
    monkeypatch, variable, value
):
    monkeypatch.setitem(sys.modules, "socks", None)  # as if PySocks were not installed
    monkeypatch.setitem(sys.modules, "urllib3.contrib.socks", None)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        _publisher(ssl=True)
    text = str(info.value)
    assert text.startswith(f"{variable}: ")
    assert "hunter2" not in text and "alice" not in text
    assert "http://[user:password@]host:port" in text or "Latin-1" in text


def test_a_socks_proxy_gets_its_credentials_when_socks_support_is_installed(monkeypatch):
    made = {}

    class FakeSocksManager(urllib3.PoolManager):
        def __init__(self, proxy_url, username=None, password=None, **kw):
            made.update(url=proxy_url, username=username, password=password, **kw)
            super().__init__(**kw)

    monkeypatch.setattr("outbox.publisher._socks_proxy_manager", lambda: FakeSocksManager)
    monkeypatch.setenv("HTTPS_PROXY", "SOCKS5h://al%20ice:p%40ss@proxy:1080")
    publisher = _publisher(ssl=True, publish_concurrency=8)
    assert isinstance(_backend(publisher).pool, FakeSocksManager)
    assert made["url"] == "socks5h://proxy:1080"
    assert (made["username"], made["password"], made["maxsize"]) == ("al ice", "p@ss", 8)


def test_a_ca_bundle_directory_is_a_ca_cert_dir_and_a_file_is_ca_certs(monkeypatch, tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(bundle))  # REQUESTS_CA_BUNDLE wins, as in requests
    kw = _backend(_publisher(ssl=True)).pool.connection_pool_kw
    assert kw["ca_cert_dir"] == str(tmp_path) and "ca_certs" not in kw
    assert kw["cert_reqs"] == "CERT_REQUIRED"

    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    kw = _backend(_publisher(ssl=True)).pool.connection_pool_kw
    assert kw["ca_certs"] == str(bundle) and "ca_cert_dir" not in kw

    monkeypatch.delenv("CURL_CA_BUNDLE")
    backend = _backend(_publisher(ssl=True))
    assert backend.ca_certs == requests.utils.DEFAULT_CA_BUNDLE_PATH  # certifi, as requests
    assert backend.pool.connection_pool_kw["ca_certs"] == backend.ca_certs


def test_a_ca_bundle_path_that_names_nothing_is_a_configuration_error(monkeypatch, tmp_path):
    missing = str(tmp_path / "nowhere.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", missing)
    with pytest.raises(ConfigurationError, match="^CURL_CA_BUNDLE names no file") as info:
        _publisher(ssl=True)
    assert missing not in str(info.value)


def test_the_pool_keeps_one_connection_per_publishing_lane():
    assert _backend(_publisher()).pool.connection_pool_kw["maxsize"] == 4
    assert _backend(_publisher(publish_concurrency=64)).pool.connection_pool_kw["maxsize"] == 64
    settings = Settings(
        _env_file=None,
        pusher_app_id="1",
        pusher_key="k",
        pusher_secret="s",
        pusher_host="pusher.invalid",
        publish_concurrency=48,
    )
    publisher = PusherPublisher.from_settings(settings)
    assert _backend(publisher).pool.connection_pool_kw["maxsize"] == 48
    with pytest.raises(ValueError, match="publish_concurrency"):
        _publisher(publish_concurrency=0)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_backend_never_follows_redirects(serve, status):
    pusher_server = serve()
    pusher_server.answer = (status, {"Location": f"http://127.0.0.1:{pusher_server.server_port}/x"})
    with pytest.raises(TransientPublishError) as info:
        _publisher(pusher_server.server_port, host="127.0.0.1").publish_batch([EVENT])
    assert info.value.status == status
    assert [target.split("?")[0] for _, target, _ in pusher_server.seen] == ["/apps/1/batch_events"]


def test_the_backend_never_retries_by_itself(serve):
    """The relay decides about retries: an error answer or a refused connection comes back once."""
    pusher_server = serve(503, {"Retry-After": "0"})
    with pytest.raises(TransientPublishError, match="server error"):
        _publisher(pusher_server.server_port, host="127.0.0.1").publish_batch([EVENT])
    assert len(pusher_server.seen) == 1
    with pytest.raises(TransientPublishError, match="could not reach Pusher"):
        _publisher(9, host="127.0.0.1").publish_batch([EVENT])


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
