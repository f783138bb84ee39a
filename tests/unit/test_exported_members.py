import outbox


def test_public_api_is_pinned_and_sorted():
    assert outbox.__all__ == sorted(outbox.__all__)
    assert set(outbox.__all__) == {
        "AuthResponse",
        "AuthorizationError",
        "Boolean",
        "CatchUp",
        "ChannelAuthorizer",
        "ConfigurationError",
        "Count",
        "Enqueued",
        "Enum",
        "NotificationType",
        "NotificationTypeError",
        "OpaqueId",
        "Outbox",
        "OutboxError",
        "PayloadTooLarge",
        "PermanentPublishError",
        "Phi",
        "PrivacyViolation",
        "PublishError",
        "PusherPublisher",
        "RetryPolicy",
        "SessionError",
        "Settings",
        "Timestamp",
        "TransientPublishError",
        "__version__",
        "create_engine",
        "load_settings",
        "new_opaque_id",
    }
    for name in outbox.__all__:
        assert hasattr(outbox, name)


def test_every_error_derives_from_the_root():
    for name in outbox.__all__:
        member = getattr(outbox, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, outbox.OutboxError)


def test_the_library_never_imports_celery():
    import subprocess
    import sys

    code = (
        "import sys, outbox, outbox.relay, outbox.cli, outbox.auth; print('celery' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
