"""The run directory: written step by step, readable after a crash, resumable.

- config.json and done.json are written atomically (temp file + fsync + rename).
- steps.jsonl is append-only, one step record per line (mfllm.store.records.StepRecord); every line carries the sha256 of its own content, so a torn or
  corrupted line (a crash mid-write) is detected and never read as data. On resume the file is cut
  back to its last good line and the missing steps are simply recomputed (seeds are per agent and
  per step, so they come out the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mfllm.errors import ConfigError
from mfllm.files import atomic_write_json
from mfllm.store.records import ActionRecord, StepRecord  # noqa: F401 - re-exported

STEPS = "steps.jsonl"
CONFIG = "config.json"
DONE = "done.json"


def _digest(record: dict) -> str:
    body = json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def encode_record(record: StepRecord | dict) -> str:
    """One steps.jsonl line: the record's JSON with the sha256 of its own content."""
    if isinstance(record, StepRecord):
        record = record.to_json()
    rec = {k: v for k, v in record.items() if k != "sha"}
    rec["sha"] = _digest(rec)
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def decode_line(line: str) -> dict | None:
    """The record, or None if the line is torn or corrupted."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or "sha" not in rec:
        return None
    sha = rec.pop("sha")
    return rec if sha == _digest(rec) else None


def read_steps(run_dir: str | Path) -> list[dict]:
    """All good step records as plain dicts, in file order (stops at the first bad line: nothing after
    it is trusted). Lenient: a hand-made record missing fields still reads (see :func:`iter_records`)."""
    return list(iter_steps(run_dir))


def iter_records(run_dir: str | Path) -> Iterator[StepRecord]:
    """The good step records, typed, in file order."""
    for rec in iter_steps(run_dir):
        yield StepRecord.from_json(rec)


def iter_steps(run_dir: str | Path) -> Iterator[dict]:
    path = Path(run_dir) / STEPS
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            rec = decode_line(line)
            if rec is None:
                return
            yield rec


@dataclass(frozen=True, slots=True)
class StepsDamage:
    """Where steps.jsonl stops being readable: its first bad line (torn or failing its sha check) and what
    comes after it. Readers stop at that line, so everything from it on is ignored."""

    path: Path
    line: int  # 1-based number of the first bad line
    after: int  # non-empty lines after it (all ignored)
    intact_after: int  # of those, lines that pass their own check: steps lost from the middle of the file

    def describe(self) -> str:
        intact = f" ({self.intact_after} of them intact)" if self.intact_after else ""
        return (f"line {self.line} is damaged (torn or failing its sha check); it and the {self.after} "
                f"step line(s) after it{intact} are ignored")

    def repair_hint(self) -> str:
        return f"`mfllm simulate --resume {self.path.parent}` redoes them"

    def message(self) -> str:
        return f"{self.describe()}. Repair: {self.repair_hint()}"


def find_damage(run_dir: str | Path) -> StepsDamage | None:
    """The first bad line of a run's steps.jsonl (None: every line is whole and checks out)."""
    path = Path(run_dir) / STEPS
    if not path.exists():
        return None
    first, after, intact = 0, 0, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            ok = raw.endswith(b"\n") and decode_line(raw.decode("utf-8", errors="replace")) is not None
            if not first:
                if not ok:
                    first = n
            elif raw.strip():
                after += 1
                intact += ok
    return StepsDamage(path, first, after, intact) if first else None


class RunStore:
    """Appends step records; `fsync_every` seconds bounds what a power loss can cost (a plain crash
    loses nothing that was flushed)."""

    def __init__(self, run_dir: str | Path, fsync_every: float = 1.0):
        self.dir = Path(run_dir)
        self.fsync_every = fsync_every
        self._f = None
        self._last_sync = 0.0

    # -- lifecycle
    def create(self, config: dict) -> None:
        if (self.dir / CONFIG).exists():
            raise ConfigError(f"{self.dir} already holds a run; use --resume {self.dir} to continue it, "
                              "or choose another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / CONFIG, config)

    def config(self) -> dict:
        p = self.dir / CONFIG
        if not p.exists():
            raise ConfigError(f"{self.dir} is not a run directory (no {CONFIG})")
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"unreadable run config: {e}", path=str(p)) from None

    def recover(self) -> list[StepRecord]:
        """Good records; the file is truncated after the last good line so appends continue cleanly."""
        return list(self.recover_iter())

    def recover_iter(self) -> Iterator[StepRecord]:
        """:meth:`recover` one record at a time (a resume folds them without holding them all); the
        truncation happens when the iteration is finished."""
        path = self.dir / STEPS
        if not path.exists():
            return
        offset = 0
        with open(path, "rb") as f:
            for raw in f:
                rec = decode_line(raw.decode("utf-8", errors="replace")) if raw.endswith(b"\n") else None
                if rec is None:
                    break
                offset += len(raw)
                yield StepRecord.from_json(rec)
        if offset != path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())

    def append(self, record: StepRecord | dict) -> None:
        if self._f is None:
            self._f = open(self.dir / STEPS, "a", encoding="utf-8")
        self._f.write(encode_record(record))
        self._f.flush()
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_every:
            os.fsync(self._f.fileno())
            self._last_sync = now

    def finish(self, summary: dict) -> None:
        self.close()
        atomic_write_json(self.dir / DONE, summary)

    def is_done(self) -> bool:
        return (self.dir / DONE).exists()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def remove_run(run_dir: str | Path) -> None:
    """Delete a run directory, refusing anything that does not look like one."""
    d = Path(run_dir)
    if not d.exists():
        return
    if not (d / CONFIG).exists():
        raise ConfigError(f"{d} exists and is not a run directory; refusing to delete it")
    shutil.rmtree(d)

