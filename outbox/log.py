"""Structured logs (JSON or key=value) that never carry payloads or exception messages.

Relay and producer log records carry their facts as ``extra=`` fields (event ids, type, attempt,
outcome, counts, timing). The formatters here render those fields and, for exceptions, the
exception classes and stack frames only: exception *messages* from drivers can quote row values
(PostgreSQL's "Failing row contains (...)"), so they are never written.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any, Literal

LogFormat = Literal["text", "json", "kv"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def sanitized_exception(exc_info: Any) -> str:
    """Stack frames and exception class names of an exception chain, without messages."""
    if not exc_info or exc_info[1] is None:
        return ""
    lines: list[str] = []
    exc: BaseException | None = exc_info[1]
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)
        lines.extend(f"  {f.filename}:{f.lineno} in {f.name}" for f in frames)
        lines.append(f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld)")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(lines)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = sanitized_exception(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``time=… level=… logger=… msg="…" key=value …`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"time={self.formatTime(record, '%Y-%m-%dT%H:%M:%S%z')}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage(), ensure_ascii=False)}",
        ]
        parts += [f"{k}={_kv(v)}" for k, v in _extras(record).items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + sanitized_exception(record.exc_info)
        return text


class TextFormatter(logging.Formatter):
    """Human-readable lines with the extra fields appended; exceptions sanitized."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={_kv(v)}" for k, v in _extras(record).items())
        text = (
            f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        )
        if extras:
            text += f" [{extras}]"
        if record.exc_info:
            text += "\n" + sanitized_exception(record.exc_info)
        return text


def _kv(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": TextFormatter,
    "json": JsonFormatter,
    "kv": KeyValueFormatter,
}


def configure(log_format: LogFormat = "text", level: int | str = logging.INFO) -> None:
    """Install one stderr handler with the chosen formatter on the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[log_format]())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
