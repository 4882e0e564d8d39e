"""The offline, deterministic Chinese labeler ("rules").

Labels a Weibo action on the 8 categorical dimensions (see ``dimensions.DIMENSIONS``) plus keywords with
hand-written lexicons (``lexicons/*.txt``, one file per tag) and a fixed precedence of rules, documented
in docs/labels.md. No model, no network: the same text always gets the same labels, fast enough for
millions of actions (a longest-match scan over a term table plus a memo of frequent texts).

Text handling, in order:
1. ``回复@name:`` (reply prefix) is dropped; the action's own text is what comes before the first ``//@``
   (the rest is the repost chain: other people's words, ignored).
2. URLs and ``@mentions`` are removed from the own text (mentions are counted: tagging someone is promotion).
3. An own text that is then empty, or only repost markers (``转发微博``, ``Repost``...) and punctuation, is a
   plain repost and gets ``PLAIN_REPOST_LABELS``.
4. Otherwise the text is scanned for lexicon terms and the rules in :meth:`RulesLabeler.label_one` decide.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from functools import cache
from importlib import resources

import jieba

from mfllm.labels.base import ActionLabels
from mfllm.labels.dimensions import PLAIN_REPOST_LABELS

# Tags = lexicon file names (without .txt) that the scanner looks for.
TAGS: tuple[str, ...] = (
    "angry", "sad", "fear", "surprise", "happy",
    "positive", "negative",
    "support", "oppose",
    "counter", "affirm", "doubt",
    "question", "rhetorical", "promotion",
    "subjective", "objective",
    "repost", "mask",
)  # fmt: skip
EMOTIONS: tuple[str, ...] = ("angry", "sad", "fear", "surprise", "happy")  # tie-break order
NEGATIVE_EMOTIONS = ("angry", "sad", "fear")

MAX_KEYWORDS = 8
_MEMO_LIMIT = 50_000  # texts; cleared when full. ~1.3 kB each: a simulation labels mostly unique texts

_REPLY_RE = re.compile(r"^\s*(?:回复|回覆|reply)\s*@[^:：\s]{1,40}\s*[:：]", re.IGNORECASE)
_URL_RE = re.compile(r"(?:https?|ftp)[:：]\S*|www\.\S+|t\.cn/\S*", re.IGNORECASE)
_MENTION_RE = re.compile(r"@[\w\u4e00-\u9fff\-·]{1,30}")
_HASHTAG_RE = re.compile(r"#([^#\s]{1,30})#")
_EMOTICON_RE = re.compile(r"\[[^\[\]\s]{1,8}\]")
_PUNCT_RE = re.compile(r"[\s\W_]+", re.UNICODE)  # everything but letters/digits/CJK
_CJK_RUN_RE = re.compile(r"[\u4e00-\u9fff]+")
_LATIN_RE = re.compile(r"[a-z][a-z0-9]{2,19}")


@cache
def _segmenter() -> jieba.Tokenizer:
    """One jieba tokenizer of its own (the global one is left to the user's code); its dictionary
    loads on first use (about a second, then cached by jieba in the temp folder)."""
    jieba.setLogLevel(logging.WARNING)  # jieba logs "Building prefix dict..." at DEBUG to stderr
    return jieba.Tokenizer()


_shared: RulesLabeler | None = None


def is_plain_repost(text: str | None) -> bool:
    """Module-level :meth:`RulesLabeler.is_plain` (one shared labeler, built on first use)."""
    global _shared
    if _shared is None:
        _shared = RulesLabeler()
    return _shared.is_plain(text)


def _read_lexicon(name: str) -> list[str]:
    path = resources.files("mfllm.labels").joinpath("lexicons", f"{name}.txt")
    terms = []
    for line in path.read_text(encoding="utf-8").splitlines():
        t = line.strip().lower()
        if t and not t.startswith("#"):
            terms.append(t)
    return terms


class RulesLabeler:
    """Deterministic lexicon + rules labeler. ``label_one`` is the fast single-text entry point."""

    name = "rules"
    version = "4"  # 4: keywords cut by jieba's dictionary (3 glued bigrams)

    def __init__(self) -> None:
        table: dict[str, set[str]] = {}
        for tag in TAGS:
            for term in _read_lexicon(tag):
                table.setdefault(term, set()).add(tag)
        self._table: dict[str, frozenset[str]] = {t: frozenset(v) for t, v in table.items()}
        self._maxlen = max(map(len, self._table))
        lens: dict[str, set[int]] = {}
        for t in self._table:
            lens.setdefault(t[0], set()).add(len(t))
        self._lens: dict[str, tuple[int, ...]] = {
            ch: tuple(sorted(v, reverse=True)) for ch, v in lens.items()
        }
        self._repost_terms = frozenset(t for t, v in self._table.items() if "repost" in v)
        self._stop = frozenset(_read_lexicon("stopwords"))
        self._memo: dict[str, ActionLabels] = {}

    # ------------------------------------------------------------------ public API
    def label(self, texts: list[str]) -> list[ActionLabels | None]:
        return [self.label_one(t) for t in texts]

    def label_one(self, text: str | None) -> ActionLabels:
        text = text or ""
        hit = self._memo.get(text)
        if hit is None:
            hit = self._label(text)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[text] = hit
        return ActionLabels(labels=dict(hit.labels), keywords=list(hit.keywords))

    def is_plain(self, text: str | None) -> bool:
        """True for a plain repost: no own words once the reply prefix, repost chain, URLs, @mentions
        and #hashtags# are removed, or only repost markers (``转发微博``, ``Repost``, ``[转发]``...)."""
        own = _URL_RE.sub(" ", self.own_text(text or "").lower())
        return self._is_plain(_MENTION_RE.sub(" ", own).strip())

    # ------------------------------------------------------------------ internals
    @staticmethod
    def own_text(text: str) -> str:
        """The action's own words: reply prefix dropped, repost chain (after ``//@``) cut off."""
        t = _REPLY_RE.sub("", text, count=1)
        cut = t.find("//@")
        if cut >= 0:
            t = t[:cut]
        return t.strip()

    def scan(self, text: str) -> defaultdict[str, int]:
        """Per tag, the number of DISTINCT lexicon terms found in ``text`` (lower-cased), longest match
        first, left to right ("[蜡烛][蜡烛][蜡烛]" counts once: repetition is emphasis, not more evidence)."""
        counts: defaultdict[str, int] = defaultdict(int)
        seen: set[str] = set()
        table, lens = self._table, self._lens
        n = len(text)
        i = 0
        while i < n:
            ks = lens.get(text[i])
            if ks is None:
                i += 1
                continue
            for k in ks:  # term lengths starting with this character, longest first
                term = text[i : i + k]
                tags = table.get(term)
                if tags is not None:
                    if term not in seen:
                        seen.add(term)
                        for tag in tags:
                            counts[tag] += 1
                    i += k
                    break
            else:
                i += 1
        return counts

    def _is_plain(self, content: str) -> bool:
        """Empty own text, or only repost markers / #hashtags# (punctuation aside). Text made only of
        punctuation (``……``, ``=-=``) is a (content-free) comment, not a plain repost."""
        if not content.strip():
            return True
        rest = _PUNCT_RE.sub("", _HASHTAG_RE.sub(" ", content))
        if not rest:
            return bool(_HASHTAG_RE.search(content))
        if rest in self._repost_terms:
            return True
        for term in self._repost_terms:  # e.g. "转发微博转发微博"
            rest = rest.replace(term, "")
        return not rest

    def _label(self, text: str) -> ActionLabels:
        own = self.own_text(text).lower()
        own = _URL_RE.sub(" ", own)
        n_mentions = len(_MENTION_RE.findall(own))
        content = _MENTION_RE.sub(" ", own).strip()
        if self._is_plain(content):
            return ActionLabels(labels=dict(PLAIN_REPOST_LABELS), keywords=self.keywords(content))

        c = self.scan(content)
        emo = {e: c[e] for e in EMOTIONS if c[e]}
        n_emo = sum(emo.values())
        words = _PUNCT_RE.sub("", _EMOTICON_RE.sub(" ", content))  # letters/digits/CJK, emoticons out
        exclaim = "!" in content or "！" in content
        # A question that also shouts or is angry is rhetorical (an opinion), not a request for an answer.
        question = c["question"] > 0 and c["rhetorical"] == 0 and not (exclaim or c["angry"] > 0)
        promotion = c["promotion"] > 0 or (n_mentions > 0 and len(words) <= 6)
        counter = c["counter"] > c["affirm"]
        doubt = c["doubt"] > 0 or counter

        labels: dict[str, str] = {}
        labels["rumor"] = "counter" if counter else "spread"

        # sentiment_state: the most frequent emotion (ties: EMOTIONS order), else calm.
        state = "calm"
        if emo:
            state = max(EMOTIONS, key=lambda e: (emo.get(e, 0), -EMOTIONS.index(e)))
        labels["sentiment_state"] = state

        pos = c["positive"] + c["happy"]
        neg = c["negative"] + sum(c[e] for e in NEGATIVE_EMOTIONS)
        if pos > neg:
            tendency = "positive"
        elif neg > pos:
            tendency = "negative"
        elif state == "happy":
            tendency = "positive"
        elif state in NEGATIVE_EMOTIONS or counter:
            tendency = "negative"
        else:
            tendency = "neutral"
        labels["sentiment_tendency"] = tendency

        share_only = words != "" and c["promotion"] > 0 and self._only_terms(words, ("promotion", "repost"))
        labels["behavior_type"] = "share" if share_only else "comment"

        if counter or c["oppose"] > c["support"]:
            stance = "oppose"
        elif c["support"] > 0 or c["affirm"] > 0 or promotion:
            stance = "support"
        elif question or doubt:
            stance = "neutral"
        elif n_emo > c["surprise"] or (words and not c["surprise"]):
            # a reaction that does not dispute the post goes along with it
            stance = "support"
        else:
            stance = "neutral"
        labels["stance"] = stance

        labels["belief_degree"] = "doubt" if doubt else "believe"

        subjective = (
            n_emo > 0
            or c["subjective"] > 0
            or c["positive"] > 0
            or c["negative"] > 0
            or c["support"] > 0
            or c["oppose"] > 0
            or c["rhetorical"] > 0
            or _EMOTICON_RE.search(content) is not None
        )
        if not subjective and (c["objective"] > 0 or share_only):
            labels["subjectivity"] = "objective"
        else:
            labels["subjectivity"] = "subjective"

        if question:
            intent = "question"
        elif promotion:
            intent = "promotion"
        else:
            intent = "opinion"
        labels["intent"] = intent
        return ActionLabels(labels=labels, keywords=self.keywords(content))

    def _only_terms(self, words: str, tags: tuple[str, ...]) -> bool:
        """True when ``words`` (punctuation already removed) splits entirely into terms carrying one of
        ``tags`` (any split, not only the greedy one: "火速转起来" = "火速" + "转起来")."""
        n = len(words)
        ok = [False] * (n + 1)
        ok[0] = True
        for i in range(n):
            if not ok[i]:
                continue
            for k in range(1, min(self._maxlen, n - i) + 1):
                tg = self._table.get(words[i : i + k])
                if tg is not None and any(t in tg for t in tags):
                    ok[i + k] = True
        return ok[n]

    def keywords(self, content: str) -> list[str]:
        """Deterministic keywords, first ``MAX_KEYWORDS`` in text order: #hashtags#, then the words of the
        rest as jieba's dictionary cuts them (no HMM guessing of unknown words: those guesses were
        fragments such as 雨污, 贵性) that are CJK words of 2+ characters or Latin words of 3+ letters.
        Characters the dictionary cannot join into a word are left out rather than glued into bigrams
        (the old bigrams gave 示洗, 迟放). Stopwords (lexicons/stopwords.txt) are never keywords."""
        out: list[str] = []
        seen: set[str] = set()
        stop = self._stop

        def add(w: str) -> None:
            if w not in seen and w not in stop:
                seen.add(w)
                out.append(w)

        for tag in _HASHTAG_RE.findall(content):
            add(tag.strip())
        body = _EMOTICON_RE.sub(" ", _HASHTAG_RE.sub(" ", content))
        for w in _segmenter().lcut(body, HMM=False):
            if len(out) >= MAX_KEYWORDS:
                break
            if (len(w) >= 2 and _CJK_RUN_RE.fullmatch(w)) or _LATIN_RE.fullmatch(w):
                add(w)
        return out[:MAX_KEYWORDS]
