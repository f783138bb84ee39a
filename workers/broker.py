"""The embedded broker: kombu's filesystem transport with atomic message files.

kombu 5.7's filesystem transport creates a message file and then writes into it, while readers
list and read files without waiting for the writer's lock: a worker polling at that moment reads
an empty file, fails to decode it and exits. Here a message is written to a hidden temporary
file and renamed into place (``os.replace`` is atomic on POSIX), so readers only ever see whole
messages. Used for ``OUTBOX_BROKER_URL=filesystem://`` (development and small single-host setups).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        temporary = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(temporary, final)
        except OSError as exc:
            raise ChannelError(f"cannot add a message file to {self.data_folder_out!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
