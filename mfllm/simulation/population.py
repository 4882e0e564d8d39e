"""Extend an event's population beyond its real agents, lazily (bounded memory at any size).

``extend_population(event, total_agents, seed)`` yields the event's real actions first, then new agents
made by resampling the real agents' profiles (uniformly, with replacement, seeded), with new ids
(``syn1``, ``syn2``, ...) and arrival times extrapolated from the observed arrival rate. Nothing is
materialised: each synthetic Action is built when it is asked for, so 10^6 agents cost the memory of one.

    ev = synthetic_event(event, total_agents=100_000, seed=0)   # an Event whose .actions is lazy
    Simulator(backend, cfg).run([ev], sink)                     # plan_steps consumes it step by step

Arrival times: after the last real action the arrivals form a Poisson process whose rate is the real
arrival rate over the later half of the observed actions (the cascade's recent pace, not its initial
burst); with fewer than two distinct times, one arrival per minute. Each synthetic agent's profile is a
copy of the resampled one with ``uid`` = the new agent id and ``extra.minutes_after_source`` set from its
new time (the state text shows the delay), plus ``extra.synthetic = True`` and ``extra.resampled_from``.

The same (event id, seed) always gives the same population; the sequence is the same however it is
consumed (it is generated in order from one seeded stream).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

from mfllm.data.schema import Action, Event, Profile
from mfllm.seeds import derived_rng

SYNTHETIC_PREFIX = "syn"
DEFAULT_RATE = 1 / 60.0  # arrivals per second when the data cannot tell (one per minute)


def arrival_rate(actions: Sequence[Action], source_time: float | None = None) -> float:
    """Arrivals per second over the later half of the observed actions (at least two of them).

    With one action (or all at the same instant), the rate since the source post; else DEFAULT_RATE.
    """
    n = len(actions)
    if n >= 2:
        lo = n // 2 if n >= 4 else 0
        span = actions[-1].time - actions[lo].time
        if span > 0:
            return (n - 1 - lo) / span
    if n >= 1 and source_time is not None and actions[-1].time > source_time:
        return n / (actions[-1].time - source_time)
    return DEFAULT_RATE


def _synthetic(i: int, template: Action | None, t: float, source_time: float, text: str | None) -> Action:
    aid = f"{SYNTHETIC_PREFIX}{i}"
    if template is None:
        profile = Profile(uid=aid, extra={"synthetic": True, "reposts_source": True,
                                          "minutes_after_source": round((t - source_time) / 60.0, 1)})
        depth = 1
    else:
        p = template.profile
        extra = dict(p.extra)
        extra.update(synthetic=True, resampled_from=p.uid,
                     minutes_after_source=round((t - source_time) / 60.0, 1))
        profile = dataclasses.replace(p, uid=aid, extra=extra)
        depth = template.depth
    return Action(action_id=aid, agent_id=aid, time=t, text=text, parent=None, profile=profile, depth=depth)


def extend_population(event: Event, total_agents: int | None, seed: int = 0, *,
                      until_time: float | None = None, text: str | None = "",
                      profiles_from: Sequence[Action] | None = None) -> Iterator[Action]:
    """The event's real actions, then resampled synthetic agents, lazily.

    total_agents: how many actions in all (real first; fewer than the real ones truncates them);
    None = no limit (then give until_time, or stop consuming). until_time: stop before the first action
    later than this unix time. text: the synthetic actions' real text, which no data gives: "" (a plain
    repost, the default, safe everywhere) or None (unknown: a run then records real_text null, which
    evaluation skips; not for warm-up or teacher forcing, which feed real texts). profiles_from: the real
    actions to resample profiles and the arrival rate from (default: all of the event's actions).
    """
    if total_agents is not None and total_agents < 0:
        raise ValueError("total_agents must be >= 0")
    real: Sequence[Action] = event.actions if isinstance(event.actions, Sequence) else list(event.actions)
    pool: Sequence[Action] = real if profiles_from is None else profiles_from
    n = 0
    last_t = event.source.time
    for a in real:
        if (total_agents is not None and n >= total_agents) or (until_time is not None and a.time > until_time):
            return
        yield a
        n += 1
        last_t = a.time
    rate = arrival_rate(pool, event.source.time)
    rng = derived_rng(seed, event.event_id, "population")
    t = last_t
    for i in itertools.count(1):
        if total_agents is not None and n >= total_agents:
            return
        t += rng.expovariate(rate)
        if until_time is not None and t > until_time:
            return
        template = pool[rng.randrange(len(pool))] if len(pool) else None
        yield _synthetic(i, template, t, event.source.time, text)
        n += 1


class PopulationActions:
    """A lazy, re-iterable sequence of an event's (extended) actions: iterating regenerates it from the
    seed, so holding one costs nothing; ``len()`` is known without generating when total_agents is given."""

    def __init__(self, event: Event, total_agents: int | None, seed: int = 0, *, until_time: float | None = None,
                 text: str | None = "", profiles_from: Sequence[Action] | None = None):
        if total_agents is None and until_time is None:
            raise ValueError("give total_agents or until_time: an unbounded population has no length")
        self.event, self.total_agents, self.seed = event, total_agents, seed
        self.until_time, self.text, self.profiles_from = until_time, text, profiles_from
        self._len: int | None = total_agents if until_time is None else None

    def __iter__(self) -> Iterator[Action]:
        return extend_population(self.event, self.total_agents, self.seed, until_time=self.until_time,
                                 text=self.text, profiles_from=self.profiles_from)

    def __len__(self) -> int:
        if self._len is None:  # a time limit: count once (O(n) time, O(1) memory)
            self._len = sum(1 for _ in self)
        return self._len


def synthetic_event(event: Event, total_agents: int | None, seed: int = 0, *, event_id: str | None = None,
                    until_time: float | None = None, text: str | None = "",
                    profiles_from: Sequence[Action] | None = None) -> Event:
    """A copy of `event` (same source post, label, domain) whose ``.actions`` is a lazy PopulationActions.

    event_id: the copy's id (default: the event's); the population is seeded by (seed, the copy's id).
    The real actions are shared with `event`, never copied.
    """
    base = _copy(event, event.actions, event_id)
    return _copy(base, PopulationActions(base, total_agents, seed, until_time=until_time, text=text,
                                         profiles_from=profiles_from))


def _copy(event: Event, actions, event_id: str | None = None) -> Event:
    return Event(event_id=event_id or event.event_id, source=event.source, actions=actions,
                 label=event.label, domain=event.domain, platform=event.platform, origin=event.origin)


__all__ = ["DEFAULT_RATE", "PopulationActions", "SYNTHETIC_PREFIX", "arrival_rate", "extend_population",
           "synthetic_event"]
