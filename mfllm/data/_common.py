"""Helpers shared by the loaders: reading files, checking fields and times, repost depth.

Every problem with user data becomes a `DataError(path, message, field)`; nothing here lets a raw
`KeyError` / `JSONDecodeError` / `UnicodeDecodeError` escape.

A fault inside one action's row (a repost/comment) loses that action, never the event: the loaders
collect such faults with `Drops` and keep the event (see `mfllm.data.schema.DroppedActions`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfllm.data.schema import DroppedActions, Event
from mfllm.errors import DataError

# Plausible range for any timestamp (unix seconds): 1990-01-01 .. 2100-01-01 (UTC).
MIN_TIME = 631152000.0
MAX_TIME = 4102444800.0
# An action may precede its source post by at most this much (clock skew between servers).
MAX_SKEW_SECONDS = 86400.0

# The kinds of fault that drop one action (counted per kind in `data stats` and a run's metadata).
FAULT_KINDS: dict[str, str] = {
    "time_before_source": "dated more than a day before the source post (a clock or time-zone error)",
    "time_out_of_range": "a timestamp outside 1990..2100",
    "bad_time": "a date or time that cannot be read",
    "missing_field": "a required field is missing",
    "bad_field": "a field of the wrong type or value (or a row that is not an object)",
    "unknown_key": "a key the JSONL format does not have",
    "duplicate_id": "an action id already used in the event (JSONL; the first row is kept)",
}


class Fault(DataError):
    """A DataError that also says which kind of fault it is (one of FAULT_KINDS)."""

    def __init__(self, path: str, message: str, field: str | None = None, *, kind: str = "bad_field"):
        super().__init__(path, message, field)
        self.kind = kind


def fault_kind(e: DataError) -> str:
    return getattr(e, "kind", "bad_field")


class Drops:
    """The faulty action rows of one event, collected while a loader reads it."""

    __slots__ = ("origin", "counts", "first")

    def __init__(self, origin: str):
        self.origin = origin
        self.counts: Counter = Counter()
        self.first: DataError | None = None

    def add(self, e: DataError) -> None:
        self.counts[fault_kind(e)] += 1
        if self.first is None:
            self.first = e

    def result(self, kept: int) -> DroppedActions | None:
        """What to attach to the event; raises when no action is left (the event cannot be used)."""
        if self.first is None:
            return None
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        if kept == 0:
            f = self.first
            n = sum(self.counts.values())
            raise Fault(f.path, f"{f.message}; no action left: all {n} dropped ({kinds})", f.field,
                        kind=fault_kind(f))
        return DroppedActions(self.origin, dict(sorted(self.counts.items())), str(self.first))


@dataclass(slots=True)
class Entry:
    """One event a loader can produce, known before the (expensive) parse of its files."""

    event_id: str | None  # None when the file is too broken to even tell the id
    origin: str  # the file (or file:line) it comes from, for messages
    load: Callable[[], Event]


def read_bytes(path: Path | str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except IsADirectoryError:
        raise DataError(str(path), "is a folder, expected a file") from None
    except OSError as e:
        raise DataError(str(path), f"cannot read the file: {e.strerror or e}") from None


def decode_utf8(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            path, f"not valid UTF-8 (bad byte at offset {e.start}); save the file as UTF-8"
        ) from None


def parse_json_text(text: str, path: str, *, check_text: bool = True) -> Any:
    """Parse JSON text. `check_text=False` leaves the lone-surrogate check to the caller (a loader checks
    each action on its own, so a bad action is dropped, not the file; see `may_hold_lone_surrogate`)."""
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark, as some editors write it
        text = text[1:]
    if not text.strip():
        raise DataError(path, "the file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; is the file truncated?" if e.pos >= len(text.rstrip()) - 1 else ""
        raise DataError(path, f"not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}{hint}") from None
    except RecursionError:
        raise DataError(path, "not valid JSON: nested too deeply") from None
    if check_text and may_hold_lone_surrogate(text):  # rare: only then walk the values
        check_text_values(obj, path, "")
    return obj


# A JSON escape of a UTF-16 surrogate. A lone one (no pair) decodes to a Python str that cannot be
# written as UTF-8: it would crash a run at its first write, far from the file that holds it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def may_hold_lone_surrogate(text: str) -> bool:
    return _SURROGATE_ESCAPE.search(text) is not None


def check_text_values(obj: Any, path: str, where: str) -> None:
    """Every string in `obj` (keys too) can be written as UTF-8; `where` prefixes the field named."""
    stack = [(obj, where)]
    while stack:
        v, w = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(
                    path, f"invalid text: a lone UTF-16 surrogate (\\u{ord(v[e.start]):04x}) is not a character",
                    w or None,
                ) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, w))
                stack.append((x, f"{w}.{k}" if w else str(k)))
        elif isinstance(v, list):
            stack.extend((x, f"{w}[{i}]") for i, x in enumerate(v))


def read_json(path: Path | str, *, check_text: bool = True) -> Any:
    p = str(path)
    return parse_json_text(decode_utf8(read_bytes(path), p), p, check_text=check_text)


def type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def get_str(d: dict, key: str, path: str, field: str, *, required: bool = True, null_as: str | None = None):
    if key not in d:
        if required:
            raise Fault(path, "missing", field, kind="missing_field")
        return None
    v = d[key]
    if v is None and null_as is not None:
        return null_as
    if v is None and not required:
        return None
    if not isinstance(v, str):
        raise DataError(path, f"expected a string, got {type_name(v)} {short(v)}", field)
    return v


def get_id(d: dict, key: str, path: str, field: str, *, required: bool = True) -> str | None:
    """An identifier: a string, or an integer (Rumdect writes uids as numbers); returned as str."""
    if key not in d or d[key] is None:
        if required:
            raise Fault(path, "missing", field, kind="missing_field")
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise DataError(path, f"expected a string or integer id, got {type_name(v)} {short(v)}", field)
    v = str(v)
    if required and not v:
        raise DataError(path, "empty id", field)
    return v


def get_int(d: dict, key: str, path: str, field: str) -> int | None:
    """An optional integer (None when missing / null). Floats with an integer value are accepted."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool):
        raise DataError(path, f"expected an integer, got {type_name(v)} {short(v)}", field)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    raise DataError(path, f"expected an integer, got {type_name(v)} {short(v)}", field)


def get_bool(d: dict, key: str, path: str, field: str) -> bool | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise DataError(path, f"expected true/false, got {type_name(v)} {short(v)}", field)


def check_time(t: Any, path: str, field: str, *, after: float | None = None) -> float:
    """A unix timestamp (seconds) that is a finite number in 1990..2100, and not (much) before `after`."""
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise Fault(path, f"expected unix seconds (a number), got {type_name(t)} {short(t)}", field, kind="bad_time")
    t = float(t)
    if not math.isfinite(t) or t < MIN_TIME or t > MAX_TIME:
        raise Fault(path, f"impossible timestamp {short(t)}: not between 1990 and 2100", field,
                    kind="time_out_of_range")
    if after is not None and t < after - MAX_SKEW_SECONDS:
        raise Fault(
            path,
            f"impossible timestamp {t:.0f}: {(after - t) / 3600:.1f} hours before the source post",
            field,
            kind="time_before_source",
        )
    return t


def compute_depths(parents: dict[str, str | None]) -> tuple[dict[str, int], set[str]]:
    """Repost depth of every post from its parent (None = reposts the source).

    Returns (depth by id, ids whose parent is not in the event or that sit on a parent cycle). Those get
    depth 2: they repost *some* repost we do not have, so at least depth 2.
    """
    depth: dict[str, int] = {}
    broken: set[str] = set()
    for mid in parents:
        if mid in depth:
            continue
        chain: list[str] = []
        seen: set[str] = set()
        cur = mid
        while True:
            if cur in depth:
                d = depth[cur]
                break
            p = parents[cur]
            if p is None:
                d = depth[cur] = 1
                break
            if p not in parents or p == cur or p in seen:
                broken.add(cur)
                d = depth[cur] = 2
                break
            chain.append(cur)
            seen.add(cur)
            cur = p
        for m in reversed(chain):
            d += 1
            depth[m] = d
    return depth, broken


# Fast (mid, uid) extraction for corpus-activity counts: every post record holds exactly one "mid" and
# one "uid" key (keys inside string values are escaped, so they never match), hence the tokens come in
# pairs, one pair per record, whatever the key order.
_MID_UID = re.compile(rb'"(mid|uid)"\s*:\s*"?([^",}\s\]]*)"?')


def count_uids(data: bytes) -> Counter | None:
    """Posts per uid in one file of post records, counting each distinct mid once.

    Returns None when the fast path cannot pair the tokens (the caller falls back to a full parse).
    """
    toks = _MID_UID.findall(data)
    if len(toks) % 2:
        return None
    if not toks:
        return Counter()
    k0 = toks[0][0]
    k1 = b"uid" if k0 == b"mid" else b"mid"
    if {k for k, _ in toks[0::2]} != {k0} or {k for k, _ in toks[1::2]} != {k1}:
        return None
    a = [v for _, v in toks[0::2]]
    b = [v for _, v in toks[1::2]]
    mids, uids = (a, b) if k0 == b"mid" else (b, a)
    by_mid = dict(zip(reversed(mids), reversed(uids), strict=True))  # one count per distinct mid
    return Counter({k.decode("utf-8", "replace"): v for k, v in Counter(by_mid.values()).items()})


def list_files(root: Path, suffix: str) -> list[Path]:
    """Files under `root` (recursively) with this suffix, skipping hidden ones, in a stable order."""
    out = []
    for p in root.rglob(f"*{suffix}"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or not p.is_file():
            continue
        out.append(p)
    return sorted(out)


def raiser(path: str, message: str, field: str | None = None) -> Callable[[], Event]:
    """A loader that reports a problem found while listing files (raised when the event is loaded)."""

    def load() -> Event:
        raise DataError(path, message, field)

    return load
