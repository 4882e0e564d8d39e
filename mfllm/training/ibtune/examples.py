"""IB-Tune's data: an event's first steps, the mean-field chain over the real history, stage 1's units
(history X, next-step targets Y) and stage 2's policy examples."""

from __future__ import annotations

import dataclasses
import gzip
import heapq
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from mfllm.data.load import iter_events
from mfllm.data.schema import Event
from mfllm.data.state import agent_state_text
from mfllm.errors import ConfigError
from mfllm.files import atomic_open
from mfllm.labels.rules import RulesLabeler
from mfllm.prompts.templates import action_to_target, meanfield_prompt, policy_prefix, policy_suffix, strings
from mfllm.seeds import derive_seed
from mfllm.simulation.decision import model_header_dims, render_header
from mfllm.simulation.history import History
from mfllm.simulation.meanfield import MeanFieldUpdate, make_meanfield
from mfllm.simulation.methods import make_method
from mfllm.simulation.steps import plan_steps
from mfllm.training.ibtune.config import INFER_TEMPERATURE, INFER_TOP_P, TuneConfig
from mfllm.training.ibtune.roles import Roles
from mfllm.training.ibtune.tokens import generate


@dataclass
class EventSteps:
    """An event's first steps, as the engine cuts them: per step the real (state, action text) pairs."""

    event_id: str
    event_text: str
    steps: list[list[tuple[str, str]]]


def event_steps(event: Event, lang: str, step_size: int, max_steps: int) -> EventSteps:
    steps = []
    for st in plan_steps(event.actions, step_size=step_size, warmup=0):
        if len(steps) >= max_steps:
            break
        steps.append([(agent_state_text(a.profile, lang, depth=a.depth), a.text) for a in st.actions])
    return EventSteps(event.event_id, event.source.text, steps)


def policy_targets(texts: list[str], cfg: TuneConfig) -> list[str]:
    """What the policy writes for these real actions: ``action_to_target(text)``, after the rules labeler's
    decision header when the base model writes one (the same target as its own training, mfllm.training.decide)."""
    targets = [action_to_target(t, cfg.lang) for t in texts]
    if not cfg.policy_sim().get("decision_header"):
        return targets
    labels, dims = RulesLabeler().label(list(texts)), model_header_dims(cfg.base)
    return [render_header(lab.labels, cfg.lang, dims) + t for lab, t in zip(labels, targets, strict=True)]


def meanfield_chain(evs: list[EventSteps], upto: list[int], *, how: str, lang: str, roles: Roles | None = None,
                    role: str | None = None, seed: int = 0, max_new_tokens: int = 160,
                    stats: str = "stats", decay: float | None = None) -> list[list[str]]:
    """m before each step, fed the real history: chains[e][t] = m_{t-1} (chains[e][0] = the empty marker).

    how="stats": the stats mean field (`stats`: stats | stats-compact, with memory `decay`: the one the policy
    reads, None = the mean field's default);
    how="llm": the summariser (`role` of `roles`, None = the base model) sampled with the inference
    settings, all events' step t batched together. Only steps < upto[e] are run.
    """
    init = strings(lang)["empty_meanfield"]
    chains = [[init] for _ in evs]
    if how == "stats":
        smf = make_meanfield(stats, lang=lang, **({} if decay is None else {"decay": decay}))
        for e, ev in enumerate(evs):
            state = smf.initial(lang)
            for t in range(min(upto[e], len(ev.steps))):
                state = smf.update_many([MeanFieldUpdate(ev.event_text, state, ev.steps[t])])[0]
                chains[e].append(state.text)
        return chains
    assert roles is not None
    for t in range(max(upto, default=0)):
        todo = [e for e, ev in enumerate(evs) if t < min(upto[e], len(ev.steps))]
        if not todo:
            break
        prompts = roles.encode_prompts([meanfield_prompt(evs[e].event_text, chains[e][t],
                                                                    evs[e].steps[t], lang) for e in todo])
        with roles.active(role) as model:
            outs = generate(roles, model, prompts, [derive_seed(seed, evs[e].event_id, t, "chain") for e in todo],
                            temperature=INFER_TEMPERATURE, top_p=INFER_TOP_P, max_new_tokens=max_new_tokens)
        for e, s in zip(todo, outs, strict=True):
            chains[e].append(s.text or init)  # an empty summary is retried at inference; keep the marker
    return chains


@dataclass
class Unit:
    """Stage 1: history X = (event, m_{t-1}, step t's pairs); Y = next step's (state, action) sample."""

    event_id: str
    event_text: str
    step: int
    previous: str
    pairs: list[tuple[str, str]]
    targets: list[tuple[str, str]]
    stats: str = ""  # the stats mean field after steps 0..t of the real history (a reference context)


def build_units(events: list[Event], cfg: TuneConfig, n_units: int, rng: random.Random, roles: Roles,
                chain_role: str | None = None, info: dict | None = None) -> list[Unit]:
    """About n_units units from randomly picked events (each event gives up to units_per_event steps t).

    A history whose prompt + `mf_max_new_tokens` exceeds the model's context is left out (the HF backend
    refuses such a request at inference); `info["dropped_too_long"]` counts them."""
    first = cfg.first_step
    evs = [event_steps(e, cfg.lang, cfg.step_size, first + cfg.max_steps + 1) for e in events]
    evs = [e for e in evs if len(e.steps) >= first + 2]
    rng.shuffle(evs)
    evs = evs[: max(1, math.ceil(1.5 * n_units / max(1, cfg.units_per_event)))]  # margin for dropped ones
    picks = []
    for ev in evs:
        ts = rng.sample(range(first, len(ev.steps) - 1), min(cfg.units_per_event, len(ev.steps) - 1 - first))
        picks.append(sorted(ts))
    sim = cfg.policy_sim()
    stats = meanfield_chain(evs, [max(ts) + 1 for ts in picks], how="stats", lang=cfg.lang,
                            stats=sim.get("meanfield", "stats"), decay=sim.get("meanfield_decay"))
    if cfg.previous == "stats":
        chains = stats
    else:
        chains = meanfield_chain(evs, [max(ts) for ts in picks], how="llm", lang=cfg.lang, roles=roles,
                                 role=chain_role, seed=cfg.seed, max_new_tokens=cfg.mf_max_new_tokens)
    units = []
    for ev, ts, chain, st in zip(evs, picks, chains, stats, strict=True):
        for t in ts:
            nxt = ev.steps[t + 1]
            targets = rng.sample(nxt, min(cfg.targets_per_unit, len(nxt)))
            units.append(Unit(ev.event_id, ev.event_text, t, chain[t], ev.steps[t], targets, st[t + 1]))
    if roles.max_context:
        lens = [len(x) for x in roles.encode_prompts([
            meanfield_prompt(u.event_text, u.previous, u.pairs, cfg.lang) for u in units])]
        fits = [u for u, n in zip(units, lens, strict=True) if n + cfg.mf_max_new_tokens <= roles.max_context]
        if info is not None:
            info["dropped_too_long"] = info.get("dropped_too_long", 0) + len(units) - len(fits)
        units = fits
    rng.shuffle(units)
    return units[:n_units]


@dataclass
class PolicyExample:
    event_id: str
    step: int
    prompt: str
    target: str  # policy_targets: action_to_target(text), after a decision header if the policy writes one; eos added at encoding


def build_policy_examples(events: list[Event], cfg: TuneConfig, n_examples: int, rng: random.Random,
                          roles: Roles | None, meanfield_role: str | None = "meanfield") -> list[PolicyExample]:
    """(event, context, state) -> real action with the method's own context code (mf: m_t; state: none)."""
    first = cfg.first_step
    evs = [event_steps(e, cfg.lang, cfg.step_size, first + cfg.max_steps) for e in events]
    evs = [e for e in evs if len(e.steps) > first]
    rng.shuffle(evs)
    n_events, total = 0, 0
    while n_events < len(evs) and total < n_examples:  # just enough events for n_examples
        total += sum(min(cfg.agents_per_step, len(s)) for s in evs[n_events].steps[first:])
        n_events += 1
    evs = evs[:n_events]
    if cfg.context == "mf":  # m before step s: fed steps < s, as in warm-up
        chains = meanfield_chain(evs, [len(e.steps) - 1 for e in evs], how="llm", lang=cfg.lang, roles=roles,
                                 role=meanfield_role, seed=cfg.seed, max_new_tokens=cfg.mf_max_new_tokens)
    else:
        chains = [[""] * len(e.steps) for e in evs]
    method = make_method(cfg.context)
    out = []
    for ev, chain in zip(evs, chains, strict=True):
        for s, pairs in enumerate(ev.steps):
            if s < first:  # the chain still reads these steps: m_t is fed the real history from the start
                continue
            prefix = policy_prefix(ev.event_text, method.context(History(), chain[s], cfg.lang), cfg.lang)
            picked = rng.sample(pairs, min(cfg.agents_per_step, len(pairs)))
            targets = policy_targets([text for _, text in picked], cfg)
            for (state, _), target in zip(picked, targets, strict=True):
                out.append(PolicyExample(ev.event_id, s, prefix + policy_suffix(state, cfg.lang), target))
    rng.shuffle(out)
    return out[:n_examples]


def save_json_gz(path: Path, obj) -> None:
    with atomic_open(path, "wb") as f, gzip.open(f, "wt", encoding="utf-8") as g:
        json.dump(obj, g, ensure_ascii=False)


def load_json_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def sample_events(cfg: TuneConfig, split: str, n: int) -> list[Event]:
    """A seeded random sample of `n` events of `split`, streamed (one file parsed at a time), each cut to
    the actions of its first first_step + max_steps + 1 steps (all a stage uses): memory stays small."""
    if not cfg.data:
        raise ConfigError("--data is required", field="data")
    keep = (cfg.first_step + cfg.max_steps + 1) * cfg.step_size
    heap: list = []  # the n smallest keys, as a max-heap
    for ev in iter_events(cfg.data, split=split):
        key = derive_seed(cfg.seed, "pick", ev.event_id)
        if len(heap) < n or key < -heap[0][0]:
            item = (-key, ev.event_id, replace_event(ev, ev.actions[:keep]))
            (heapq.heappush if len(heap) < n else heapq.heapreplace)(heap, item)
    return [e for _, _, e in sorted(heap, key=lambda x: (-x[0], x[1]))]


def replace_event(ev: Event, actions) -> Event:
    return dataclasses.replace(ev, actions=list(actions))


def stage_events(cfg: TuneConfig, stage: str, train_events: list[Event] | None, val_events: list[Event] | None
                 ) -> tuple[list[Event], list[Event]]:
    """The events a stage builds its data from: the given ones, else a seeded sample of its splits."""
    if train_events is None:
        train_events = sample_events(cfg, cfg.split, events_needed(cfg, stage))
    if val_events is None:
        val_events = sample_events(cfg, cfg.val_split, cfg.val_events)
    if cfg.max_events is not None:
        train_events = train_events[: cfg.max_events]
    return train_events, val_events[: cfg.val_events]


def events_needed(cfg: TuneConfig, stage: str) -> int:
    """How many training events a stage draws from (a margin over what its steps x batch use)."""
    if stage == "meanfield":
        n = math.ceil(cfg.steps * cfg.batch_size / max(1, cfg.units_per_event) * 1.5) + 4
    else:
        n = math.ceil(cfg.steps * cfg.batch_size / max(1, cfg.agents_per_step)) + 4
    return min(n, cfg.max_events) if cfg.max_events is not None else n
