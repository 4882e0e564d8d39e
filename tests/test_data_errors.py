"""Bad input never gives a traceback: a DataError naming the file and field; in a folder the rest loads."""

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


def test_missing_field(ced):
    _edit_reposts(ced, lambda recs: recs[3].pop("date"))
    _one_bad(ced, "date", "missing", "post 3")


def test_mistyped_field(ced):
    def f(recs):
        recs[5]["uid"] = [1, 2]

    _edit_reposts(ced, f)
    _one_bad(ced, "uid", "expected a string id")


def test_mistyped_author_field(ced):
    p = ced / "original-microblog" / f"{BAD_ID}.json"
    d = json.loads(p.read_text("utf-8"))
    d["user"]["followers"] = "many"
    p.write_text(json.dumps(d), "utf-8")
    err = _one_bad(ced, "user.followers", "expected an integer")
    assert err.path == str(p)


def test_bad_date(ced):
    def f(recs):
        recs[7]["date"] = "2013/01/02 10:00"

    p = _edit_reposts(ced, f)
    err = _one_bad(ced, "date", 'not a "YYYY-MM-DD HH:MM:SS" date')
    assert str(err).startswith(f"{p}: field 'date': not a \"YYYY-MM-DD HH:MM:SS\" date")


@pytest.mark.parametrize("date", ["1901-01-01 00:00:00", "2010-01-01 00:00:00", "2150-01-01 00:00:00"])
def test_impossible_timestamp(ced, date):
    def f(recs):
        recs[2]["date"] = date  # before 1990, long before the source post (2012), after 2100

    _edit_reposts(ced, f)
    _one_bad(ced, "date", "impossible timestamp")


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
    p, events = _jsonl_events(tmp_path)
    lines = p.read_text("utf-8").splitlines()
    bad = json.loads(lines[1])
    bad["actions"][4]["time"] = "yesterday"
    lines[1] = json.dumps(bad, ensure_ascii=False)
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
    p.write_text("\n".join(lines) + "\n", "utf-8")
    res = load_events(p)
    assert len(res.events) == 2
    got = {(e.path.rsplit(":", 1)[1], e.field) for e in res.skipped}
    assert got == {
        ("2", "actions[4].time"),
        ("4", "actions"),
        ("5", None),
        ("6", "actions[0].profile.folowers"),
    }
    by_line = {e.path.rsplit(":", 1)[1]: str(e) for e in res.skipped}
    assert "no actions" in by_line["4"] and "not valid JSON" in by_line["5"] and "allowed:" in by_line["6"]
    assert all(e.path.startswith(str(p)) for e in res.skipped)


def test_jsonl_invalid_utf8_line(tmp_path):
    p, _ = _jsonl_events(tmp_path)
    data = p.read_bytes().split(b"\n")
    data[2] = data[2].replace("转".encode(), b"\xff", 1)
    p.write_bytes(b"\n".join(data))
    res = load_events(p)
    assert len(res.events) == 2
    (err,) = res.skipped
    assert err.path == f"{p}:3" and "UTF-8" in str(err)


def test_rumdect_errors(tmp_path):
    posts = json.loads((FIX / "rumdect" / "3476055656644087.json").read_text("utf-8"))
    p = tmp_path / "r.json"

    def check(mutate, field, words):
        recs = json.loads(json.dumps(posts))
        mutate(recs)
        p.write_text(json.dumps(recs, ensure_ascii=False), "utf-8")
        with pytest.raises(DataError) as ei:
            load_events(p)
        assert ei.value.path == str(p) and ei.value.field == field and words in str(ei.value)

    check(lambda r: r[0].update(parent="1"), "[0].parent", "source post")
    check(lambda r: r[2].update(t="noon"), "[2].t", "expected unix seconds")
    check(lambda r: r[3].update(followers_count=1.5), "[3].followers_count", "expected an integer")
    check(lambda r: r[1].pop("uid"), "[1].uid", "missing")
    check(lambda r: r.__delitem__(slice(1, None)), None, "no reposts or comments")


def test_helpful_hints():
    with pytest.raises(DataError, match="looks like a CED repost file"):
        load_events(FIX / "ced" / "rumor-repost" / "998_ADyGmCvG0_2373589030.json")
    with pytest.raises(DataError, match="not a CED root folder"):
        load_events(FIX / "rumdect", format="ced")
    with pytest.raises(ConfigError, match="unknown format"):
        load_events(FIX / "rumdect", format="csv")
