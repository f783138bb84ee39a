"""Summarize py-spy raw (collapsed) profiles: ``python -m bench.flame FILE... [--top N]``.

Record with ``--idle`` (``python -m bench --profile DIR`` does) so that waiting on the database or
on Pusher shows. Per thread group (a pool process's main thread, the publish threads), prints the
share of the samples spent inside each landmark of the relay (claim, publish, mark sent, Celery,
logging, ...) and the leaf frames with the most samples. Samples of a thread waiting for work (a
process between tasks, a publish thread without a lane) are left out of the shares.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

# (label, regular expression searched in the frames of a stack). A stack counts once per label.
LANDMARKS: tuple[tuple[str, str], ...] = (
    ("relay task (workers.tasks.relay)", r"^relay \(workers/tasks\.py"),
    ("Relay.drain", r"^Relay\.drain \("),
    ("Store.reclaim_expired_leases", r"^Store\.reclaim_expired_leases \("),
    ("Store.claim", r"^Store\.claim \("),
    ("  Store._drop_overtaking", r"^Store\._drop_overtaking \("),
    ("Store.mark_sent", r"^Store\.mark_sent \("),
    ("Relay._publish_lane (inline)", r"^Relay\._publish_lane \("),
    ("waiting for the publish threads", r"^Executor\.map|^_result_or_cancel|^Future\.result"),
    ("PusherPublisher.publish_batch", r"^PusherPublisher\.publish_batch \("),
    ("  encryption (pusher.crypto.encrypt)", r"^encrypt \(pusher/crypto\.py"),
    ("  HTTP (requests Session.request)", r"^Session\.request \(requests/sessions\.py"),
    ("    new TCP connection", r"^create_connection \(urllib3"),
    ("    proxy/netrc/CA lookups (trust_env)", r"merge_environment_settings|get_netrc_auth"),
    ("  request signing (pusher Request)", r"^Request\.__init__ \(pusher/http\.py"),
    ("metrics observer", r"\(outbox/metrics\.py"),
    ("PostgreSQL round trips (psycopg wait)", r"^Connection\.wait \(psycopg/connection\.py"),
    ("SQLAlchemy statement compile/cache", r"\(sqlalchemy/sql/(compiler|cache_key)\.py"),
    ("Celery message handling (kombu)", r"\(kombu/"),
    ("logging", r"\(logging/__init__\.py|\(outbox/log\.py"),
)


def _thread_group(first_frame: str) -> str:
    name = first_frame.split(": ", 1)[1] if ": " in first_frame else first_frame
    return re.sub(r"_\d+$", "", name.strip())


def _short(frame: str) -> str:
    frame = frame.replace("/work/main/", "")
    return re.sub(r"\S*/(site-packages|lib/python3\.\d+)/", "", frame)


def load(paths: Iterable[Path]) -> list[tuple[str, list[str], int]]:
    """(thread group, frames outermost first, samples) from py-spy ``--format raw`` files."""
    stacks = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            stacks.append((_thread_group(frames[0]), [_short(f) for f in frames[1:]], int(count)))
    return stacks


def _is_idle(group: str, frames: list[str]) -> bool:
    """Waiting for work: a pool thread blocked on its queue, a process between tasks."""
    text = ";".join(frames)
    if "_worker (concurrent/futures/thread.py" in text:
        leaf = frames[-1] if frames else ""
        return "get (queue.py" in text or leaf.startswith("_worker (concurrent/futures")
    if group == "MainThread":
        return "trace_task (celery/app/trace.py" not in text
    return False


def summarize(stacks: list[tuple[str, list[str], int]], top: int = 12) -> str:
    """Per thread group: shares of the busy samples (not waiting for work) by landmark."""
    lines: list[str] = []
    groups = sorted({g for g, _, _ in stacks}, key=lambda g: (g != "MainThread", g))
    for group in groups:
        mine = [(frames, n) for g, frames, n in stacks if g == group]
        total = sum(n for _, n in mine)
        busy = [(frames, n) for frames, n in mine if not _is_idle(group, frames)]
        busy_total = sum(n for _, n in busy)
        if not busy_total:
            continue
        lines.append(
            f"[{group}] {total} samples, {busy_total} busy ({busy_total / total:.0%}); "
            "shares of busy samples:"
        )
        for label, pattern in LANDMARKS:
            regex = re.compile(pattern)
            n = sum(count for frames, count in busy if any(regex.search(f) for f in frames))
            if n:
                lines.append(f"  {n / busy_total:6.1%}  {label}")
        own: collections.Counter[str] = collections.Counter()
        for frames, count in busy:
            if frames:
                own[frames[-1]] += count
        lines.append(f"  top {top} leaf frames:")
        for frame, count in own.most_common(top):
            lines.append(f"    {count / busy_total:6.1%}  {frame[:110]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flame", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    print(summarize(load(args.files), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
