"""Declared notification types: event name, channel template and classified payload fields."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from outbox import policy
from outbox.errors import NotificationTypeError, PrivacyViolation
from outbox.policy import FieldKind

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class NotificationType:
    """A kind of notification, declared once and validated at declaration.

    ``channel`` is a template such as ``"private-encrypted-order-{order_id}"`` whose placeholders
    are filled at enqueue with opaque ids only. ``fields`` classifies every payload field;
    :class:`~outbox.policy.Phi` fields are refused unless the channel is ``private-encrypted-``.
    ``channel_ids`` may give a prefix per placeholder (``{"order_id": "ord"}``).
    ``ttl_seconds`` is how long the notification stays worth delivering (``None``: forever).
    ``ordering_key`` is a template over the same placeholders (default: the channel).
    """

    name: str
    event: str
    channel: str
    fields: Mapping[str, FieldKind]
    channel_ids: Mapping[str, str | None] = field(default_factory=dict)
    ttl_seconds: float | None = 300.0
    ordering_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TYPE_NAME.match(self.name):
            raise NotificationTypeError(
                "notification type name must be 1-100 lowercase letters, digits, '.', '_' or "
                "'-' starting with a letter, e.g. 'order.created'"
            )
        try:
            policy.check_event_name(self.event)
        except PrivacyViolation as exc:
            raise NotificationTypeError(f"type '{self.name}': {exc}") from None
        try:
            names = policy.placeholders(self.channel)
        except ValueError as exc:
            raise NotificationTypeError(f"type '{self.name}': {exc}") from None
        unknown_ids = sorted(set(self.channel_ids) - set(names))
        if unknown_ids:
            raise NotificationTypeError(
                f"type '{self.name}': channel_ids names {unknown_ids} that are not placeholders "
                "of the channel template"
            )
        # The template with each placeholder replaced by a sample id must be a valid name.
        try:
            policy.check_channel_name(self._fill({name: self._sample_id(name) for name in names}))
        except PrivacyViolation as exc:
            raise NotificationTypeError(
                f"type '{self.name}': channel template {exc}".replace("channel name ", "", 1)
            ) from None
        if not isinstance(self.fields, Mapping):
            raise NotificationTypeError(
                f"type '{self.name}': fields must map field names to classifications"
            )
        for field_name, kind in self.fields.items():
            if not isinstance(kind, FieldKind):
                raise NotificationTypeError(
                    f"type '{self.name}': field '{field_name}' must be classified with OpaqueId, "
                    "Enum, Count, Boolean, Timestamp or Phi"
                )
            if kind.phi and not self.encrypted:
                raise NotificationTypeError(
                    f"type '{self.name}': field '{field_name}' is PHI but the channel is not "
                    f"'{policy.ENCRYPTED_PREFIX}…'; PHI may travel only end-to-end encrypted. "
                    "Use an encrypted channel, or send an opaque id and let the client fetch the "
                    "details from your API"
                )
        if self.ttl_seconds is not None and not self.ttl_seconds > 0:
            raise NotificationTypeError(f"type '{self.name}': ttl_seconds must be positive")
        if self.ordering_key is not None:
            extra = sorted(set(policy.placeholders(self.ordering_key)) - set(names))
            if extra:
                raise NotificationTypeError(
                    f"type '{self.name}': ordering_key uses {extra}, which are not placeholders "
                    "of the channel template"
                )

    @property
    def encrypted(self) -> bool:
        """Whether events of this type travel on an end-to-end encrypted channel."""
        return self.channel.startswith(policy.ENCRYPTED_PREFIX)

    @property
    def contains_phi(self) -> bool:
        return any(kind.phi for kind in self.fields.values())

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(policy.placeholders(self.channel))

    def _sample_id(self, name: str) -> str:
        return policy.new_opaque_id(self.channel_ids.get(name) or "id")

    def _fill(self, ids: Mapping[str, str]) -> str:
        return self.channel.format_map(ids)

    def channel_for(self, ids: Mapping[str, object]) -> str:
        """Build the channel name from opaque ids; raise :class:`PrivacyViolation` otherwise."""
        names = self.placeholders
        missing = [name for name in names if name not in ids]
        extra = sorted(str(name) for name in ids if name not in names)
        if missing or extra:
            raise PrivacyViolation(
                f"channel of '{self.name}' needs exactly the ids {list(names)}; "
                f"missing {missing}, unexpected {extra}",
                field="channel",
                rule="channel_ids",
            )
        checked = {
            name: policy.check_opaque_id(
                ids[name], field=f"channel.{name}", prefix=self.channel_ids.get(name)
            )
            for name in names
        }
        return policy.check_channel_name(self._fill(checked))

    def ordering_key_for(self, channel: str, ids: Mapping[str, Any]) -> str:
        if self.ordering_key is None:
            return channel
        return self.ordering_key.format_map(ids)

    def matches(self, channel: str) -> dict[str, str] | None:
        """The ids if ``channel`` is an instance of this type's template, else ``None``."""
        pattern = _template_pattern(self.channel)
        match = pattern.fullmatch(channel)
        if match is None:
            return None
        return dict(match.groupdict())


def _template_pattern(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>[a-z][a-z0-9]{{1,11}}_[A-Za-z0-9]{{16,64}})")
    return re.compile("".join(parts))
