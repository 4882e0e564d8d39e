"""LLMLabeler through a fake Backend returning canned answers (fault injection): ids, schema, retries."""

from __future__ import annotations

import json
import re

import pytest

from mfllm.backends.base import BackendStats, Completion
from mfllm.errors import BackendError, ConfigError
from mfllm.labels.base import Labeler
from mfllm.labels.cache import CachedLabeler
from mfllm.labels.dimensions import DIMENSIONS, PLAIN_REPOST_LABELS
from mfllm.labels.llm import LLMLabeler, extract_json, parse_answer
from mfllm.prompts.templates import template

_ITEM_RE = re.compile(r'^(t\d+): (".*")$', re.MULTILINE)


def good_item(text: str) -> dict:
    """A deterministic valid answer for one text (the sentiment encodes the text, to check alignment)."""
    states = DIMENSIONS["sentiment_state"]
    d = {dim: cats[0] for dim, cats in DIMENSIONS.items()}
    d["sentiment_state"] = states[sum(map(ord, text)) % len(states)]
    d["keywords"] = [text[:4]]
    return d


def expected_state(text: str) -> str:
    return good_item(text)["sentiment_state"]


class FakeBackend:
    """Answers each prompt with `respond(items, call_no, request_no)`; items = [(id, text), ...]."""

    name = "fake"

    def __init__(self, respond):
        self.respond = respond
        self.stats = BackendStats()
        self.prompts: list[str] = []
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        out = []
        for j, r in enumerate(requests):
            assert r.params.temperature == 0.0
            self.prompts.append(r.prompt)
            items = [(i, json.loads(t)) for i, t in _ITEM_RE.findall(r.prompt)]
            out.append(
                Completion(text=self.respond(items, self.calls, j), prompt_tokens=1, generated_tokens=1)
            )
        return out

    def score(self, prompts, continuations):
        raise NotImplementedError

    def describe(self):
        return {"name": self.name}


def answer(items, mutate=None) -> str:
    obj = {i: good_item(t) for i, t in items}
    if mutate:
        mutate(obj, items)
    return json.dumps(obj, ensure_ascii=False)


TEXTS = [f"评论{k}：这件事太离谱了{'!' * k}" for k in range(12)]


def check_aligned(texts, out):
    for t, al in zip(texts, out, strict=True):
        if al is not None:
            assert al.labels["sentiment_state"] == expected_state(t), t
            assert al.keywords == [t[:4]]


def test_happy_path_batches_of_five():
    be = FakeBackend(lambda items, c, j: answer(items))
    lab = LLMLabeler(be, batch_size=5)
    assert isinstance(lab, Labeler) and lab.name == "llm"
    out = lab.label(TEXTS)
    assert all(o is not None for o in out)
    check_aligned(TEXTS, out)
    assert be.calls == 1 and len(be.prompts) == 3  # 12 texts -> 5 + 5 + 2
    assert [len(_ITEM_RE.findall(p)) for p in be.prompts] == [5, 5, 2]


def test_plain_reposts_need_no_call_and_duplicates_are_asked_once():
    be = FakeBackend(lambda items, c, j: answer(items))
    out = LLMLabeler(be).label(["", "转发微博", "Repost", "同一句", "同一句"])
    assert [o.labels for o in out[:3]] == [PLAIN_REPOST_LABELS] * 3
    assert len(be.prompts) == 1 and len(_ITEM_RE.findall(be.prompts[0])) == 1
    assert out[3] == out[4] and out[3] is not out[4]


def test_missing_item_is_retried_alone_and_never_shifted():
    def respond(items, call, j):
        if call == 1:  # drop the middle item of the first batch: the paper's code shifted labels here
            return answer(items, lambda o, it: o.pop(it[2][0]) if j == 0 else None)
        return answer(items)

    be = FakeBackend(respond)
    out = LLMLabeler(be).label(TEXTS[:5])
    check_aligned(TEXTS[:5], out)
    assert all(o is not None for o in out)
    assert be.calls == 2
    retry_items = _ITEM_RE.findall(be.prompts[-1])
    assert len(retry_items) == 1 and json.loads(retry_items[0][1]) == TEXTS[2]


def test_positional_list_without_ids_is_rejected():
    """An answer that drops the ids (a bare list) cannot be aligned: unlabelled, not guessed."""
    be = FakeBackend(lambda items, c, j: json.dumps([good_item(t) for _, t in items]))
    out = LLMLabeler(be, retries=1).label(TEXTS[:3])
    assert out == [None, None, None]
    assert be.calls == 2


def test_list_with_ids_is_accepted():
    be = FakeBackend(lambda items, c, j: json.dumps([{"id": i, **good_item(t)} for i, t in items]))
    out = LLMLabeler(be).label(TEXTS[:3])
    check_aligned(TEXTS[:3], out)
    assert all(o is not None for o in out)


def test_wrong_ids_are_ignored():
    def respond(items, call, j):
        if call == 1:  # ids off by one (t1..t4 instead of t0..t3) plus an id never asked for
            return json.dumps({f"t{int(i[1:]) + 1}": good_item(t) for i, t in items} | {"x9": good_item("?")})
        return answer(items)

    be = FakeBackend(respond)
    texts = TEXTS[:4]
    out = LLMLabeler(be, batch_size=5).label(texts)
    # t4 and x9 were not asked: ignored. t0 got no answer: asked again, alone, and labelled correctly.
    assert be.calls == 2
    assert [json.loads(t) for _, t in _ITEM_RE.findall(be.prompts[-1])] == [texts[0]]
    assert out[0] is not None and out[0].labels["sentiment_state"] == expected_state(texts[0])
    assert all(o is not None for o in out)


def test_bad_categories_and_partial_items_are_retried():
    def respond(items, call, j):
        def mutate(o, it):
            if call == 1:
                o[it[0][0]]["stance"] = "agree"  # not a category
                del o[it[1][0]]["intent"]  # missing dimension
                o[it[2][0]]["keywords"] = "城管，暴力"  # a string: accepted as a list
                o[it[3][0]]["rumor"] = " Counter "  # case / whitespace: normalised

        return answer(items, mutate)

    be = FakeBackend(respond)
    out = LLMLabeler(be).label(TEXTS[:4])
    assert all(o is not None for o in out)
    assert out[2].keywords == ["城管", "暴力"]
    assert out[3].labels["rumor"] == "counter"
    assert len(_ITEM_RE.findall(be.prompts[-1])) == 2  # only the two bad items were asked again


@pytest.mark.parametrize(
    "reply",
    [
        "I'm sorry, but I can't classify these comments.",
        "Sure! Here are the labels: the first one is angry, the second one is calm.",
        "{not json at all",
        "",
        "[]",
        "null",
        '{"t0": "angry"}',
    ],
)
def test_garbage_is_unlabelled_after_retries(reply):
    be = FakeBackend(lambda items, c, j: reply)
    out = LLMLabeler(be, retries=3).label(TEXTS[:2] + ["", "转发微博"])
    assert out[:2] == [None, None]
    assert out[2].labels == PLAIN_REPOST_LABELS and out[3].labels == PLAIN_REPOST_LABELS
    assert be.calls == 4  # 1 try + 3 retries


def test_fenced_and_wrapped_json():
    def respond(items, call, j):
        body = answer(items)
        return (
            "好的，结果如下：\n```json\n"
            + json.dumps({"results": json.loads(body)}, ensure_ascii=False)
            + "\n```"
        )

    out = LLMLabeler(FakeBackend(respond)).label(TEXTS[:3])
    check_aligned(TEXTS[:3], out)
    assert all(o is not None for o in out)


def test_recovers_on_a_later_retry():
    be = FakeBackend(lambda items, c, j: "oops" if c < 3 else answer(items))
    out = LLMLabeler(be, retries=3).label(TEXTS[:7])
    assert all(o is not None for o in out)
    check_aligned(TEXTS[:7], out)
    assert be.calls == 3


def test_backend_error_propagates_and_protocol_is_checked():
    class Down(FakeBackend):
        def generate(self, requests):
            raise BackendError("unreachable", "connection refused")

    with pytest.raises(BackendError):
        LLMLabeler(Down(lambda *a: "")).label(["hello"])

    class Short(FakeBackend):
        def generate(self, requests):
            return super().generate(requests)[:-1]

    with pytest.raises(BackendError):
        LLMLabeler(Short(lambda items, c, j: answer(items))).label(TEXTS[:7])


def test_config_validation():
    be = FakeBackend(lambda *a: "")
    with pytest.raises(ConfigError):
        LLMLabeler(be, batch_size=0)
    with pytest.raises(ConfigError):
        LLMLabeler(be, retries=-1)
    with pytest.raises(ConfigError):
        LLMLabeler(be, lang="fr")


def test_prompts_are_data_and_list_every_category():
    for lang in ("zh", "en"):
        t = template("labeler", lang)
        for dim, cats in DIMENSIONS.items():
            assert dim in t
            for c in cats:
                assert c in t, (lang, dim, c)
        be = FakeBackend(lambda items, c, j: answer(items))
        lab = LLMLabeler(be, lang=lang)
        lab.label(['带"引号"的\n文本 {x}'])
        assert 't0: "带\\"引号\\"的\\n文本 {x}"' in be.prompts[0]
    assert LLMLabeler(be, lang="zh").version != LLMLabeler(be, lang="en").version


def test_only_labelled_actions_are_cached(tmp_path):
    be = FakeBackend(lambda items, c, j: answer(items, lambda o, it: o.pop(it[0][0])))
    with CachedLabeler(LLMLabeler(be, retries=0), tmp_path / "l.sqlite") as c:
        out = c.label(TEXTS[:3])
        assert out[0] is None and out[1] is not None and out[2] is not None
        assert c.cache.count() == 2


def test_parse_helpers():
    assert extract_json('blah {"a": 1} blah') == {"a": 1}
    assert extract_json("no json") is None
    assert parse_answer('{"t0": {"rumor": "spread"}}', ["t0"]) == {}
