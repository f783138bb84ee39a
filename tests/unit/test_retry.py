import random

import pytest

from outbox.errors import ConfigurationError, PermanentPublishError, TransientPublishError
from outbox.retry import RetryPolicy


def test_backoff_is_full_jitter_under_an_exponential_cap():
    policy = RetryPolicy(base_delay_seconds=1, max_delay_seconds=30, max_attempts=20)
    rng = random.Random(7)
    err = TransientPublishError("x")
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (12, 30)]:
        delays = [
            policy.next_delay(attempts=attempts, age_seconds=0, error=err, rng=rng)
            for _ in range(300)
        ]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range


def test_retry_after_is_honoured_as_a_floor():
    policy = RetryPolicy()
    err = TransientPublishError("429", status=429, retry_after_seconds=42)
    assert policy.next_delay(attempts=1, age_seconds=0, error=err) == 42


def test_permanent_errors_attempt_limit_and_age_limit_give_up():
    policy = RetryPolicy(max_attempts=3, max_age_seconds=100)
    assert policy.next_delay(attempts=1, age_seconds=0, error=PermanentPublishError("x")) is None
    assert policy.next_delay(attempts=3, age_seconds=0, error=TransientPublishError("x")) is None
    assert policy.next_delay(attempts=1, age_seconds=101, error=TransientPublishError("x")) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay_seconds": 0},
        {"base_delay_seconds": 10, "max_delay_seconds": 5},
        {"max_age_seconds": -1},
    ],
)
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)
