"""The paper's LLM judge as a labeler: ``LLMLabeler(backend, batch_size=5, retries=3, lang="zh")``.

Greedy decoding (temperature 0), ``batch_size`` actions per call, a JSON answer, through any
``mfllm.backends.base.Backend``. The prompt is data: ``mfllm/prompts/{zh,en}/labeler.txt``.

Alignment is by id, never by position: each action of a call gets an id (``t<k>``, ``k`` = its index
among this ``label()`` call's distinct texts), the answer must be a JSON object keyed by those ids, and
every item is validated against the schema (pydantic: each dimension one of its allowed categories,
keywords a list of strings). Items that are missing, malformed, under a wrong id or with a category
outside the schema are asked again, and only those, up to ``retries`` more rounds. After that an action
is unlabelled (None): never guessed, and never shifted onto a neighbour's labels (the paper's code
silently misaligned a whole batch when one answer was missing).

Plain reposts (empty text or only ``转发微博``/``Repost``) get ``PLAIN_REPOST_LABELS`` without a call.
A backend failure (``BackendError``, raised after the backend's own retries) propagates: an unreachable
judge is a configuration problem, not a labelling answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, create_model, field_validator

from mfllm.backends.base import Backend, GenerationRequest, SamplingParams
from mfllm.errors import BackendError, ConfigError
from mfllm.labels.base import ActionLabels
from mfllm.labels.dimensions import DIMENSIONS, PLAIN_REPOST_LABELS
from mfllm.labels.rules import MAX_KEYWORDS, is_plain_repost
from mfllm.prompts.templates import template

TEXT_CHARS = 280  # one action as shown to the judge (a Weibo post is at most 140 characters)
KEYWORD_CHARS = 20


class _ItemBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    keywords: list[str] = []

    @field_validator("keywords", mode="before")
    @classmethod
    def _keywords(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):  # "a, b" instead of ["a", "b"]
            v = [w for w in re.split(r"[,，、;；\s]+", v) if w]
        return v


# One field per categorical dimension, restricted to its categories.
LabelItem: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "LabelItem",
    __base__=_ItemBase,
    **{dim: (Literal[cats], ...) for dim, cats in DIMENSIONS.items()},
)


def _normalise_item(raw: Any) -> Any:
    """Lower-case / strip category strings; merge a nested {"labels": {...}} into the item."""
    if not isinstance(raw, dict):
        return raw
    item = dict(raw)
    nested = item.pop("labels", None)
    if isinstance(nested, dict):
        item = {**nested, **item}
    for dim in DIMENSIONS:
        v = item.get(dim)
        if isinstance(v, str):
            item[dim] = v.strip().lower()
    return item


def parse_item(raw: Any) -> ActionLabels | None:
    """One answer item -> ActionLabels, or None if it does not fit the schema."""
    try:
        m = LabelItem.model_validate(_normalise_item(raw))
    except ValidationError:
        return None
    kws: list[str] = []
    for w in m.keywords:  # type: ignore[attr-defined]
        w = str(w).strip()
        if w and w not in kws:
            kws.append(w[:KEYWORD_CHARS])
    return ActionLabels(labels={d: getattr(m, d) for d in DIMENSIONS}, keywords=kws[:MAX_KEYWORDS])


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(text: str) -> Any:
    """The JSON value in a completion (bare, in a ``` fence, or the outermost {...}); None if none."""
    t = text.strip()
    m = _FENCE_RE.search(t)
    candidates = [m.group(1).strip()] if m else []
    candidates.append(t)
    a, b = t.find("{"), t.rfind("}")
    if 0 <= a < b:
        candidates.append(t[a : b + 1])
    for c in candidates:
        try:
            return json.loads(c)
        except (ValueError, RecursionError):
            continue
    return None


def parse_answer(text: str, ids: list[str]) -> dict[str, ActionLabels]:
    """The valid items of one answer, by id; ids not asked for are ignored."""
    obj = extract_json(text)
    if isinstance(obj, list):  # [{"id": "t0", ...}, ...]
        obj = {str(x.get("id")): x for x in obj if isinstance(x, dict) and "id" in x}
    if isinstance(obj, dict) and len(obj) == 1:  # {"results": {...}} / {"labels": {...}}
        ((key, inner),) = obj.items()
        if key not in ids and isinstance(inner, dict | list):
            return parse_answer(json.dumps(inner, ensure_ascii=False), ids)
    if not isinstance(obj, dict):
        return {}
    wanted = set(ids)
    out: dict[str, ActionLabels] = {}
    for k, v in obj.items():
        k = str(k).strip()
        if k in wanted:
            al = parse_item(v)
            if al is not None:
                out[k] = al
    return out


class LLMLabeler:
    """The LLM judge. ``label(texts)`` returns one ActionLabels or None (unlabelled) per text, in order."""

    name = "llm"

    def __init__(
        self,
        backend: Backend,
        batch_size: int = 5,
        retries: int = 3,
        lang: str = "zh",
        max_new_tokens_per_item: int = 160,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1", field="labeler.batch_size")
        if retries < 0:
            raise ConfigError("retries must be >= 0", field="labeler.retries")
        self.backend = backend
        self.batch_size, self.retries, self.lang = batch_size, retries, lang
        self.max_new_tokens_per_item, self.seed = max_new_tokens_per_item, seed
        self.template = template("labeler", lang)  # raises ConfigError for an unknown language
        try:
            described = json.dumps(backend.describe(), sort_keys=True, ensure_ascii=False, default=str)
        except Exception:  # a backend without a usable describe() still labels; it just shares a version
            described = str(getattr(backend, "name", "?"))
        digest = hashlib.sha256((self.template + "\0" + described).encode("utf-8")).hexdigest()[:10]
        # The version changes with the prompt and the judge model, so a cache never mixes judges.
        self.version = f"1-{lang}-{digest}"
        self.stats = {"calls": 0, "requests": 0, "items_asked": 0, "items_failed": 0, "unlabelled": 0}

    def prompt(self, items: list[tuple[str, str]]) -> str:
        lines = "\n".join(f"{i}: {json.dumps(t[:TEXT_CHARS], ensure_ascii=False)}" for i, t in items)
        return self.template.format(n=len(items), actions=lines) + "\n"

    def label(self, texts: list[str]) -> list[ActionLabels | None]:
        texts = [t or "" for t in texts]
        uniq = list(dict.fromkeys(texts))
        result: dict[str, ActionLabels | None] = {}
        pending: list[tuple[str, str]] = []  # (id, text)
        for k, t in enumerate(uniq):
            if is_plain_repost(t):
                result[t] = ActionLabels(labels=dict(PLAIN_REPOST_LABELS), keywords=[])
            else:
                pending.append((f"t{k}", t))
        for attempt in range(self.retries + 1):
            if not pending:
                break
            batches = [pending[i : i + self.batch_size] for i in range(0, len(pending), self.batch_size)]
            params = SamplingParams(
                temperature=0.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=self.max_new_tokens_per_item * self.batch_size + 32,
            )
            reqs = [
                GenerationRequest(prompt=self.prompt(b), seed=self.seed + 1000 * attempt + j, params=params)
                for j, b in enumerate(batches)
            ]
            comps = self.backend.generate(reqs)
            if len(comps) != len(reqs):
                raise BackendError("protocol", f"{len(comps)} completions for {len(reqs)} requests")
            self.stats["calls"] += 1
            self.stats["requests"] += len(reqs)
            self.stats["items_asked"] += len(pending)
            failed: list[tuple[str, str]] = []
            for batch, comp in zip(batches, comps, strict=True):
                got = parse_answer(comp.text, [i for i, _ in batch])
                for i, t in batch:
                    if i in got:
                        result[t] = got[i]
                    else:
                        failed.append((i, t))
            self.stats["items_failed"] += len(failed)
            pending = failed
        for _, t in pending:  # retry budget spent: unlabelled, never guessed
            result[t] = None
        self.stats["unlabelled"] += len(pending)
        out: list[ActionLabels | None] = []
        for t in texts:
            al = result[t]
            out.append(
                None if al is None else ActionLabels(labels=dict(al.labels), keywords=list(al.keywords))
            )
        return out
