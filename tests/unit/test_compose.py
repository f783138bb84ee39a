"""docker-compose.yml cannot run here (no Docker engine); keep it honest by reading it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import AliasChoices

from outbox.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OUTBOX_SERVICES = ("migrate", "worker", "beat", "app")


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def known_variables() -> set[str]:
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
    return names


def test_compose_has_the_production_services():
    services = compose()["services"]
    assert {"postgres", "redis", "soketi", "worker", "beat", "app", "migrate"} <= set(services)


def test_every_outbox_variable_in_compose_is_a_real_setting():
    known = known_variables()
    for name in OUTBOX_SERVICES:
        env = compose()["services"][name]["environment"]
        unknown = sorted(set(env) - known)
        assert unknown == [], f"{name}: unknown variables {unknown}"


def test_required_settings_are_given_and_secrets_are_not_hard_coded():
    for name in OUTBOX_SERVICES:
        env = compose()["services"][name]["environment"]
        for required in (
            "OUTBOX_DATABASE_URL",
            "OUTBOX_BROKER_URL",
            "PUSHER_APP_ID",
            "PUSHER_KEY",
            "PUSHER_SECRET",
            "PUSHER_ENCRYPTION_MASTER_KEY_BASE64",
        ):
            assert required in env, f"{name} lacks {required}"
        for secret in ("PUSHER_SECRET", "PUSHER_ENCRYPTION_MASTER_KEY_BASE64"):
            assert re.fullmatch(r"\$\{[A-Z_0-9]+:\?[^}]+\}", env[secret]), secret
    assert env["OUTBOX_BROKER_URL"].startswith("redis://")
    assert env["OUTBOX_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_worker_and_beat_run_the_celery_app_and_depend_on_migrations():
    services = compose()["services"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "workers", "beat"]
    for name in ("worker", "beat", "app"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["migrate"]["command"] == ["outbox", "migrate"]


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in known_variables() if name not in readme)
    assert missing == []


def test_the_app_service_runs_the_example_factory():
    command = compose()["services"]["app"]["command"]
    assert "--factory" in command
    module, _, attribute = command[command.index("--factory") + 1].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attribute))
