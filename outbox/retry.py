"""The retry policy: a small pure value deciding the next delay or giving up."""

from __future__ import annotations

import random
from dataclasses import dataclass

from outbox.errors import ConfigurationError, PublishError


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter, a cap, a maximum number of attempts and a maximum age.

    ``attempts`` counts publish attempts made so far (1 after the first failure). The delay before
    the next attempt is uniform in ``[0, min(max_delay, base * 2**(attempts-1))]``, never below a
    server's ``Retry-After``. Permanent errors are never retried.
    """

    max_attempts: int = 10
    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 300.0
    max_age_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("retry max_attempts must be at least 1")
        if not self.base_delay_seconds > 0:
            raise ConfigurationError("retry base_delay_seconds must be positive")
        if self.max_delay_seconds < self.base_delay_seconds:
            raise ConfigurationError("retry max_delay_seconds must be >= base_delay_seconds")
        if not self.max_age_seconds > 0:
            raise ConfigurationError("retry max_age_seconds must be positive")

    def next_delay(
        self,
        *,
        attempts: int,
        age_seconds: float,
        error: PublishError,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to dead-letter now."""
        if not error.transient or attempts >= self.max_attempts:
            return None
        ceiling = min(self.max_delay_seconds, self.base_delay_seconds * 2 ** max(attempts - 1, 0))
        delay = (rng or random).uniform(0.0, ceiling)
        if error.retry_after_seconds is not None:
            delay = max(delay, error.retry_after_seconds)
        if age_seconds + delay > self.max_age_seconds:
            return None
        return delay
