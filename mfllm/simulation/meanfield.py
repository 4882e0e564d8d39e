"""Mean-field models: update m_t from m_{t-1} and the step's (state, action) pairs.

- ``stats``: a deterministic text summary (no LLM): exponentially decayed label shares of the
  actions so far (rules labeler), top keywords and a few example comments. Cheap, so a setup with a
  small model or no LLM can still run MF, and it is what mfllm-mini was trained to read.
- ``stats-compact``: the same statistics written as label-share tokens (what a decide model reads);
  ``stats-compact8`` adds sentiment and subjectivity shares (what an 8-dimension decide model reads).
- ``llm``: the paper's summariser: an LLM writes m_t (about 200 characters, six aspects) from
  m_{t-1} and the step's pairs, through any backend (adapter "meanfield" where LoRA is loaded).

A MeanFieldState is JSON-serialisable so a run can resume exactly where it stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mfllm.backends.base import Backend, GenerationRequest, SamplingParams
from mfllm.errors import BackendError, ConfigError
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.labels.rules import RulesLabeler
from mfllm.prompts.templates import EXAMPLE_CHARS, ITEM_CHARS, clip, meanfield_prompt, strings, template
from mfllm.seeds import derive_seed


@dataclass(slots=True)
class MeanFieldState:
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "data": self.data}

    @classmethod
    def from_dict(cls, d: dict) -> MeanFieldState:
        return cls(text=d["text"], data=d.get("data", {}))


@dataclass(slots=True)
class MeanFieldUpdate:
    """One event's update request for this step."""

    event_text: str
    previous: MeanFieldState
    pairs: list[tuple[str, str]]  # (agent state text, action text); "" = plain repost
    seed: int = 0
    # per pair, labels the action declared itself (a decide policy's header), or None: a stats mean field
    # counts these instead of its labeler's reading of the text, for the dimensions they name
    decisions: list[dict[str, str] | None] | None = None


class MeanFieldModel(ABC):
    name: str = "base"

    def initial(self, lang: str = "zh") -> MeanFieldState:
        return MeanFieldState(text=strings(lang)["empty_meanfield"])

    @abstractmethod
    def update_many(self, updates: list[MeanFieldUpdate]) -> list[MeanFieldState]:
        """One new state per update, in order (batched across events)."""

    def describe(self) -> dict:
        return {"name": self.name}


def _pct(x: float) -> int:
    return int(round(100 * x))


class StatsMeanField(MeanFieldModel):
    name = "stats"

    def __init__(self, lang: str = "zh", decay: float = 0.8, n_keywords: int = 5, n_examples: int = 2, labeler=None):
        if not 0.0 <= decay <= 1.0:
            raise ConfigError("decay must be in [0, 1]", field="meanfield.decay")
        if labeler is None:
            labeler = RulesLabeler()
        self.labeler, self.lang, self.decay = labeler, lang, decay
        self.n_keywords, self.n_examples = n_keywords, n_examples

    def describe(self) -> dict:
        return {"name": self.name, "decay": self.decay, "labeler": f"{self.labeler.name}-{self.labeler.version}"}

    def update_many(self, updates: list[MeanFieldUpdate]) -> list[MeanFieldState]:
        texts = [a for u in updates for _, a in u.pairs]
        labels = iter(self.labeler.label(texts))
        out = []
        for u in updates:
            decided = u.decisions or [None] * len(u.pairs)
            out.append(self._update(u.previous, [(a, next(labels), dec) for (_, a), dec in
                                                 zip(u.pairs, decided, strict=True)]))
        return out

    def _update(self, prev: MeanFieldState, labelled: list) -> MeanFieldState:
        d = prev.data
        counts = {dim: {c: self.decay * d.get("counts", {}).get(dim, {}).get(c, 0.0) for c in cats}
                  for dim, cats in DIMENSIONS.items()}
        kw = Counter({k: self.decay * v for k, v in d.get("keywords", {}).items()})
        examples = list(d.get("examples", []))
        for text, lab, decided in labelled:
            if lab is None:
                continue
            said = {d: c for d, c in (decided or {}).items() if c in counts.get(d, {})}  # a bad label: the text's
            for dim, cat in {**lab.labels, **said}.items():
                if dim in counts and cat in counts[dim]:
                    counts[dim][cat] += 1.0
            kw.update(lab.keywords)
            if text.strip():
                examples.append(clip(text, EXAMPLE_CHARS))
        examples = examples[-self.n_examples:]
        kw = Counter(dict(kw.most_common(50)))  # bounded memory
        data = {"n": d.get("n", 0) + len(labelled), "counts": counts, "keywords": dict(kw), "examples": examples}
        return MeanFieldState(text=self.render(data), data=data)

    def render(self, data: dict) -> str:
        s = strings(self.lang)
        if data["n"] == 0:
            return s["empty_meanfield"]
        share = {}
        for dim, cats in data["counts"].items():
            tot = sum(cats.values()) or 1.0
            share[dim] = {c: v / tot for c, v in cats.items()}
        emo = sorted(share["sentiment_state"].items(), key=lambda kv: -kv[1])[:3]
        q = s["quote_open"], s["quote_close"]
        return template("stats_meanfield", self.lang).format(
            n=data["n"],
            share=_pct(share["behavior_type"]["share"]),
            comment=_pct(share["behavior_type"]["comment"]),
            support=_pct(share["stance"]["support"]),
            oppose=_pct(share["stance"]["oppose"]),
            neutral=_pct(share["stance"]["neutral"]),
            believe=_pct(share["belief_degree"]["believe"]),
            doubt=_pct(share["belief_degree"]["doubt"]),
            counter=_pct(share["rumor"]["counter"]),
            emotions="".join(f"{s['emotions'][e]}{_pct(v)}%" for e, v in emo),
            question=_pct(share["intent"]["question"]),
            opinion=_pct(share["intent"]["opinion"]),
            keywords=s["list_sep"].join(k for k, _ in Counter(data["keywords"]).most_common(self.n_keywords)) or s["none"],
            examples="".join(f"{q[0]}{e}{q[1]}" for e in data["examples"]) or s["none"],
        )


# stats-compact: template field -> (dimension, category)
COMPACT_FIELDS = {"share": ("behavior_type", "share"), "comment": ("behavior_type", "comment"),
                  "support": ("stance", "support"), "oppose": ("stance", "oppose"), "neutral": ("stance", "neutral"),
                  "believe": ("belief_degree", "believe"), "doubt": ("belief_degree", "doubt"),
                  "counter": ("rumor", "counter"),
                  **{e: ("sentiment_state", e) for e in DIMENSIONS["sentiment_state"]},
                  "positive": ("sentiment_tendency", "positive"), "negative": ("sentiment_tendency", "negative"),
                  "tneutral": ("sentiment_tendency", "neutral"),
                  "subjective": ("subjectivity", "subjective"), "objective": ("subjectivity", "objective"),
                  "question": ("intent", "question"), "opinion": ("intent", "opinion")}


class CompactStatsMeanField(StatsMeanField):
    """The ``stats`` mean field written as label-share tokens, with the characters a decide policy writes in its
    decision header (``prompts/<lang>/decision.json``), e.g. ``已有64人：转39评61|支50反10中40|...``. Same state
    and update as ``stats``; a small model reads these shares better than the prose (issue 14: context gain
    0.192 against 0.125 at the same budget)."""

    name = "stats-compact"
    template_name = "stats_meanfield_compact"  # a template may leave COMPACT_FIELDS out, never add one

    def render(self, data: dict) -> str:
        s = strings(self.lang)
        if data["n"] == 0:
            return s["empty_meanfield"]
        share = {}
        for dim, cats in DIMENSIONS.items():
            counts = data["counts"].get(dim, {})
            tot = sum(counts.values()) or 1.0
            share[dim] = {c: _pct(counts.get(c, 0.0) / tot) for c in cats}
        fields = {f: share[dim][cat] for f, (dim, cat) in COMPACT_FIELDS.items()}
        q = s["quote_open"], s["quote_close"]
        return template(self.template_name, self.lang).format(
            n=data["n"],
            keywords=s["list_sep"].join(k for k, _ in Counter(data["keywords"]).most_common(self.n_keywords)) or s["none"],
            examples="".join(f"{q[0]}{e}{q[1]}" for e in data["examples"]) or s["none"],
            **fields,
        )


class FullCompactStatsMeanField(CompactStatsMeanField):
    """``stats-compact`` with the shares of sentiment and subjectivity too: what a decide model whose header
    names all eight label dimensions reads (every dimension it decides, the crowd's share beside it)."""

    name = "stats-compact8"
    template_name = "stats_meanfield_compact8"


def compact_meanfield(dims: tuple[str, ...], lang: str = "zh", **options) -> CompactStatsMeanField:
    """The compact mean field a decide model with header dimensions `dims` reads: stats-compact8 when the header
    decides sentiment or subjectivity, the two dimensions whose shares stats-compact leaves out."""
    full = bool({"sentiment_tendency", "subjectivity"} & set(dims))
    return (FullCompactStatsMeanField if full else CompactStatsMeanField)(lang=lang, **options)


# Where a prompt does not fit a small model's context (mfllm-mini: 320 tokens), the replies and m_{t-1}
# are shown shorter, step by step, per request (so batching never changes a prompt): (item_chars, previous_chars).
SHORTER = ((ITEM_CHARS, None), (20, 160), (12, 80), (6, 40))


def fit_meanfield_prompt(update: MeanFieldUpdate, lang: str, encode, limit: int, min_new: int) -> tuple[str, int | None]:
    """The summariser's prompt for `update`, shortened (SHORTER) until it leaves `min_new` tokens of a `limit`-token
    context; and the level used (0: as is), None where even the shortest does not fit (that prompt is returned).
    No `limit` or `encode`: the full prompt. The one copy of this rule: LLMMeanField and the decide trainer's
    summariser replay (mfllm.training.decide.data) both call it, so training sees the prompts inference builds."""
    prompt = meanfield_prompt(update.event_text, update.previous.text, update.pairs, lang)
    if not limit or encode is None:
        return prompt, 0
    room = limit - min_new
    for level, (items, prev) in enumerate(SHORTER):
        if level:
            prompt = meanfield_prompt(update.event_text, update.previous.text, update.pairs, lang, items, prev)
        if len(encode([prompt])[0]) <= room:
            return prompt, level
    return prompt, None  # still too long: the backend refuses it with a clear error


class LLMMeanField(MeanFieldModel):
    """The paper's summariser, through any backend. An empty summary is retried with a new seed, then fails."""

    name = "llm"
    MAX_NEW_TOKENS = 160  # default summary budget (the decide trainer caps its summariser targets at it)
    MIN_NEW_TOKENS = 16  # room a shortened prompt leaves for the summary

    def __init__(self, backend: Backend, lang: str = "zh", params: SamplingParams | None = None,
                 adapter: str | None = None, retries: int = 2, max_new_tokens: int = MAX_NEW_TOKENS):
        self.backend, self.lang, self.adapter, self.retries = backend, lang, adapter, retries
        self.shortened = 0  # prompts shown with shorter replies / m_{t-1} to fit the context
        self.params = params or SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens,
                                               stop=("\n",))

    def describe(self) -> dict:
        return {"name": self.name, "adapter": self.adapter, "max_new_tokens": self.params.max_new_tokens}

    def _prompt(self, u: MeanFieldUpdate) -> str:
        prompt, level = fit_meanfield_prompt(u, self.lang, getattr(self.backend, "encode", None),
                                             getattr(self.backend, "max_context", 0),
                                             min(self.MIN_NEW_TOKENS, self.params.max_new_tokens))
        self.shortened += bool(level)
        return prompt

    def update_many(self, updates: list[MeanFieldUpdate]) -> list[MeanFieldState]:
        prompts = [self._prompt(u) for u in updates]
        out: list[MeanFieldState | None] = [None] * len(updates)
        todo = list(range(len(updates)))
        for attempt in range(self.retries + 1):
            # a retry draws anew; the first try keeps the step's own seed
            reqs = [GenerationRequest(prompts[i], seed=updates[i].seed if attempt == 0 else
                                      derive_seed(updates[i].seed, "retry", attempt),
                                      params=self.params, adapter=self.adapter) for i in todo]
            comps = self.backend.generate(reqs)
            for i, c in zip(todo, comps, strict=True):
                text = " ".join(c.text.split())
                if text:
                    out[i] = MeanFieldState(text=text, data={"n": updates[i].previous.data.get("n", 0) + len(updates[i].pairs)})
            todo = [i for i in todo if out[i] is None]
            if not todo:
                return out  # type: ignore[return-value]
        raise BackendError("empty", f"the mean-field model returned an empty summary {self.retries + 1} times")


def make_meanfield(name: str, lang: str = "zh", backend: Backend | None = None, **options) -> MeanFieldModel:
    if name == "stats":
        return StatsMeanField(lang=lang, **options)
    if name == "stats-compact":
        return CompactStatsMeanField(lang=lang, **options)
    if name == "stats-compact8":
        return FullCompactStatsMeanField(lang=lang, **options)
    if name == "llm":
        if backend is None:
            raise ConfigError("the llm mean field needs a backend", field="meanfield")
        return LLMMeanField(backend, lang=lang, **options)
    raise ConfigError(f"unknown mean-field model {name!r}; choose stats, stats-compact, stats-compact8 or llm", field="meanfield")
