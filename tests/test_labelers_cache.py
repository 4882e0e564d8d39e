"""CachedLabeler: SQLite label cache keyed by (labeler name, version, text); only successes are cached."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3

import pytest

from mfllm.errors import ConfigError
from mfllm.labels.base import ActionLabels
from mfllm.labels.cache import CachedLabeler, LabelCache
from mfllm.labels.dimensions import PLAIN_REPOST_LABELS
from mfllm.labels.rules import RulesLabeler


class CountingLabeler:
    """Labels every text with the plain-repost labels and the text as keyword; None for texts in `fail`."""

    name = "counting"

    def __init__(self, version: str = "1", fail: set[str] | None = None):
        self.version = version
        self.fail = fail or set()
        self.seen: list[str] = []

    def label(self, texts):
        self.seen.extend(texts)
        return [
            None if t in self.fail else ActionLabels(labels=dict(PLAIN_REPOST_LABELS), keywords=[t])
            for t in texts
        ]


def test_hits_misses_and_order(tmp_path):
    inner = CountingLabeler()
    c = CachedLabeler(inner, tmp_path / "labels.sqlite")
    assert (c.name, c.version) == ("counting", "1")
    out = c.label(["a", "b", "a", ""])
    assert [o.keywords for o in out] == [["a"], ["b"], ["a"], [""]]
    assert inner.seen == ["a", "b", ""]  # each distinct text once
    out2 = c.label(["b", "c", "a"])
    assert [o.keywords for o in out2] == [["b"], ["c"], ["a"]]
    assert inner.seen == ["a", "b", "", "c"]
    assert c.hits == 2 + 0 and c.misses == 3 + 1
    c.close()


def test_persists_across_instances_and_keys_on_version(tmp_path):
    path = tmp_path / "labels.sqlite"
    with CachedLabeler(CountingLabeler(), path) as c:
        c.label(["x", "y"])
    inner = CountingLabeler()
    with CachedLabeler(inner, path) as c:
        assert [o.keywords for o in c.label(["y", "x"])] == [["y"], ["x"]]
    assert inner.seen == []
    inner2 = CountingLabeler(version="2")  # a new version never reuses old labels
    with CachedLabeler(inner2, path) as c:
        c.label(["x"])
    assert inner2.seen == ["x"]
    assert LabelCache(path).count("counting") == 3


def test_only_successes_are_cached(tmp_path):
    path = tmp_path / "labels.sqlite"
    inner = CountingLabeler(fail={"bad"})
    with CachedLabeler(inner, path) as c:
        out = c.label(["good", "bad"])
        assert out[1] is None and out[0] is not None
        c.label(["bad"])
    assert inner.seen == ["good", "bad", "bad"]  # asked again: a failure is not cached
    assert LabelCache(path).count() == 1


def test_results_are_copies(tmp_path):
    with CachedLabeler(CountingLabeler(), tmp_path / "l.sqlite") as c:
        a, b = c.label(["t", "t"])
        a.labels["rumor"] = "counter"
        assert b.labels["rumor"] == "spread"
        assert c.label(["t"])[0].labels["rumor"] == "spread"


def test_wraps_rules(tmp_path):
    rules = RulesLabeler()
    texts = ["[怒]太可恶了", "", "真的假的？", "[怒]太可恶了"]
    with CachedLabeler(RulesLabeler(), tmp_path / "l.sqlite") as c:
        first = c.label(texts)
        second = c.label(texts)
    assert first == second == rules.label(texts)


def test_corrupt_entry_is_a_miss(tmp_path):
    path = tmp_path / "l.sqlite"
    with CachedLabeler(CountingLabeler(), path) as c:
        c.label(["z"])
    con = sqlite3.connect(path)
    con.execute(
        "UPDATE labels SET labels = ? WHERE text = 'z'", (json.dumps({"labels": {"rumor": "maybe"}}),)
    )
    con.commit()
    con.close()
    inner = CountingLabeler()
    with CachedLabeler(inner, path) as c:
        assert c.label(["z"])[0].keywords == ["z"]
    assert inner.seen == ["z"]


def test_inner_length_mismatch_is_an_error(tmp_path):
    class Broken(CountingLabeler):
        def label(self, texts):
            return super().label(texts)[:-1]

    with CachedLabeler(Broken(), tmp_path / "l.sqlite") as c, pytest.raises(ConfigError):
        c.label(["a", "b"])


def test_crash_mid_labelling_keeps_committed_chunks(tmp_path):
    """A labeler that dies on its 3rd chunk: the first 2 chunks are in the file, nothing torn."""

    class Dies(CountingLabeler):
        def label(self, texts):
            if len(self.seen) >= 4:
                raise RuntimeError("killed")
            return super().label(texts)

    path = tmp_path / "l.sqlite"
    c = CachedLabeler(Dies(), path, chunk_size=2)
    with pytest.raises(RuntimeError):
        c.label([f"t{i}" for i in range(10)])
    c.close()
    inner = CountingLabeler()
    with CachedLabeler(inner, path, chunk_size=2) as c2:
        out = c2.label([f"t{i}" for i in range(10)])
    assert [o.keywords[0] for o in out] == [f"t{i}" for i in range(10)]
    assert inner.seen == [f"t{i}" for i in range(4, 10)]


def _write_then_die(path: str, n: int) -> None:
    c = CachedLabeler(CountingLabeler(), path, chunk_size=50)
    c.label([f"p{i}" for i in range(n)])
    os._exit(0)  # no close, no cleanup


def test_kill_leaves_no_torn_entry(tmp_path):
    path = str(tmp_path / "l.sqlite")
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_write_then_die, args=(path, 2000))
    p.start()
    p.join(timeout=0.05)
    if p.is_alive():
        p.kill()
    p.join()
    cache = LabelCache(path)
    n = cache.count()
    assert n % 50 == 0  # whole chunks only
    got = cache.get_many("counting", "1", [f"p{i}" for i in range(2000)])
    assert len(got) == n
    assert all(al.keywords == [t] for t, al in got.items())
