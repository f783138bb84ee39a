import base64
import os

import pytest

from outbox.errors import ConfigurationError
from outbox.settings import load_settings

SECRET = "s3cr3t-value-never-printed"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("PUSHER_", "OUTBOX_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_need_no_server():
    settings = load_settings()
    assert settings.database_url.startswith("sqlite")
    assert settings.broker_url == "filesystem://"
    assert settings.encryption_master_key is None


@pytest.mark.parametrize(
    "value",
    [base64.b64encode(b"x" * 16).decode(), base64.b64encode(b"x" * 33).decode(), "not base64!!"],
)
def test_a_master_key_that_is_not_32_bytes_of_base64_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("PUSHER_ENCRYPTION_MASTER_KEY_BASE64", value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "PUSHER_ENCRYPTION_MASTER_KEY_BASE64" in str(info.value)
    assert value not in str(info.value)


def test_missing_pusher_credentials_are_named_and_secrets_never_printed(monkeypatch):
    monkeypatch.setenv("PUSHER_SECRET", SECRET)
    settings = load_settings()
    with pytest.raises(ConfigurationError) as info:
        settings.require_pusher()
    assert "PUSHER_APP_ID" in str(info.value) and "PUSHER_KEY" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(settings)


def test_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("PUSHER_APP_ID", "abc")
    monkeypatch.setenv("OUTBOX_LEASE_SECONDS", "-1")
    monkeypatch.setenv("OUTBOX_DATABASE_URL", "mysql://x")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    text = str(info.value)
    assert "PUSHER_APP_ID" in text and "OUTBOX_LEASE_SECONDS" in text
    assert "OUTBOX_DATABASE_URL" in text


def test_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("OUTBOX_CLAIM_BATCH_SIZE=7\n")
    assert load_settings().claim_batch_size == 7
