"""Bad input never gives a traceback: a DataError naming the file and field; in a folder the rest loads.

A fault in one action's row loses that action, never the event (tested per kind and per loader on real
files: copies of the fixtures with one row damaged).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mfllm.data.jsonl import write_jsonl
from mfllm.data.load import detect_format, load_events
from mfllm.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures" / "data"
BAD_ID = "4232_z3eqPvYtc_2123247457"  # a non-rumor event of the CED fixture
GOOD_IDS = ["4794_AuLitvtRd_1677875323", "998_ADyGmCvG0_2373589030"]


@pytest.fixture
def ced(tmp_path) -> Path:
    root = tmp_path / "ced"
    shutil.copytree(FIX / "ced", root)
    return root


def _reposts(ced: Path) -> Path:
    return ced / "non-rumor-repost" / f"{BAD_ID}.json"


def _edit_reposts(ced: Path, fn) -> Path:
    p = _reposts(ced)
    recs = json.loads(p.read_text("utf-8"))
    fn(recs)
    p.write_text(json.dumps(recs, ensure_ascii=False), "utf-8")
    return p


def _one_bad(ced: Path, field: str | None, *words: str) -> DataError:
    """The folder loads the good events and reports exactly the bad file; strict mode raises the same."""
    res = load_events(ced)
    assert sorted(e.event_id for e in res.events) == GOOD_IDS
    assert len(res.skipped) == 1
    err = res.skipped[0]
    assert BAD_ID in err.path and err.field == field
    for w in words:
        assert w in str(err)
    with pytest.raises(DataError) as ei:
        load_events(ced, strict=True)
    assert str(ei.value) == str(err)
    return err


def test_truncated_json(ced):
    p = _reposts(ced)
    p.write_bytes(p.read_bytes()[:500])
    _one_bad(ced, None, "not valid JSON", "truncated")


def test_invalid_utf8(ced):
    p = _reposts(ced)
    p.write_bytes(p.read_bytes().replace("转发".encode(), b"\xff\xfe", 1))
    _one_bad(ced, None, "not valid UTF-8")


def _one_dropped(ced: Path, kinds: dict[str, int], field: str | None, *words: str):
    """Every event loads (none skipped, strict too); the damaged one lost exactly its bad rows."""
    res = load_events(ced)
    assert res.skipped == [] and sorted(e.event_id for e in res.events) == sorted([BAD_ID, *GOOD_IDS])
    ev = next(e for e in res.events if e.event_id == BAD_ID)
    assert len(ev.actions) == 90 - sum(kinds.values())
    assert ev.dropped_actions == kinds and res.dropped_actions == kinds
    assert all(e.dropped is None for e in res.events if e is not ev)
    (d,) = res.dropped  # one record for the file: the CLI warns once per file
    named = f"{_reposts(ced)}: " + (f"field '{field}': " if field else "")
    assert d.origin == str(_reposts(ced)) and d.first.startswith(named)
    for w in words:
        assert w in d.first
    strict = load_events(ced, strict=True)  # strict is about whole files
    assert [len(e.actions) for e in strict.events] == [len(e.actions) for e in res.events]
    return ev


# Each kind of per-action fault in a CED repost file: (row index, how to damage it, kind, field, words).
CED_ROW_FAULTS = {
    "missing-field": (3, lambda r: r.pop("date"), "missing_field", "date", ["missing", "post 3"]),
    "mistyped-uid": (5, lambda r: r.update(uid=[1, 2]), "bad_field", "uid", ["expected a string id"]),
    "null-mid": (6, lambda r: r.update(mid=None), "bad_field", "mid", ["expected a non-empty string id"]),
    "mistyped-text": (8, lambda r: r.update(text=7), "bad_field", "text", ["expected a string"]),
    "mistyped-parent": (9, lambda r: r.update(parent=3), "bad_field", "parent", ['string mid or ""']),
    "bad-date": (7, lambda r: r.update(date="2013/01/02 10:00"), "bad_time", "date",
                 ['not a "YYYY-MM-DD HH:MM:SS" date', "post 7"]),
    "before-1990": (2, lambda r: r.update(date="1901-01-01 00:00:00"), "time_out_of_range", "date",
                    ["impossible timestamp", "not between 1990 and 2100"]),
    "after-2100": (2, lambda r: r.update(date="2150-01-01 00:00:00"), "time_out_of_range", "date",
                   ["not between 1990 and 2100"]),
    "before-source": (2, lambda r: r.update(date="2010-01-01 00:00:00"), "time_before_source", "date",
                      ["hours before the source post", "post 2"]),
    "lone-surrogate": (4, lambda r: r.update(text="\ud800"), "bad_field", "text", ["lone UTF-16 surrogate"]),
}


@pytest.mark.parametrize("case", list(CED_ROW_FAULTS))
def test_ced_row_fault_drops_the_action_not_the_event(ced, case):
    i, damage, kind, field, words = CED_ROW_FAULTS[case]
    p = _reposts(ced)
    recs = json.loads(p.read_text("utf-8"))
    mid = recs[i]["mid"]
    damage(recs[i])
    p.write_text(json.dumps(recs), "ascii")  # \u escapes: how a lone surrogate reaches a JSON file
    ev = _one_dropped(ced, {kind: 1}, field, *words)
    assert mid not in {a.action_id for a in ev.actions} or case == "null-mid"


def test_ced_row_not_an_object_and_several_kinds(ced):
    def f(recs):
        recs[10] = "oops"
        recs[12]["date"] = "2010-01-01 00:00:00"
        recs[13]["date"] = "2010-01-01 00:00:00"

    _edit_reposts(ced, f)
    ev = _one_dropped(ced, {"bad_field": 1, "time_before_source": 2}, None, "post 10: expected an object")
    assert "3 action(s) dropped (bad_field 1, time_before_source 2)" in str(ev.dropped)


def test_ced_every_row_bad_skips_the_event(ced):
    """No action left: the event cannot be used, and the message says why (the first fault)."""

    def f(recs):
        for r in recs:
            r["date"] = "2010-01-01 00:00:00"

    _edit_reposts(ced, f)
    err = _one_bad(ced, "date", "hours before the source post", "no action left: all 90 dropped")
    assert "(time_before_source 90)" in str(err)


def test_ced_real_clock_error_keeps_the_event():
    """The issue's case, on a real event: a repost dated 42.3 hours before its source post is dropped;
    the repost 11 s before the source (real clock skew, within a day) is kept."""
    res = load_events(FIX / "ced_clock")
    (ev,) = res.events
    assert res.skipped == [] and ev.event_id == "3102_8MEuzn_1700757973" and len(ev.actions) == 20
    assert ev.dropped_actions == {"time_before_source": 1} == res.dropped_actions
    assert "42.3 hours before the source post (post 2, mid 9spkMP)" in ev.dropped.first
    assert "9spkMP" not in {a.action_id for a in ev.actions}
    assert ev.actions[0].action_id == "8MEzJz" and ev.actions[0].time == ev.source.time - 11


def test_mistyped_author_field(ced):  # the source post's author: the event's own fault
    p = ced / "original-microblog" / f"{BAD_ID}.json"
    d = json.loads(p.read_text("utf-8"))
    d["user"]["followers"] = "many"
    p.write_text(json.dumps(d), "utf-8")
    err = _one_bad(ced, "user.followers", "expected an integer")
    assert err.path == str(p)


def test_source_time_impossible(ced):  # the source post's own time: the event is skipped
    p = ced / "original-microblog" / f"{BAD_ID}.json"
    d = json.loads(p.read_text("utf-8"))
    d["time"] = 1e12
    p.write_text(json.dumps(d), "utf-8")
    err = _one_bad(ced, "time", "impossible timestamp")
    assert err.path == str(p)


def test_empty_event(ced):
    _reposts(ced).write_text("[]", "utf-8")
    _one_bad(ced, None, "no reposts or comments")


def test_missing_repost_file(ced):
    _reposts(ced).unlink()
    _one_bad(ced, None, "no repost file")


def test_label_ambiguous(ced):
    shutil.copy(_reposts(ced), ced / "rumor-repost" / f"{BAD_ID}.json")
    _one_bad(ced, None, "ambiguous")


def test_unreadable_file(ced, monkeypatch):
    bad = str(_reposts(ced))
    if os.geteuid() == 0:  # root reads every file: simulate the permission error
        import builtins

        import mfllm.data._common as common

        def fake_open(path, *a, **k):
            if str(path) == bad:
                raise PermissionError(13, "Permission denied")
            return builtins.open(path, *a, **k)

        monkeypatch.setattr(common, "open", fake_open, raising=False)
    else:
        _reposts(ced).chmod(0)
    _one_bad(ced, None, "cannot read", "Permission denied")


def test_unknown_format(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello", "utf-8")
    with pytest.raises(DataError) as ei:
        load_events(p)
    assert ei.value.path == str(p) and "unknown data format" in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="unknown data format"):
        detect_format(empty)
    with pytest.raises(DataError, match="no such file"):
        load_events(tmp_path / "missing")
    with pytest.raises(DataError, match="CED sub-folder"):
        load_events(FIX / "ced" / "original-microblog")


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown split"):
        load_events(FIX / "ced", split="dev")
    with pytest.raises(ConfigError, match="limit"):
        load_events(FIX / "ced", limit=-1)


def _jsonl_events(tmp_path):
    events = load_events(FIX / "ced").events
    p = tmp_path / "a.jsonl"
    write_jsonl(events, p)
    return p, events


def test_duplicate_event_ids(tmp_path):
    p, events = _jsonl_events(tmp_path)
    write_jsonl(events[:1], tmp_path / "b.jsonl")
    res = load_events(tmp_path)
    assert len(res.events) == 3 and len(res.skipped) == 1
    err = res.skipped[0]
    assert err.field == "event_id" and "b.jsonl" in err.path and "duplicate event id" in str(err)


def test_jsonl_bad_lines_skipped(tmp_path):
    """A line that cannot be read, or whose event has no usable action, is skipped and named by file:line."""
    p, events = _jsonl_events(tmp_path)
    lines = p.read_text("utf-8").splitlines()
    lines.append('{"event_id": "x", "source": {"text": "t", "time": 1400000000}, "actions": []}')
    lines.append('{"event_id": "y", "sou')
    lines.append(
        json.dumps(
            {
                "event_id": "z",
                "source": {"text": "t", "time": 1.4e9},
                "actions": [{"agent_id": "u", "time": 1.4e9, "text": "", "profile": {"folowers": 3}}],
            }
        )
    )
    lines.append(json.dumps({"event_id": "w", "source": {"text": "t", "time": "noon"}, "actions": []}))
    p.write_text("\n".join(lines) + "\n", "utf-8")
    res = load_events(p)
    assert len(res.events) == 3 and res.dropped == []
    got = {(e.path.rsplit(":", 1)[1], e.field) for e in res.skipped}
    assert got == {("4", "actions"), ("5", None), ("6", "actions[0].profile.folowers"), ("7", "source.time")}
    by_line = {e.path.rsplit(":", 1)[1]: str(e) for e in res.skipped}
    assert "no actions" in by_line["4"] and "not valid JSON" in by_line["5"]
    assert "allowed:" in by_line["6"] and "no action left: all 1 dropped (unknown_key 1)" in by_line["6"]
    assert all(e.path.startswith(str(p)) for e in res.skipped)


# Each kind of per-action fault in a JSONL line: (action index, how to damage it, kind, field).
JSONL_ACTION_FAULTS = {
    "bad-time": (4, lambda a: a.update(time="yesterday"), "bad_time", "time"),
    "no-utc-offset": (4, lambda a: a.update(time="2012-09-18T08:00:00"), "bad_time", "time"),
    "out-of-range": (4, lambda a: a.update(time=1e12), "time_out_of_range", "time"),
    "before-source": (4, lambda a: a.update(time=900000000.0), "time_before_source", "time"),
    "missing-time": (4, lambda a: a.pop("time"), "missing_field", "time"),
    "missing-agent": (4, lambda a: a.pop("agent_id"), "missing_field", "agent_id"),
    "mistyped-text": (4, lambda a: a.update(text=["x"]), "bad_field", "text"),
    "bad-depth": (4, lambda a: a.update(depth=0), "bad_field", "depth"),
    "unknown-key": (4, lambda a: a.update(likes=3), "unknown_key", "likes"),
    "profile-typo": (4, lambda a: a["profile"].update(folowers=3), "unknown_key", "profile.folowers"),
    "profile-mistyped": (4, lambda a: a["profile"].update(followers="many"), "bad_field", "profile.followers"),
    "duplicate-id": (4, None, "duplicate_id", "action_id"),
    "lone-surrogate": (4, lambda a: a.update(text="\ud800"), "bad_field", "text"),
}


@pytest.mark.parametrize("case", list(JSONL_ACTION_FAULTS))
def test_jsonl_action_fault_drops_the_action_not_the_event(tmp_path, case):
    p, events = _jsonl_events(tmp_path)
    i, damage, kind, field = JSONL_ACTION_FAULTS[case]
    lines = p.read_text("utf-8").splitlines()
    d = json.loads(lines[1])
    n = len(d["actions"])
    if damage is None:
        d["actions"][i]["action_id"] = d["actions"][0]["action_id"]
    else:
        damage(d["actions"][i])
    lines[1] = json.dumps(d)  # \u escapes, as a lone surrogate reaches a file
    p.write_text("\n".join(lines) + "\n", "utf-8")
    res = load_events(p)
    assert res.skipped == [] and len(res.events) == 3
    ev = res.events[1]
    assert len(ev.actions) == n - 1 and ev.dropped_actions == {kind: 1} == res.dropped_actions
    assert ev.dropped.origin == f"{p}:2" and ev.dropped.first.startswith(f"{p}:2: field 'actions[{i}].{field}'")


def test_jsonl_invalid_utf8_line(tmp_path):
    p, _ = _jsonl_events(tmp_path)
    data = p.read_bytes().split(b"\n")
    data[2] = data[2].replace("转".encode(), b"\xff", 1)
    p.write_bytes(b"\n".join(data))
    res = load_events(p)
    assert len(res.events) == 2
    (err,) = res.skipped
    assert err.path == f"{p}:3" and "UTF-8" in str(err)


def _rumdect(tmp_path, mutate) -> Path:
    posts = json.loads((FIX / "rumdect" / "3476055656644087.json").read_text("utf-8"))
    mutate(posts)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(posts), "utf-8")
    return p


def test_rumdect_errors(tmp_path):
    """The source post's own faults, or no action left: the (one-event) file raises."""

    def check(mutate, field, words):
        p = _rumdect(tmp_path, mutate)
        with pytest.raises(DataError) as ei:
            load_events(p)
        assert ei.value.path == str(p) and ei.value.field == field and words in str(ei.value)

    check(lambda r: r[0].update(parent="1"), "[0].parent", "source post")
    check(lambda r: r[0].update(t="noon"), "[0].t", "expected unix seconds")
    check(lambda r: r[0].update(followers_count=1.5), "[0].followers_count", "expected an integer")
    check(lambda r: r.__delitem__(slice(1, None)), None, "no reposts or comments")
    check(lambda r: [x.update(t=1e12) for x in r[1:]], "[1].t", "no action left: all 5 dropped")


# Each kind of per-action fault in a Rumdect file: (post index, how to damage it, kind, field).
RUMDECT_POST_FAULTS = {
    "bad-time": (2, lambda r: r.update(t="noon"), "bad_time", "[2].t"),
    "out-of-range": (2, lambda r: r.update(t=-5), "time_out_of_range", "[2].t"),
    "before-source": (2, lambda r: r.update(t=1344239713 - 3 * 86400), "time_before_source", "[2].t"),
    "missing-time": (2, lambda r: r.pop("t"), "missing_field", "[2].t"),
    "missing-uid": (1, lambda r: r.pop("uid"), "missing_field", "[1].uid"),
    "missing-parent": (4, lambda r: r.pop("parent"), "missing_field", "[4].parent"),
    "mistyped-profile": (3, lambda r: r.update(followers_count=1.5), "bad_field", "[3].followers_count"),
    "mistyped-text": (5, lambda r: r.update(text=5), "bad_field", "[5].text"),
    "lone-surrogate": (5, lambda r: r.update(text="\udfff"), "bad_field", "[5].text"),
}


@pytest.mark.parametrize("case", list(RUMDECT_POST_FAULTS))
def test_rumdect_post_fault_drops_the_action_not_the_event(tmp_path, case):
    i, damage, kind, field = RUMDECT_POST_FAULTS[case]
    p = _rumdect(tmp_path, lambda r: damage(r[i]))
    (ev,) = load_events(p).events
    assert len(ev.actions) == 4 and ev.dropped_actions == {kind: 1}
    assert ev.dropped.first.startswith(f"{p}: field '{field}'")
    res = load_events(tmp_path)  # a folder: the same
    assert res.skipped == [] and len(res.events) == 1 and res.dropped_actions == {kind: 1}


def test_rumdect_not_an_object(tmp_path):
    p = _rumdect(tmp_path, lambda r: r.__setitem__(3, [1]))
    (ev,) = load_events(p).events
    assert len(ev.actions) == 4 and ev.dropped_actions == {"bad_field": 1} and "[3]" in ev.dropped.first


def test_helpful_hints():
    with pytest.raises(DataError, match="looks like a CED repost file"):
        load_events(FIX / "ced" / "rumor-repost" / "998_ADyGmCvG0_2373589030.json")
    with pytest.raises(DataError, match="not a CED root folder"):
        load_events(FIX / "rumdect", format="ced")
    with pytest.raises(ConfigError, match="unknown format"):
        load_events(FIX / "rumdect", format="csv")
