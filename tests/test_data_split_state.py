"""The deterministic split and the agent state text."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from mfllm.data.load import load_events
from mfllm.data.schema import Profile
from mfllm.data.split import in_split, split_of
from mfllm.data.state import agent_state_text, humanize_count, humanize_minutes
from mfllm.errors import ConfigError

FIX = Path(__file__).parent / "fixtures" / "data"


def test_split_deterministic_and_known_values():
    ids = [f"{i}_ev" for i in range(200)]
    assert [split_of(i) for i in ids] == [split_of(i) for i in ids]
    for i in ids:  # the rule itself, so that a change of implementation cannot move events silently
        b = int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") % 100
        assert split_of(i) == ("train" if b < 80 else "val" if b < 90 else "test")
    assert in_split("x", "all") and in_split("x", split_of("x"))


def test_split_proportions():
    counts = Counter(split_of(f"event-{i}") for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.8) < 0.02
    assert abs(counts["val"] / 20000 - 0.1) < 0.01
    assert abs(counts["test"] / 20000 - 0.1) < 0.01


def test_split_stable_when_events_are_added():
    old = {f"e{i}": split_of(f"e{i}") for i in range(1000)}
    _ = [split_of(f"new{i}") for i in range(1000)]
    assert all(split_of(k) == v for k, v in old.items())


def test_humanize():
    assert humanize_count(300) == "300"
    assert humanize_count(12345) == "1.2万"
    assert humanize_count(100000) == "10万"
    assert humanize_count(2_500_000) == "250万"
    assert humanize_count(350_000_000) == "3.5亿"
    assert humanize_count(12345, "en") == "12.3K" and humanize_count(999, "en") == "999"
    assert humanize_count(2_500_000, "en") == "2.5M"
    assert humanize_minutes(0.2) == "不到1分钟" and humanize_minutes(35.4) == "35分钟"
    assert humanize_minutes(210) == "3.5小时" and humanize_minutes(60 * 24 * 12) == "12天"
    assert humanize_minutes(35, "en") == "35 min"


def test_state_ced_reposter_compact():
    p = Profile(uid="123", corpus_activity=12, extra={"reposts_source": True, "minutes_after_source": 35.2})
    s = agent_state_text(p)
    assert s == "用户：资料未知；语料中发帖12次；转发原帖；原帖后35分钟"
    assert agent_state_text(p, depth=3) == "用户：资料未知；语料中发帖12次；第3层转发；原帖后35分钟"
    assert "123" not in s  # the uid carries no signal
    assert agent_state_text(p, "en", depth=1) == (
        "User: profile unknown; 12 posts in the corpus; reposts the source; 35 min after the source"
    )


def test_state_full_profile_order_and_fields():
    p = Profile(
        uid="1",
        screen_name="nick",
        gender="m",
        location="北京",
        followers=12000,
        friends=300,
        statuses=5000,
        verified=True,
        has_description=True,
        created_at=1300000000.0,
        corpus_activity=2,
        extra={"minutes_after_source": 90},
    )
    s = agent_state_text(p)
    assert (
        s
        == "用户：男，北京，粉丝1.2万，关注300，微博5000条，认证，有简介，注册于2011年；语料中发帖2次；原帖后1.5小时"
    )
    assert "nick" not in s
    en = agent_state_text(p, "en")
    assert en.startswith(
        "User: male, 北京, 12K followers, 300 following, 5K posts, verified, has bio, joined 2011"
    )


def test_state_same_text_for_same_profile_and_all_fixture_agents():
    for path in (FIX / "ced", FIX / "rumdect"):
        for ev in load_events(path).events:
            for a in ev.actions:
                s1 = agent_state_text(a.profile, depth=a.depth)
                s2 = agent_state_text(Profile.from_dict(a.profile.to_dict()), depth=a.depth)
                assert s1 == s2
                assert "原帖后" in s1 and ("转发原帖" in s1 or "层转发" in s1)
                if path.name == "ced":
                    assert len(s1) <= 60
                en = agent_state_text(a.profile, "en", a.depth)
                assert "after the source" in en
            assert agent_state_text(ev.source.author).startswith("用户：")


def test_state_bad_lang():
    with pytest.raises(ConfigError, match="unknown language"):
        agent_state_text(Profile(uid="1"), lang="fr")
