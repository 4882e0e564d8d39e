"""One entry point for every supported data format: `load_events` / `iter_events`.

The format is detected from the path:
- a CED root folder (it holds `original-microblog/`)          -> mfllm.data.ced
- a `.jsonl` file, or a folder of `.jsonl` files               -> mfllm.data.jsonl (the generic format)
- a Rumdect `.json` file (a JSON list of posts), or a folder of them (searched recursively)
                                                               -> mfllm.data.rumdect

Events come out sorted by event id (a stable order, so `limit` always picks the same events), filtered
by `split` (see mfllm.data.split) and `event_ids`. A bad file (or JSONL line) is reported as a
`DataError` naming the file and field and skipped, unless `strict=True`, where it is raised.

A fault in one action's row loses that action, never the event: the loaders drop the row and record it
on `Event.dropped` (counts per fault kind); `LoadResult.dropped` lists those events' records (one per
file, to warn once per file) and `LoadResult.dropped_actions` sums them per kind. `strict` is about
whole files; it does not turn a dropped action into an error.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mfllm.data._common import Entry, list_files
from mfllm.data.ced import LABEL_DIRS, SOURCE_DIR, ced_entries, is_ced_root
from mfllm.data.jsonl import jsonl_entries
from mfllm.data.rumdect import rumdect_entries
from mfllm.data.schema import DroppedActions, Event
from mfllm.data.split import SPLIT_CHOICES, in_split
from mfllm.errors import ConfigError, DataError

FORMATS = ("ced", "rumdect", "jsonl")
_UNKNOWN = (
    "unknown data format: expected a CED root folder (holding original-microblog/), a Rumdect .json file "
    "or folder, or a .jsonl file or folder (see docs/data.md)"
)


# progress(done, total): entries (files, or JSONL lines) read so far out of those selected.
ProgressFn = Callable[[int, int], None]


@dataclass
class LoadResult:
    events: list[Event]
    skipped: list[DataError] = field(default_factory=list)  # bad files / lines, in the order met

    @property
    def n_actions(self) -> int:
        return sum(len(e.actions) for e in self.events)

    @property
    def dropped(self) -> list[DroppedActions]:
        """One record per loaded event that lost faulty action rows (the event was kept)."""
        return [e.dropped for e in self.events if e.dropped is not None]

    @property
    def dropped_actions(self) -> dict[str, int]:
        """Fault kind -> actions dropped over all loaded events ({} when none), for a run's metadata."""
        return count_dropped(self.dropped)


def count_dropped(records: Iterable[DroppedActions | None]) -> dict[str, int]:
    """Fault kind -> actions dropped over these records (e.g. `[e.dropped for e in events]`), by kind."""
    total: Counter = Counter()
    for d in records:
        if d is not None:
            total.update(d.counts)
    return dict(sorted(total.items()))


def _peek(path: Path, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as e:
        raise DataError(str(path), f"cannot read the file: {e.strerror or e}") from None


def detect_format(path: Path | str) -> str:
    """'ced', 'rumdect' or 'jsonl' for `path`; DataError naming the path when it is none of them."""
    p = Path(path)
    if not p.exists():
        raise DataError(str(p), "no such file or folder")
    if p.is_dir():
        if is_ced_root(p):
            return "ced"
        if p.name in (SOURCE_DIR, *LABEL_DIRS):
            raise DataError(
                str(p), f"this is a CED sub-folder; pass the CED root (the folder holding {SOURCE_DIR}/)"
            )
        has_jsonl = bool(list_files(p, ".jsonl"))
        has_json = bool(list_files(p, ".json"))
        if has_jsonl and has_json:
            raise DataError(str(p), "holds both .jsonl and .json files; pass a file, or a folder of one kind")
        if has_jsonl:
            return "jsonl"
        if has_json:
            return "rumdect"
        raise DataError(str(p), _UNKNOWN)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    head = _peek(p)
    if head.startswith(b"["):
        return "rumdect"
    if head.startswith(b"{") and suffix != ".json":
        return "jsonl"
    if head.startswith(b"{"):
        raise DataError(
            str(p),
            "a single JSON object is no known format; for one event per line name the "
            "file .jsonl, for CED pass the root folder (see docs/data.md)",
        )
    raise DataError(str(p), _UNKNOWN)


def _entries(p: Path, fmt: str) -> list[Entry]:
    if fmt == "ced":
        if not is_ced_root(p):
            raise DataError(str(p), f"not a CED root folder (it has no {SOURCE_DIR}/ folder)")
        out = ced_entries(p)
        if not out:
            raise DataError(str(p / SOURCE_DIR), "no events: the folder holds no .json files")
        return out
    if fmt == "rumdect":
        return rumdect_entries(p)
    if fmt == "jsonl":
        return jsonl_entries(p)
    raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _load_nogc(e: Entry) -> Event:
    """Parse one event with the cyclic GC paused: building ~1e5 acyclic objects otherwise triggers
    collections that rescan everything the caller holds (a third of the time on a full CED load)."""
    was = gc.isenabled()
    gc.disable()
    try:
        return e.load()
    finally:
        if was:
            gc.enable()


def _check_args(split: str, limit: int | None) -> None:
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_CHOICES)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be a non-negative integer, got {limit!r}")


def iter_events(
    path: Path | str,
    *,
    split: str = "all",
    limit: int | None = None,
    event_ids: Iterable[str] | None = None,
    strict: bool = False,
    skipped: list[DataError] | None = None,
    format: str | None = None,
    progress: ProgressFn | None = None,
) -> Iterator[Event]:
    """Stream events from `path`, one file parsed at a time, sorted by event id.

    split: "train" | "val" | "test" | "all" (by mfllm.data.split.split_of). event_ids: keep only these.
    limit: at most this many events, applied after the filters. A bad file is appended to `skipped`
    (a DataError naming file and field) and left out; with strict=True it is raised instead.
    Requested event ids that were not found are reported the same way. A single Rumdect file
    (one event) raises its DataError; a JSONL file skips bad lines like a folder skips bad files.
    Faulty action rows are dropped, not the event: see `Event.dropped`.
    progress(done, total) is called with (0, total) first, then after each file (or JSONL line) read;
    `total` counts the entries the split / event_ids select (with `limit`, at most `limit`), and the
    last call has done == total.
    """
    _check_args(split, limit)
    p = Path(path)
    fmt = format or detect_format(p)
    if fmt == "rumdect" and p.is_file():
        strict = True  # a single event file: nothing else to load, so its problem is the answer
    entries = _entries(p, fmt)
    wanted = None if event_ids is None else {str(x) for x in event_ids}
    bad = skipped if skipped is not None else []

    def report(err: DataError) -> None:
        if strict:
            raise err
        bad.append(err)

    def keep(eid: str) -> bool:
        return in_split(eid, split) and (wanted is None or eid in wanted)

    order = {id(e): i for i, e in enumerate(entries)}
    known = sorted(
        (e for e in entries if e.event_id is not None and keep(e.event_id)),
        key=lambda e: (e.event_id, order[id(e)]),
    )
    unknown = [e for e in entries if e.event_id is None]
    todo = [*known, *unknown]
    total = len(todo) if limit is None else min(limit, len(todo))
    tick = progress or (lambda done, total: None)
    tick(0, total)
    first: dict[str, str] = {}  # event id -> origin that provides it

    def claim(eid: str, origin: str) -> bool:
        if eid in first:
            msg = f"duplicate event id {eid!r}: already read from {first[eid]}; this copy is skipped"
            report(DataError(origin, msg, "event_id"))
            return False
        first[eid] = origin
        return True

    def read(e: Entry) -> Event | None:
        if e.event_id is not None and not claim(e.event_id, e.origin):
            return None
        try:
            ev = _load_nogc(e)
        except DataError as err:
            report(err)
            return None
        if e.event_id is None and not (keep(ev.event_id) and claim(ev.event_id, e.origin)):  # id known only now
            return None
        return ev

    if limit == 0:
        return
    n = 0
    for done, e in enumerate(todo, 1):
        ev = read(e)
        tick(min(done, total), total)  # with a limit, files that fail can push `done` past it
        if ev is None:
            continue
        yield ev
        n += 1
        if limit is not None and n >= limit:
            return
    if wanted is not None:
        for missing in sorted(wanted - set(first)):
            where = "" if split == "all" else f" in split {split!r}"
            report(DataError(str(p), f"event id {missing!r} not found{where}", "event_id"))


def load_events(
    path: Path | str,
    *,
    split: str = "all",
    limit: int | None = None,
    event_ids: Iterable[str] | None = None,
    strict: bool = False,
    format: str | None = None,
    progress: ProgressFn | None = None,
) -> LoadResult:
    """Load events from a CED folder, a Rumdect file/folder or a JSONL file/folder (see iter_events)."""
    skipped: list[DataError] = []
    was = gc.isenabled()
    gc.disable()  # the events are acyclic; see _load_nogc
    try:
        events = list(
            iter_events(
                path,
                split=split,
                limit=limit,
                event_ids=event_ids,
                strict=strict,
                skipped=skipped,
                format=format,
                progress=progress,
            )
        )
    finally:
        if was:
            gc.enable()
    return LoadResult(events=events, skipped=skipped)
