"""Replica runs: R seeded crowds of the same events, each a normal run directory.

Replica K of event E is simulated as the event ``E#rK`` (replica 0 keeps the id ``E``), so its agents'
seeds, which derive from (seed, event id, action id), differ from every other replica's while the real
actions are the same. A replica set is a folder holding ``r0/``, ``r1/``, ... (one run directory each).
"""

from __future__ import annotations

import re
from pathlib import Path

REPLICA_SEP = "#r"
_REPLICA_DIR = re.compile(r"^r(\d+)$")


def replica_event_id(event_id: str, k: int) -> str:
    """The id replica ``k`` of an event is simulated under (replica 0: the event's own id)."""
    return event_id if k == 0 else f"{event_id}{REPLICA_SEP}{k}"


def base_event_id(event_id: str) -> str:
    """The event a replica id belongs to (``E#r3`` -> ``E``; a plain id is returned as is)."""
    head, sep, tail = event_id.rpartition(REPLICA_SEP)
    return head if sep and tail.isdigit() else event_id


def replica_dirs(folder: str | Path) -> list[Path]:
    """The replica run directories ``r0``, ``r1``, ... of a folder, in replica order ([] if none)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _REPLICA_DIR.match(p.name))]
    return [p for _, p in sorted(found)]
