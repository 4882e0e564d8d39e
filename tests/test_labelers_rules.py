"""The offline rules labeler: plain reposts, each dimension's key markers, determinism, keywords."""

from __future__ import annotations

import pytest

from mfllm.labels.base import ActionLabels, Labeler
from mfllm.labels.dimensions import DIMENSIONS, PLAIN_REPOST_LABELS
from mfllm.labels.rules import MAX_KEYWORDS, RulesLabeler, is_plain_repost


@pytest.fixture(scope="module")
def rules() -> RulesLabeler:
    return RulesLabeler()


def test_protocol_and_identity(rules):
    assert isinstance(rules, Labeler)
    assert rules.name == "rules" and rules.version


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "转发微博",
        "转发微博。",
        "轉發微博",
        "Repost",
        "Repost Weibo",
        "[转发]",
        "@张三 @李四",
        "转发微博//@某人: 太可恶了！",
        "//@abc:谣言",
        "http://t.cn/abc",
        "#热门微博# http:",
        "回复@某人:转发微博",
    ],
)
def test_plain_reposts(rules, text):
    al = rules.label_one(text)
    assert al.labels == PLAIN_REPOST_LABELS
    assert is_plain_repost(text)


def test_every_dimension_has_an_allowed_category(rules):
    texts = [
        "",
        "太可恶了！！",
        "[哈哈][哈哈]",
        "真的假的？",
        "辟谣：这是假的，别信",
        "求扩散！",
        "……",
        "snn",
        "[蜡烛]",
        "好可怕",
        "[吃惊]",
        "为什么？",
        "#话题# 支持",
        "回复@a:不实报道",
    ]
    for al in rules.label(texts):
        assert isinstance(al, ActionLabels)
        assert set(al.labels) == set(DIMENSIONS)
        for dim, cat in al.labels.items():
            assert cat in DIMENSIONS[dim], (dim, cat)
        assert len(al.keywords) <= MAX_KEYWORDS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[怒]", {"sentiment_state": "angry", "sentiment_tendency": "negative"}),
        ("太无耻了，严惩！", {"sentiment_state": "angry", "stance": "support"}),
        ("[哈哈][哈哈]土豪", {"sentiment_state": "happy", "sentiment_tendency": "positive"}),
        ("[泪]", {"sentiment_state": "sad"}),
        ("一路走好[蜡烛][蜡烛]", {"sentiment_state": "sad", "stance": "support"}),
        ("[吃惊]", {"sentiment_state": "surprise"}),
        ("这也太恐怖了吧！！！", {"sentiment_state": "fear", "sentiment_tendency": "negative"}),
        ("[鄙视]", {"sentiment_state": "angry"}),
        ("辟谣：这是谣言，大家别信", {"rumor": "counter", "belief_degree": "doubt", "stance": "oppose"}),
        ("假新闻，别传了", {"rumor": "counter", "sentiment_tendency": "negative"}),
        ("纯属造谣", {"rumor": "counter"}),
        ("这个不是谣言，是真的", {"rumor": "spread", "belief_degree": "believe"}),
        ("不是谣言吗", {"rumor": "counter", "belief_degree": "doubt", "intent": "question"}),
        ("钱是最不实际的", {"rumor": "spread"}),  # "不实际" is not "不实"
        ("真的假的？", {"belief_degree": "doubt", "intent": "question", "stance": "neutral"}),
        ("求证", {"belief_degree": "doubt"}),
        ("是真的吗？", {"belief_degree": "doubt", "intent": "question"}),
        ("怎么回事？", {"intent": "question"}),
        ("难道就没人管吗？", {"intent": "opinion"}),  # rhetorical
        ("为什么没人管！！", {"intent": "opinion"}),  # shouted: rhetorical
        ("求扩散！", {"intent": "promotion", "behavior_type": "share"}),
        ("转发扩散，让更多人知道这个骗局", {"intent": "promotion", "behavior_type": "comment"}),
        ("@王五 看看", {"intent": "promotion"}),
        ("我觉得这样不对", {"subjectivity": "subjective", "behavior_type": "comment"}),
        ("据报道，事故发生在昨日下午", {"subjectivity": "objective"}),
        ("……", {"behavior_type": "comment", "stance": "neutral", "sentiment_state": "calm"}),
        ("支持！", {"stance": "support"}),
        ("胡说八道", {"stance": "oppose"}),
        ("回复@某人:太可恶了", {"sentiment_state": "angry"}),  # reply prefix is not content
        ("赞//@某人: 谣言", {"rumor": "spread"}),  # the repost chain is someone else's words
    ],
)
def test_markers(rules, text, expected):
    labels = rules.label_one(text).labels
    for dim, cat in expected.items():
        assert labels[dim] == cat, (text, dim, labels)


def test_deterministic_and_copies(rules):
    a = rules.label_one("太可恶了！[怒]")
    a.labels["rumor"] = "counter"  # mutating a result must not leak into the memo
    a.keywords.append("x")
    b = rules.label_one("太可恶了！[怒]")
    assert b.labels["rumor"] == "spread" and "x" not in b.keywords
    assert RulesLabeler().label(["太可恶了！[怒]", ""]) == rules.label(["太可恶了！[怒]", ""])


def test_label_aligns_with_input(rules):
    texts = ["[哈哈]", "", "[怒]", None, "真的假的？"]
    out = rules.label(texts)
    assert len(out) == len(texts)
    assert [o.labels["sentiment_state"] for o in out] == ["happy", "calm", "angry", "calm", "surprise"]


def test_keywords(rules):
    kw = rules.label_one("#雅安地震# 为雅安祈福，希望救援顺利//@某人: 转发").keywords
    assert kw[0] == "雅安地震"
    assert kw == ["雅安地震", "雅安", "祈福", "救援", "顺利"]  # whole dictionary words
    assert rules.label_one("").keywords == []
    assert rules.label_one("[哈哈][哈哈]").keywords == []  # emoticons are not keywords
    assert rules.label_one("的了是在我你").keywords == []  # stopwords only
    assert "iphone" in rules.label_one("买了个iPhone").keywords
    long = "".join(f"词{i}语{i}" for i in range(40))
    assert len(rules.label_one(long).keywords) <= MAX_KEYWORDS


def test_weird_inputs_do_not_crash(rules):
    for t in ["[", "]]]", "@", "//@", "回复@", "#", "##", "?" * 500, "呵" * 2000, "\x00\n\t", "🙂🙂"]:
        al = rules.label_one(t)
        assert set(al.labels) == set(DIMENSIONS)
