"""Corpus statistics per split (what `mfllm data stats` prints)."""

from __future__ import annotations

import datetime as _dt
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from mfllm.data.schema import Event
from mfllm.data.split import SPLITS, split_of


@dataclass
class SplitStats:
    events: int = 0
    actions: int = 0
    empty_text: int = 0  # plain reposts
    agents: set[str] = field(default_factory=set)
    labels: Counter = field(default_factory=Counter)
    first: float | None = None  # earliest time (source post or action), unix seconds
    last: float | None = None
    spans_h: list[float] = field(default_factory=list)  # per event: source post -> last action, hours
    dropped: Counter = field(default_factory=Counter)  # fault kind -> faulty action rows left out

    def add(self, ev: Event) -> None:
        self.events += 1
        self.actions += len(ev.actions)
        self.labels[ev.label or "unlabelled"] += 1
        if ev.dropped is not None:
            self.dropped.update(ev.dropped.counts)
        agents = self.agents
        empty = 0
        for a in ev.actions:
            agents.add(a.agent_id)
            if not a.text.strip():
                empty += 1
        self.empty_text += empty
        times = [ev.source.time] + ([ev.actions[0].time, ev.actions[-1].time] if ev.actions else [])
        lo, hi = min(times), max(times)
        self.first = lo if self.first is None else min(self.first, lo)
        self.last = hi if self.last is None else max(self.last, hi)
        self.spans_h.append((hi - lo) / 3600.0)

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def empty_share(self) -> float:
        return self.empty_text / self.actions if self.actions else 0.0

    @property
    def median_span_h(self) -> float | None:
        return statistics.median(self.spans_h) if self.spans_h else None

    def to_dict(self) -> dict:
        def day(t: float | None) -> str | None:
            return None if t is None else _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d")

        return {
            "events": self.events,
            "actions": self.actions,
            "agents": self.n_agents,
            "empty_text_share": round(self.empty_share, 4),
            "labels": dict(self.labels),
            "first": day(self.first),
            "last": day(self.last),
            "median_span_hours": None if self.median_span_h is None else round(self.median_span_h, 1),
            "dropped_actions": dict(sorted(self.dropped.items())),
        }


def compute_stats(events: Iterable[Event]) -> dict[str, SplitStats]:
    """Stats for each split ("train", "val", "test") and "all", streaming over `events`."""
    out = {s: SplitStats() for s in (*SPLITS, "all")}
    for ev in events:
        out[split_of(ev.event_id)].add(ev)
        out["all"].add(ev)
    return out


EVENT_COLUMNS = ("event_id", "label", "split", "actions", "span_hours", "dropped", "source_text")


def event_row(ev: Event) -> dict:
    """One line of `mfllm data events`: id, label, split, size, span (first to last action, hours),
    actions dropped on loading, and the source post's text."""
    span = (ev.actions[-1].time - ev.actions[0].time) / 3600.0 if ev.actions else 0.0
    return {
        "event_id": ev.event_id,
        "label": ev.label,
        "split": split_of(ev.event_id),
        "actions": len(ev.actions),
        "span_hours": round(span, 1),
        "dropped": ev.dropped.total if ev.dropped else 0,
        "source_text": ev.source.text,
    }
