"""Loaders on real data files shipped in tests/fixtures/data (CED, Rumdect) and the generic JSONL."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mfllm.data.ced import CED_SHORT_DATE_YEAR, parse_ced_date
from mfllm.data.jsonl import event_to_dict, read_jsonl, write_jsonl
from mfllm.data.load import detect_format, iter_events, load_events
from mfllm.data.make_sample import SAMPLE_PATH
from mfllm.data.split import split_of

FIX = Path(__file__).parent / "fixtures" / "data"
CED = FIX / "ced"
RUMDECT = FIX / "rumdect"
RUMDECT_FILE = RUMDECT / "3476055656644087.json"
CED_IDS = sorted(p.stem for p in (CED / "original-microblog").glob("*.json"))
LABEL_DIRS = {"rumor-repost": "rumor", "non-rumor-repost": "non-rumor"}


def _raw_reposts(eid: str) -> tuple[list[dict], str]:
    for d, label in LABEL_DIRS.items():
        p = CED / d / f"{eid}.json"
        if p.exists():
            return json.loads(p.read_text("utf-8")), label
    raise AssertionError(eid)


@pytest.fixture(scope="module")
def ced_events():
    res = load_events(CED)
    assert res.skipped == []
    return {e.event_id: e for e in res.events}


def test_detect_format():
    assert detect_format(CED) == "ced"
    assert detect_format(RUMDECT) == "rumdect"
    assert detect_format(RUMDECT_FILE) == "rumdect"
    assert detect_format(SAMPLE_PATH) == "jsonl"


def test_ced_events_basic(ced_events):
    assert sorted(ced_events) == CED_IDS
    for eid, ev in ced_events.items():
        raw, label = _raw_reposts(eid)
        assert ev.label == label
        assert ev.platform == "weibo"
        assert len(ev.actions) == len({r["mid"] for r in raw})  # duplicated posts kept once
        times = [a.time for a in ev.actions]
        assert times == sorted(times)
        assert ev.source.author.uid == eid.rsplit("_", 1)[1]
        assert all(a.agent_id == a.profile.uid for a in ev.actions)


def test_ced_duplicate_post_kept_once(ced_events):
    raw, _ = _raw_reposts("998_ADyGmCvG0_2373589030")
    assert len(raw) == 95 and len({r["mid"] for r in raw}) == 94
    assert len(ced_events["998_ADyGmCvG0_2373589030"].actions) == 94


def test_ced_source_quirks(ced_events):
    # this source post gives time as "Tue Apr 01 ... +0800 2014" and user as "empty"
    ev = ced_events["998_ADyGmCvG0_2373589030"]
    assert ev.source.time == 1396268725.0
    assert ev.source.author.followers is None and ev.source.author.gender is None
    # a full author profile
    a = ced_events["4794_AuLitvtRd_1677875323"].source.author
    assert (a.gender, a.location, a.followers, a.friends, a.statuses) == (
        "m",
        "北京 朝阳区",
        613017,
        1017,
        19635,
    )
    assert a.verified is True and a.verified_type == 0 and a.has_description is True
    assert a.created_at == 1262557267.0


def test_ced_dates():
    assert parse_ced_date("2012-09-11 11:34:22") == 1347334462.0  # Beijing time
    assert parse_ced_date("2012-02-30 11:34:22") is None
    assert parse_ced_date("2012-09-11 25:00:00") is None
    assert parse_ced_date("garbage") is None
    # Weibo's year-less current-year format
    t = parse_ced_date("07月23日 11:47")
    import datetime as dt

    d = dt.datetime.fromtimestamp(t, dt.timezone(dt.timedelta(hours=8)))
    assert (d.year, d.month, d.day, d.hour, d.minute) == (CED_SHORT_DATE_YEAR, 7, 23, 11, 47)


def test_ced_depth_and_extras(ced_events):
    for eid, ev in ced_events.items():
        raw, _ = _raw_reposts(eid)
        parent = {}
        for r in raw:
            if r["mid"] not in parent or (not parent[r["mid"]] and r["parent"]):
                parent[r["mid"]] = r["parent"]

        def depth(m, parent=parent):
            d = 1
            while parent[m]:
                m = parent[m]
                d += 1
            return d

        for a in ev.actions:
            assert a.depth == depth(a.action_id)
            assert a.parent == (parent[a.action_id] or None)
            assert a.profile.extra["reposts_source"] is (a.parent is None)
            assert a.profile.extra["minutes_after_source"] == round((a.time - ev.source.time) / 60, 1)
        assert max(a.depth for a in ev.actions) >= 2


def test_ced_corpus_activity(ced_events):
    expected = Counter()
    for eid in CED_IDS:
        raw, _ = _raw_reposts(eid)
        seen = set()
        for r in raw:
            if r["mid"] not in seen:
                seen.add(r["mid"])
                expected[r["uid"]] += 1
        expected[eid.rsplit("_", 1)[1]] += 1
    assert max(expected.values()) > 1
    for ev in ced_events.values():
        assert ev.source.author.corpus_activity == expected[ev.source.author.uid]
        for a in ev.actions:
            assert a.profile.corpus_activity == expected[a.agent_id]


def test_ced_filters_and_limit():
    assert [e.event_id for e in load_events(CED, limit=2).events] == CED_IDS[:2]
    one = load_events(CED, event_ids=[CED_IDS[1]])
    assert [e.event_id for e in one.events] == [CED_IDS[1]] and one.skipped == []
    for split in ("train", "val", "test"):
        got = [e.event_id for e in load_events(CED, split=split).events]
        assert got == [i for i in CED_IDS if split_of(i) == split]
    missing = load_events(CED, event_ids=["nope"])
    assert missing.events == [] and "nope" in str(missing.skipped[0])
    assert next(iter_events(CED)).event_id == CED_IDS[0]


def test_rumdect_excerpt():
    for path in (RUMDECT_FILE, RUMDECT):
        res = load_events(path)
        assert res.skipped == []
        (ev,) = res.events
        assert ev.event_id == "3476055656644087" and ev.label is None
        assert len(ev.actions) == 5
        au = ev.source.author
        assert (au.uid, au.gender, au.location, au.followers, au.friends, au.statuses, au.favourites) == (
            "1797791674",
            "m",
            "北京 海淀区",
            7713,
            1546,
            713,
            58,
        )
        assert au.screen_name and au.description == "纵情向前" and au.created_at == 1282439985.0
        by_id = {a.action_id: a for a in ev.actions}
        plain = by_id["3476057192127748"]  # original_text has the //@ chain, text is the user's words
        assert plain.text == "" and plain.depth == 2 and plain.profile.extra.get("parent_missing") is True
        direct = by_id["3476056017106708"]
        assert direct.parent is None and direct.depth == 1 and direct.text == "转发微博。"
        assert direct.profile.extra == {"reposts_source": True, "minutes_after_source": 1.4}
        v = by_id["3476058110623491"].profile
        assert v.verified is True and v.verified_reason.startswith("北京星火立方")
        assert [a.time for a in ev.actions] == sorted(a.time for a in ev.actions)


@pytest.mark.parametrize("src", [CED, RUMDECT])
def test_jsonl_round_trip(tmp_path, src):
    events = load_events(src).events
    out = tmp_path / "events.jsonl"
    assert write_jsonl(events, out) == len(events)
    back = load_events(out)
    assert back.skipped == []
    assert [event_to_dict(e) for e in back.events] == [event_to_dict(e) for e in events]
    for a, b in zip(events, back.events, strict=True):
        assert a.actions == b.actions and a.source == b.source
    # writing what was read gives the same bytes
    out2 = tmp_path / "again.jsonl"
    write_jsonl(back.events, out2)
    assert out2.read_bytes() == out.read_bytes()


def test_jsonl_minimal_user_event(tmp_path):
    line = {
        "event_id": "e1",
        "source": {"text": "hello", "time": "2024-05-01T12:00:00+00:00"},
        "actions": [
            {"agent_id": "u2", "action_id": "b", "time": 1714565400, "text": "", "parent": "a"},
            {
                "agent_id": "u1",
                "action_id": "a",
                "time": 1714564800,
                "text": "wow",
                "profile": {"followers": 10, "gender": "f"},
            },
        ],
    }
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps(line) + "\n\n", "utf-8")
    (ev,) = read_jsonl(p)
    assert ev.source.time == 1714564800.0 and ev.platform == "weibo" and ev.label is None
    assert [a.action_id for a in ev.actions] == ["a", "b"]  # sorted by time
    assert [a.depth for a in ev.actions] == [1, 2]
    assert ev.actions[0].profile.uid == "u1" and ev.actions[0].profile.followers == 10


def test_shipped_sample():
    res = load_events(SAMPLE_PATH)
    assert res.skipped == []
    evs = res.events
    assert 35 <= len(evs) <= 45
    assert {split_of(e.event_id) for e in evs} == {"test"}
    labels = Counter(e.label for e in evs)
    assert labels["rumor"] >= 10 and labels["non-rumor"] >= 10
    assert sum(100 <= len(e) <= 400 for e in evs) >= 0.8 * len(evs)
    assert all(a.profile.corpus_activity for e in evs for a in e.actions)
    assert SAMPLE_PATH.stat().st_size < 4_500_000
    assert (SAMPLE_PATH.parent / "README.md").exists()


REAL_CED = Path("/work/shared/data/ced")


@pytest.mark.skipif(not REAL_CED.is_dir(), reason="the full CED copy is not on this machine")
def test_sample_reproducible_from_real_ced(tmp_path):
    """Converting a few sample events from the real CED folder reproduces the shipped lines exactly."""
    lines = SAMPLE_PATH.read_text("utf-8").splitlines()
    ids = [json.loads(line)["event_id"] for line in lines[:3]]
    res = load_events(REAL_CED, event_ids=ids)
    assert res.skipped == []
    out = tmp_path / "x.jsonl"
    write_jsonl(res.events, out)
    assert out.read_text("utf-8").splitlines() == lines[:3]
