"""The keywords the report and its plots show are whole words: no fragments glued across word boundaries
(rules v3 cut 展示洗脑 into 示洗 and 推迟放学 into 迟放), on the shipped real sample."""

from __future__ import annotations

from collections import Counter

import pytest

from mfllm.data.load import load_events
from mfllm.labels.rules import RulesLabeler
from mfllm.paths import SAMPLE_DATA

# Fragments rules v3 put among the sample's keywords (each spans two words of its text).
V3_FRAGMENTS = ("示洗", "迟放", "决完", "完信", "以给", "妈无言", "妈贵性", "览器", "越来", "来越", "强音演唱")


@pytest.fixture(scope="module")
def sample_keywords() -> Counter:
    lab = RulesLabeler()
    texts = []
    for ev in load_events(SAMPLE_DATA).events:
        texts += [ev.source.text, *(a.text or "" for a in ev.actions)]
    assert len(texts) > 9000
    return Counter(w for al in lab.label(texts) for w in al.keywords)


def test_no_fragment_on_the_real_sample(sample_keywords):
    assert not [f for f in V3_FRAGMENTS if sample_keywords[f]]
    # the words those fragments were cut from are there instead
    for word in ("展示", "洗脑", "推迟", "放学", "浏览器", "信息", "解决"):
        assert sample_keywords[word] >= 1, word


def test_frequent_keywords_are_content_words(sample_keywords):
    top = [w for w, _ in sample_keywords.most_common(30)]
    assert "城管" in top and "刘翔" in top
    assert not {"哈哈", "呵呵", "这个", "我们", "转发", "微博"} & set(top)  # fillers and boilerplate


def test_keywords_of_a_sentence():
    lab = RulesLabeler()
    kw = lab.label_one("回复@林子钧:展示洗脑成果").keywords
    assert kw == ["展示", "洗脑", "成果"]
    assert lab.label_one("今天学校推迟放学，本来还以为学校能够组织去抗议").keywords[:3] == ["学校", "推迟", "放学"]
