"""Training examples, built with exactly the templates and context code that inference uses.

For each real event we walk its steps as the engine does in warm-up (mean field and history fed the
real actions), and for a sample of agents emit (prompt, target) pairs for every method, so one
checkpoint serves all methods and comparisons between methods are fair. A plain repost is the
explicit target "[转发]". Summariser examples teach the same model the mean-field role
(target: the `stats` summary after the step).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mfllm.data.schema import Event
from mfllm.data.state import agent_state_text
from mfllm.prompts.templates import action_to_target, meanfield_prompt, policy_prefix, policy_suffix
from mfllm.simulation.history import History
from mfllm.simulation.meanfield import MeanFieldUpdate, StatsMeanField
from mfllm.simulation.methods import METHODS, make_method
from mfllm.simulation.steps import plan_steps

DEFAULT_MIX = {"mf": 0.4, "state": 0.2, "recent": 0.2, "popular": 0.2}


@dataclass(slots=True)
class Example:
    prompt: str
    target: str
    kind: str  # "policy:<method>" or "meanfield"
    event_id: str


def event_examples(event: Event, rng: random.Random, *, lang: str = "zh", step_size: int = 16,
                   agents_per_event: int = 24, meanfield_per_event: int = 2,
                   mix: dict[str, float] | None = None, meanfield: StatsMeanField | None = None) -> Iterator[Example]:
    mix = mix or DEFAULT_MIX
    methods = {name: make_method(name) for name in mix}
    names, weights = list(mix), list(mix.values())
    mf_model = meanfield or StatsMeanField(lang=lang)
    n = len(event.actions)
    if n == 0:
        return
    picked = set(rng.sample(range(n), min(agents_per_event, n)))
    steps = list(plan_steps(event.actions, step_size=step_size, warmup=0))
    mf_steps = set(rng.sample(range(len(steps)), min(meanfield_per_event, len(steps))))
    history = History(window=max(m.history_window for m in METHODS.values()))
    mf = mf_model.initial(lang)
    pos = 0
    for step in steps:
        contexts: dict[str, str] = {}
        pairs = []
        for a in step.actions:
            state = agent_state_text(a.profile, lang, depth=a.depth)
            pairs.append((state, a.text))
            if pos in picked:
                name = rng.choices(names, weights)[0]
                if name not in contexts:
                    contexts[name] = methods[name].context(history, mf.text, lang)
                prefix = policy_prefix(event.source.text, contexts[name], lang)
                yield Example(prefix + policy_suffix(state, lang), action_to_target(a.text, lang),
                              f"policy:{name}", event.event_id)
            pos += 1
        new_mf = mf_model.update_many([MeanFieldUpdate(event.source.text, mf, pairs)])[0]
        if step.index in mf_steps:
            yield Example(meanfield_prompt(event.source.text, mf.text, pairs, lang), new_mf.text, "meanfield",
                          event.event_id)
        mf = new_mf
        for a in step.actions:
            history.add(a.action_id, a.text, a.parent, a.profile.followers, a.time)


def build_examples(events: Iterable[Event], seed: int = 0, **kw) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    for ev in events:
        out.extend(event_examples(ev, rng, **kw))
    return out
