"""A run's actions as a table: one row per agent action, written as JSONL, CSV or Parquet.

Each row carries ``run``, ``method`` and ``replica`` (so the exports of several runs stack into one table),
the action's time as epoch seconds and as ISO 8601 (UTC), and, given a labeler, the 9 labels of its real
and simulated texts (``real_<dimension>``, ``sim_<dimension>``). The labeler is passed in (the labels sit
above the store): anything with ``label(texts) -> [labels | None]``, e.g. ``mfllm.labels.make_labeler()``.

A damaged steps.jsonl is never exported silently: :func:`export_actions` raises (naming the line and the
repair) unless ``partial=True``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, get_args

from mfllm.errors import ConfigError, DataError
from mfllm.files import atomic_open
from mfllm.store.replicas import REPLICA_SEP, base_event_id
from mfllm.store.run import CONFIG, find_damage, iter_records
from mfllm.store.rundir import method_of

Format = Literal["jsonl", "csv", "parquet"]
FORMATS: tuple[str, ...] = get_args(Format)
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet"}

# (column, parquet type name); label columns follow these.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "string"), ("method", "string"), ("replica", "int64"), ("event_id", "string"), ("step", "int64"),
    ("phase", "string"), ("agent_id", "string"), ("action_id", "string"), ("time", "float64"),
    ("time_iso", "string"), ("state", "string"), ("real_text", "string"), ("sim_text", "string"),
    ("parent", "string"), ("followers", "int64"), ("injected", "bool_"),
)
KEYWORDS = "keywords"  # the list-valued ninth dimension (= mfllm.labels.dimensions.KEYWORDS)
_BATCH = 2048  # actions labelled (and written to parquet) at a time


def format_for(to: str | Path, fmt: str | None = None) -> str:
    """The format named by ``fmt``, else by the file's suffix (``-``, stdout: JSONL unless told)."""
    if fmt:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="format")
        return fmt
    if str(to) == "-":
        return "jsonl"
    suffix = Path(to).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"cannot tell the format from {str(to)!r}: use a .jsonl, .csv or .parquet name, "
                          f"or --format {'|'.join(FORMATS)}", field="to")
    return SUFFIXES[suffix]


def check_target(to: str | Path) -> None:
    """One clear error for a target that cannot be written (before anything is read or labelled)."""
    if str(to) == "-":
        return
    p = Path(to)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder; give a file name, e.g. {p / 'actions.csv'}", field="to")
    if not p.parent.is_dir():
        raise ConfigError(f"folder {p.parent} does not exist (create it first)", field="to")


def label_columns(dimensions: Sequence[str]) -> list[str]:
    return [f"{side}_{d}" for side in ("real", "sim") for d in dimensions]


def action_rows(run_dir: str | Path, labeler: Any = None, dimensions: Sequence[str] = (),
                partial: bool = False) -> Iterator[dict]:
    """Every action of a run as a row (see the module doc). ``dimensions``: the labeler's dimension names,
    in column order (``mfllm.labels.dimensions.ALL_DIMENSIONS``)."""
    rd = Path(run_dir)
    if not (rd / CONFIG).is_file():
        raise ConfigError(f"{rd} is not a run directory (no {CONFIG})")
    damage = find_damage(rd)
    if damage is not None and not partial:
        raise DataError(str(damage.path), f"{damage.describe()}; nothing exported. Repair: {damage.repair_hint()} "
                        "(or export the intact part with --partial)")
    try:
        cfg = json.loads((rd / CONFIG).read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(str(rd / CONFIG), f"cannot read: {e}") from None
    head = {"run": str(run_dir), "method": method_of(cfg if isinstance(cfg, dict) else {}, rd)}
    batch: list[dict] = []
    for rec in iter_records(rd):
        event, replica = _replica_of(rec.event_id)
        for a in rec.actions:
            batch.append({**head, "replica": replica, "event_id": event, "step": rec.step, "phase": rec.phase,
                          "agent_id": a.agent_id, "action_id": a.action_id, "time": a.time,
                          "time_iso": _iso(a.time), "state": a.state, "real_text": a.real_text,
                          "sim_text": a.sim_text, "parent": a.parent, "followers": a.followers,
                          "injected": a.injected})
        if len(batch) >= _BATCH:
            yield from _labelled(batch, labeler, dimensions)
            batch = []
    yield from _labelled(batch, labeler, dimensions)


def export_actions(run_dir: str | Path, to: str | Path, fmt: str | None = None, *, labeler: Any = None,
                   dimensions: Sequence[str] = (), partial: bool = False) -> int:
    """Write every action of a run to ``to`` (``-``: stdout) atomically; returns the number of actions."""
    check_target(to)
    fmt = format_for(to, fmt)
    rows = action_rows(run_dir, labeler, dimensions, partial)
    columns = [c for c, _ in COLUMNS] + (label_columns(dimensions) if labeler is not None else [])
    first = next(rows, None)  # reads (and checks) the run before the target is touched
    rows = _chain(first, rows)
    try:
        with _target(to, binary=fmt == "parquet") as out:
            return _WRITERS[fmt](out, rows, columns, dimensions if labeler is not None else ())
    except BrokenPipeError:  # `mfllm export RUN --to - | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    except OSError as e:
        raise ConfigError(f"cannot write {to}: {e.strerror or e}", field="to") from None


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so that the interpreter's final flush stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# --------------------------------------------------------------------------- rows


def _replica_of(event_id: str) -> tuple[str, int]:
    base = base_event_id(event_id)
    return (base, int(event_id.rpartition(REPLICA_SEP)[2])) if base != event_id else (event_id, 0)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=UTC).isoformat()


def _labelled(rows: list[dict], labeler: Any, dimensions: Sequence[str]) -> list[dict]:
    if labeler is None or not rows:
        return rows
    texts = list(dict.fromkeys(t for r in rows for t in (r["real_text"], r["sim_text"]) if t is not None))
    got = dict(zip(texts, labeler.label(texts), strict=True))
    for r in rows:
        for side in ("real", "sim"):
            lab = got.get(r[f"{side}_text"]) if r[f"{side}_text"] is not None else None
            for d in dimensions:
                if lab is None:
                    r[f"{side}_{d}"] = None
                else:
                    r[f"{side}_{d}"] = list(lab.keywords) if d == KEYWORDS else lab.labels.get(d)
    return rows


def _chain(first: dict | None, rest: Iterator[dict]) -> Iterator[dict]:
    if first is not None:
        yield first
        yield from rest


# --------------------------------------------------------------------------- writers


@contextmanager
def _target(to: str | Path, binary: bool) -> Iterator[IO]:
    if str(to) == "-":
        if binary:
            raise ConfigError("parquet is not written to stdout; give a file name", field="to")
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_open(to, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
        yield f


def _write_jsonl(out: IO, rows: Iterator[dict], columns: list[str], dimensions: Sequence[str]) -> int:
    n = 0
    for r in rows:
        out.write(json.dumps(r, ensure_ascii=False) + "\n")
        n += 1
    return n


def _write_csv(out: IO, rows: Iterator[dict], columns: list[str], dimensions: Sequence[str]) -> int:
    w = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    n = 0
    for r in rows:
        w.writerow({k: "|".join(v) if isinstance(v, list) else v for k, v in r.items()})  # keywords: a|b|c
        n += 1
    return n


def _write_parquet(out: IO, rows: Iterator[dict], columns: list[str], dimensions: Sequence[str]) -> int:
    import pyarrow as pa  # heavy: only for a parquet export
    import pyarrow.parquet as pq

    fields = [pa.field(c, getattr(pa, t)()) for c, t in COLUMNS]
    fields += [pa.field(c, pa.list_(pa.string()) if c.endswith("_" + KEYWORDS) else pa.string())
               for c in label_columns(dimensions)]
    schema = pa.schema(fields)
    n = 0
    with pq.ParquetWriter(out, schema) as w:
        batch: list[dict] = []
        for r in rows:
            batch.append(r)
            if len(batch) >= _BATCH:
                w.write_table(pa.Table.from_pylist(batch, schema=schema))
                n, batch = n + len(batch), []
        if batch or not n:
            w.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    return n


_WRITERS = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}
