"""A persistent label cache: SQLite, keyed by (labeler name, labeler version, text).

``CachedLabeler(inner, path)`` wraps any labeler: texts already labelled by the same labeler name and
version come from the file, the rest go to ``inner`` (each distinct text once) and are written back.
Only successful labels are cached: a text ``inner`` left unlabelled (None) is asked again next time.

Each chunk of new labels is written in one SQLite transaction (WAL journal), so a crash or kill never
leaves a torn entry: after a restart the file holds whole chunks only, and labelling resumes where it
stopped. Several processes may share one file (SQLite locks; writers wait up to ``timeout`` seconds).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

from mfllm.errors import ConfigError
from mfllm.labels.base import ActionLabels, Labeler
from mfllm.labels.dimensions import DIMENSIONS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    labeler TEXT NOT NULL,
    version TEXT NOT NULL,
    text    TEXT NOT NULL,
    labels  TEXT NOT NULL,
    PRIMARY KEY (labeler, version, text)
) WITHOUT ROWID
"""
_LOOKUP_CHUNK = 500  # texts per SELECT ... IN (...) (SQLite caps bound variables)


def _decode(raw: str) -> ActionLabels | None:
    """A stored entry, or None if it is not a complete label set (then it is treated as a miss)."""
    try:
        d = json.loads(raw)
        al = ActionLabels.from_dict(d)
    except (ValueError, KeyError, TypeError):
        return None
    if set(al.labels) != set(DIMENSIONS) or any(al.labels[k] not in v for k, v in DIMENSIONS.items()):
        return None
    return al


class LabelCache:
    """The SQLite file itself: ``get_many`` / ``put_many`` for one (labeler, version)."""

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), timeout=timeout, check_same_thread=False, isolation_level=None
            )  # autocommit; transactions are explicit
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open label cache: {e}", path=str(self.path)) from e
        self._lock = threading.Lock()

    def get_many(self, labeler: str, version: str, texts: list[str]) -> dict[str, ActionLabels]:
        out: dict[str, ActionLabels] = {}
        uniq = list(dict.fromkeys(texts))
        with self._lock:
            for i in range(0, len(uniq), _LOOKUP_CHUNK):
                chunk = uniq[i : i + _LOOKUP_CHUNK]
                q = (
                    "SELECT text, labels FROM labels WHERE labeler = ? AND version = ? AND text IN ("
                    + ",".join("?" * len(chunk))
                    + ")"
                )
                for text, raw in self._conn.execute(q, (labeler, version, *chunk)):
                    al = _decode(raw)
                    if al is not None:
                        out[text] = al
        return out

    def put_many(self, labeler: str, version: str, items: dict[str, ActionLabels | None]) -> int:
        """Store the successful labels (None values are skipped) in ONE transaction. Returns how many."""
        rows = [
            (labeler, version, t, json.dumps(al.to_dict(), ensure_ascii=False))
            for t, al in items.items()
            if al is not None
        ]
        if not rows:
            return 0
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                cur.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?)", rows)
                cur.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    cur.execute("ROLLBACK")
                raise
        return len(rows)

    def count(self, labeler: str | None = None, version: str | None = None) -> int:
        q, args = "SELECT COUNT(*) FROM labels", []
        if labeler is not None:
            q += " WHERE labeler = ?" + (" AND version = ?" if version is not None else "")
            args = [labeler] + ([version] if version is not None else [])
        with self._lock:
            return int(self._conn.execute(q, args).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class CachedLabeler:
    """Wrap ``inner`` with a SQLite label cache at ``path``. Same name and version as ``inner``.

    ``chunk_size`` distinct new texts are labelled and committed at a time, so a long labelling job
    that crashes keeps everything committed before the crash.
    """

    def __init__(self, inner: Labeler, path: str | os.PathLike, chunk_size: int = 500):
        if chunk_size < 1:
            raise ConfigError("chunk_size must be >= 1", field="chunk_size")
        self.inner = inner
        self.name = str(inner.name)
        self.version = str(inner.version)
        self.chunk_size = chunk_size
        self.cache = LabelCache(path)
        self.hits = 0
        self.misses = 0

    def label(self, texts: list[str]) -> list[ActionLabels | None]:
        texts = [t or "" for t in texts]
        found = self.cache.get_many(self.name, self.version, texts)
        todo = [t for t in dict.fromkeys(texts) if t not in found]
        self.hits += sum(1 for t in texts if t in found)
        self.misses += len(todo)
        new: dict[str, ActionLabels | None] = {}
        for i in range(0, len(todo), self.chunk_size):
            chunk = todo[i : i + self.chunk_size]
            res = self.inner.label(chunk)
            if len(res) != len(chunk):
                raise ConfigError(
                    f"labeler {self.name!r} returned {len(res)} results for {len(chunk)} texts",
                    field="labeler",
                )
            got = dict(zip(chunk, res, strict=True))
            self.cache.put_many(self.name, self.version, got)
            new.update(got)
        out: list[ActionLabels | None] = []
        for t in texts:
            al = found.get(t) if t in found else new.get(t)
            # a fresh copy per position: callers may mutate their labels
            out.append(
                None if al is None else ActionLabels(labels=dict(al.labels), keywords=list(al.keywords))
            )
        return out

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> CachedLabeler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
