"""Declarative interventions: a YAML / JSON spec -> validated models -> engine Interventions.

    interventions:                     # a list: every item applies; or the list itself at top level
      - kind: inject                   # k posts by a given (state text) or sampled account
        at_step: 4
        texts: ["等待真相，不信谣不传谣"]
        state: "用户：认证（警方官方微博）"      # omitted = an agent of that step, sampled (seeded)
      - kind: meanfield                # an exogenous signal added to m_t (what the policy reads)
        at_step: 4
        until_step: 8
        signal: "警方已证实此为谣言"
      - kind: arrivals                 # who arrives: remove a share, or reweight matching profiles
        at_time: 3600                  # seconds after the source post
        match: {min_activity: 2}
        weight: 2                      # 0 = remove them, 2 = each arrives twice
      - kind: instruction              # a changed instruction for a share of the agents
        at_step: 4
        share: 0.5
        text: "转发前请先核实信息来源"

Triggers: ``at_step`` (the step index within the event, counting warm-up steps from 0) with an optional
``until_step`` (inclusive), or ``at_time`` (seconds after the source post; a step is in when its first
agent arrives at or after it) with an optional ``until_time``. Without an end, ``inject`` fires once
(at the first step in) and the other kinds last to the end. Every random choice (who is removed,
duplicated, instructed, which agent posts) is seeded per agent / step from the run's seed, so the same
seed gives the same choices, independent of batching. See docs/whatif.md.

``parse_spec(obj_or_path)`` validates (errors name the file and the field, e.g.
``spec.yaml: field 'interventions[0].texts': ...``); ``build_interventions(spec)`` makes the engine's
Intervention objects (mfllm.simulation.interventions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from mfllm.data.schema import Action, Event, Profile
from mfllm.data.state import agent_state_text
from mfllm.errors import ConfigError
from mfllm.seeds import derived_rng
from mfllm.simulation.interventions import InjectedAction, Intervention

KINDS = ("inject", "meanfield", "arrivals", "instruction")

NonEmpty = Annotated[str, Field(min_length=1)]


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(None, description="a label for reports")
    at_step: int | None = Field(None, ge=0, description="first step (index within the event, warm-up included)")
    until_step: int | None = Field(None, ge=0, description="last step (inclusive)")
    at_time: float | None = Field(None, ge=0, description="seconds after the source post")
    until_time: float | None = Field(None, ge=0, description="seconds after the source post (inclusive)")

    @model_validator(mode="before")
    @classmethod
    def _ints_as_floats(cls, data: Any) -> Any:  # strict mode: accept 3600 for a float field
        if isinstance(data, dict):
            for k in ("at_time", "until_time", "weight", "remove", "share"):
                v = data.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    data = {**data, k: float(v)}
        return data

    @model_validator(mode="after")
    def _trigger(self):
        if (self.at_step is None) == (self.at_time is None):
            raise ValueError("give exactly one of at_step (a step index) or at_time (seconds after the source)")
        if self.until_step is not None:
            if self.at_step is None:
                raise ValueError("until_step goes with at_step (use until_time with at_time)")
            if self.until_step < self.at_step:
                raise ValueError(f"until_step ({self.until_step}) is before at_step ({self.at_step})")
        if self.until_time is not None:
            if self.at_time is None:
                raise ValueError("until_time goes with at_time (use until_step with at_step)")
            if self.until_time < self.at_time:
                raise ValueError(f"until_time ({self.until_time}) is before at_time ({self.at_time})")
        return self


class InjectSpec(_Item):
    kind: Literal["inject"]
    texts: list[NonEmpty] = Field(min_length=1, description="the posts, used in order (cycled up to count)")
    count: int | None = Field(None, ge=1, description="posts per step (default: one per text)")
    state: NonEmpty | None = Field(None, description="the posting account's state text; omitted = sampled")
    agent_id: NonEmpty = "injected"


class MeanFieldSpec(_Item):
    kind: Literal["meanfield"]
    signal: NonEmpty = Field(description="the exogenous signal added to the mean field the policy reads")
    position: Literal["before", "after"] = "before"


class Match(BaseModel):
    """Which agents an `arrivals` item concerns. All given conditions must hold; a condition on a field
    the data does not have (e.g. followers of a CED reposter) does not hold."""

    model_config = ConfigDict(extra="forbid", strict=True)

    verified: bool | None = None
    has_description: bool | None = None
    gender: Literal["m", "f"] | None = None
    location: NonEmpty | None = Field(None, description="substring of the location")
    min_followers: int | None = Field(None, ge=0)
    max_followers: int | None = Field(None, ge=0)
    min_activity: int | None = Field(None, ge=0, description="posts by this user in the corpus")
    max_activity: int | None = Field(None, ge=0)
    depth: int | None = Field(None, ge=1, description="1 = reposts the source, 2 = reposts a repost...")

    def __call__(self, a: Action) -> bool:
        p = a.profile
        checks = (
            (self.verified, lambda v: p.verified is not None and p.verified == v),
            (self.has_description, lambda v: _has_desc(p) is not None and _has_desc(p) == v),
            (self.gender, lambda v: p.gender == v),
            (self.location, lambda v: bool(p.location) and v in p.location),
            (self.min_followers, lambda v: p.followers is not None and p.followers >= v),
            (self.max_followers, lambda v: p.followers is not None and p.followers <= v),
            (self.min_activity, lambda v: p.corpus_activity is not None and p.corpus_activity >= v),
            (self.max_activity, lambda v: p.corpus_activity is not None and p.corpus_activity <= v),
            (self.depth, lambda v: a.depth == v),
        )
        return all(fn(v) for v, fn in checks if v is not None)


def _has_desc(p) -> bool | None:
    return True if p.description else p.has_description


class ArrivalsSpec(_Item):
    kind: Literal["arrivals"]
    match: Match | None = Field(None, description="the agents concerned (default: all)")
    weight: float | None = Field(None, ge=0, description="expected copies of each matching agent (0 removes)")
    remove: float | None = Field(None, ge=0, le=1, description="share of the matching agents removed")
    keep_size: bool = Field(False, description="resample the step with these weights, keeping its size")

    @model_validator(mode="after")
    def _one(self):
        if (self.weight is None) == (self.remove is None):
            raise ValueError("give exactly one of weight (expected copies of each matching agent) or remove (a share)")
        if self.keep_size and self.remove is not None and self.remove >= 1 and self.match is None:
            raise ValueError("keep_size with every agent removed leaves nobody to resample")
        return self

    @property
    def w(self) -> float:
        return self.weight if self.weight is not None else 1.0 - float(self.remove)


class InstructionSpec(_Item):
    kind: Literal["instruction"]
    text: NonEmpty = Field(description="the instruction added to the agent's part of the prompt")
    share: float = Field(1.0, gt=0, le=1, description="share of agents given it (seeded per agent)")


ItemSpec = Annotated[InjectSpec | MeanFieldSpec | ArrivalsSpec | InstructionSpec, Field(discriminator="kind")]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interventions: list[ItemSpec] = Field(min_length=1)
    name: str | None = None
    description: str | None = None
    lang: Literal["zh", "en"] | None = Field(None, description="state-text language of sampled posters")

    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


_ADAPTER = TypeAdapter(Spec)


# ------------------------------------------------------------------------------------------------ parsing


def _loc(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and isinstance(loc[i - 1], int) and part in KINDS:
            continue  # the discriminated union's branch (the item's kind)
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: dict) -> str:
    t, msg, inp = err.get("type", ""), err.get("msg", ""), err.get("input")
    if t == "union_tag_invalid":
        got = err.get("ctx", {}).get("tag", inp)
        return f"unknown kind {got!r}; choose one of {', '.join(KINDS)}"
    if t == "union_tag_not_found":
        return f"missing 'kind'; choose one of {', '.join(KINDS)}"
    if t == "extra_forbidden":
        return "unknown field (typo?)"
    if t == "missing":
        return "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if t not in ("missing",) and inp is not None and not isinstance(inp, dict | list):
        msg += f" (got {json.dumps(inp, ensure_ascii=False)[:60]})"
    return msg


def _config_error(e: ValidationError, path: str | None) -> ConfigError:
    errs = sorted(e.errors(), key=lambda x: x.get("type") != "extra_forbidden")  # a typo explains a "missing"
    first = errs[0]
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return ConfigError(_message(first) + more, path=path or "<spec>", field=_loc(tuple(first.get("loc", ()))))


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError("spec file not found", path=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the spec: {e}", path=str(path)) from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML{where}: {problem}", path=str(path)) from None
    except (ValueError, TypeError, IndexError, RecursionError) as e:  # PyYAML bugs on e.g. "x: !!float ;"
        raise ConfigError(f"invalid YAML: {type(e).__name__}: {str(e)[:120]}", path=str(path)) from None


def parse_spec(obj_or_path: Any, path: str | None = None) -> Spec:
    """A validated Spec from a file path (YAML or JSON), a dict ({"interventions": [...]}), a list of
    items, a single item, or a Spec. Raises ConfigError naming the file and the field."""
    if isinstance(obj_or_path, Spec):
        return obj_or_path
    if isinstance(obj_or_path, str | Path):
        path = str(obj_or_path)
        data = _read(Path(obj_or_path))
    else:
        data = obj_or_path
    if data is None:
        raise ConfigError("the spec is empty; expected a list of interventions", path=path or "<spec>")
    if isinstance(data, list) or (isinstance(data, dict) and "kind" in data):
        data = {"interventions": data if isinstance(data, list) else [data]}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping with 'interventions' or a list, got {type(data).__name__}",
                          path=path or "<spec>")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise _config_error(e, path) from None


# ------------------------------------------------------------------------------------------------ interventions


class Scheduled(Intervention):
    """Shared trigger logic: is this intervention in for (event, step)? Resolved in begin_step."""

    one_shot = False  # without an end: only the first step in

    def __init__(self, spec: _Item, index: int, lang: str = "zh"):
        self.spec, self.index, self.lang = spec, index, lang
        self.key = f"{index}:{getattr(spec, 'kind', '?')}"
        self._now: dict[str, tuple[int, bool]] = {}  # event id -> (current step, in?)
        self._fired: set[str] = set()
        self.steps_in: dict[str, list[int]] = {}  # event id -> [first, last] step the intervention was in

    @property
    def label(self) -> str:
        return self.spec.name or f"{self.spec.kind}#{self.index}"

    def _in(self, event: Event, index: int, first_time: float) -> bool:
        s = self.spec
        if s.at_step is not None:
            end = s.until_step if s.until_step is not None else (s.at_step if self.one_shot else None)
            return index >= s.at_step and (end is None or index <= end)
        offset = first_time - event.source.time
        if offset < s.at_time:
            return False
        if s.until_time is not None:
            return offset <= s.until_time
        if self.one_shot:
            if event.event_id in self._fired:
                return False
            self._fired.add(event.event_id)
        return True

    def begin_step(self, event: Event, step) -> None:
        first_time = step.actions[0].time if step.actions else event.source.time
        on = self._in(event, step.index, first_time)
        self._now[event.event_id] = (step.index, on)
        if on:
            span = self.steps_in.setdefault(event.event_id, [step.index, step.index])
            span[1] = step.index

    @property
    def first_step(self) -> dict[str, int]:
        """event id -> the first step the intervention was in (this process)."""
        return {e: span[0] for e, span in self.steps_in.items()}

    def was_in(self, event_id: str, step: int) -> bool:
        span = self.steps_in.get(event_id)
        return span is not None and span[0] <= step <= span[1]

    def active(self, event_id: str, step: int) -> bool:
        cur = self._now.get(event_id)
        if cur is not None and cur[0] == step:
            return cur[1]
        s = self.spec  # an engine that does not call begin_step: step triggers still work
        if s.at_step is None:
            return False
        end = s.until_step if s.until_step is not None else (s.at_step if self.one_shot else None)
        return step >= s.at_step and (end is None or step <= end)


class Inject(Scheduled):
    one_shot = True

    def __init__(self, spec: InjectSpec, index: int, lang: str = "zh"):
        super().__init__(spec, index, lang)
        self._pool: dict[str, list[Action]] = {}  # event id -> the current step's agents (sampled posters)

    def begin_step(self, event: Event, step) -> None:
        super().begin_step(event, step)
        if self.spec.state is None:
            self._pool[event.event_id] = step.actions

    def injected(self, event_id: str, step: int, seed: int) -> list[InjectedAction]:
        if not self.active(event_id, step):
            return []
        s: InjectSpec = self.spec
        n = s.count or len(s.texts)
        rng = derived_rng(seed, self.key)
        out = []
        for i in range(n):
            text = s.texts[i % len(s.texts)]
            if s.state is not None:
                out.append(InjectedAction(text, s.state, s.agent_id))
                continue
            pool = self._pool.get(event_id) or []
            if pool:
                a = pool[rng.randrange(len(pool))]
                out.append(InjectedAction(text, agent_state_text(a.profile, self.lang, depth=a.depth), a.agent_id))
            else:
                out.append(InjectedAction(text, agent_state_text(_EMPTY, self.lang), s.agent_id))
        return out


class MeanFieldSignal(Scheduled):
    def meanfield_text(self, event_id: str, step: int, text: str) -> str:
        return self.apply(text) if self.active(event_id, step) else text

    def apply(self, text: str) -> str:
        s: MeanFieldSpec = self.spec
        sep = "；" if self.lang == "zh" else "; "
        return f"{s.signal}{sep}{text}" if s.position == "before" else f"{text}{sep}{s.signal}"


class Arrivals(Scheduled):
    def agents(self, event_id: str, step: int, actions: list[Action], seed: int) -> list[Action]:
        if not self.active(event_id, step) or not actions:
            return actions
        s: ArrivalsSpec = self.spec
        w = s.w
        match = s.match or (lambda a: True)
        if s.keep_size:
            weights = [w if match(a) else 1.0 for a in actions]
            if sum(weights) <= 0:
                return []
            rng = derived_rng(seed, self.key)
            picks = sorted(rng.choices(range(len(actions)), weights=weights, k=len(actions)))
            out, seen = [], {}
            for i in picks:
                j = seen.get(i, 0)
                seen[i] = j + 1
                out.append(actions[i] if j == 0 else _duplicate(actions[i], j))
            return out
        out = []
        for a in actions:
            if not match(a):
                out.append(a)
                continue
            u = derived_rng(seed, self.key, a.action_id).random()
            n = int(w) + (1 if u < w - int(w) else 0)
            out.extend(a if j == 0 else _duplicate(a, j) for j in range(n))
        return out


class Instruction(Scheduled):
    def instruction(self, event_id: str, step: int, action: Action, seed: int) -> str | None:
        if not self.active(event_id, step):
            return None
        s: InstructionSpec = self.spec
        if s.share < 1.0 and derived_rng(seed, self.key).random() >= s.share:
            return None
        return s.text


def _duplicate(a: Action, j: int) -> Action:
    """The j-th extra copy of an agent: new ids (so its own seed), same profile, time and text."""
    return Action(action_id=f"{a.action_id}+d{j}", agent_id=f"{a.agent_id}+d{j}", time=a.time, text=a.text,
                  parent=a.parent, profile=a.profile, depth=a.depth)


def _empty_profile():
    return Profile(uid="injected")


_EMPTY = _empty_profile()

_CLASSES: dict[str, type[Scheduled]] = {"inject": Inject, "meanfield": MeanFieldSignal, "arrivals": Arrivals,
                                        "instruction": Instruction}


def build_interventions(spec: Spec | Any, lang: str | None = None) -> list[Intervention]:
    """The engine Interventions of a spec (anything parse_spec accepts), in the spec's order.
    lang: the language of sampled posters' state texts (default: the spec's lang, else zh)."""
    spec = parse_spec(spec)
    lang = lang or spec.lang or "zh"
    return [_CLASSES[item.kind](item, i, lang) for i, item in enumerate(spec.interventions)]


__all__ = ["KINDS", "Spec", "InjectSpec", "MeanFieldSpec", "ArrivalsSpec", "InstructionSpec", "Match",
           "parse_spec", "build_interventions", "Inject", "MeanFieldSignal", "Arrivals", "Instruction", "Scheduled"]
