"""The typed step record: one line of a run's steps.jsonl.

The engine builds a :class:`StepRecord` per finished step (one :class:`ActionRecord` per agent); the run
store writes ``to_json()`` (plus the line's ``sha``) and reads lines back with ``from_json``. The JSON is
exactly the format every run directory has always held (same keys, same order; ``injected`` appears only
on an injected post), so old run directories read and new ones are byte-identical to before.

Both records are also read-only mappings (``rec["actions"]``, ``a.get("parent")``, ``dict(rec)``), so code
written against the plain dicts of steps.jsonl keeps working; new code should use the attributes.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_ACTION_KEYS = ("agent_id", "action_id", "time", "state", "real_text", "sim_text", "parent", "followers",
                "prompt_tokens", "generated_tokens")
_STEP_KEYS = ("event_id", "step", "phase", "meanfield", "meanfield_state", "actions", "seconds")


class _JsonMapping(Mapping):
    """Read access by JSON key (the record's ``to_json`` view, computed on demand)."""

    __slots__ = ()

    @abstractmethod
    def _keys(self) -> tuple[str, ...]:
        """The JSON keys this record has (each record type lists its own)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


@dataclass(slots=True, eq=False)
class ActionRecord(_JsonMapping):
    """One agent's action in a step. ``sim_text`` is None in warm-up (the real action is fed instead);
    ``time`` is None for a post injected by an intervention."""

    agent_id: str
    action_id: str
    time: float | None
    state: str
    real_text: str
    sim_text: str | None = None
    parent: str | None = None
    followers: int | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    injected: bool = False
    decision: dict | None = None  # a decide policy's header labels ({} = missing/malformed); None = no header

    def _keys(self) -> tuple[str, ...]:
        keys = (*_ACTION_KEYS, "injected") if self.injected else _ACTION_KEYS
        return keys if self.decision is None else (*keys, "decision")

    def to_json(self) -> dict:
        out = {"agent_id": self.agent_id, "action_id": self.action_id, "time": self.time, "state": self.state,
               "real_text": self.real_text, "sim_text": self.sim_text, "parent": self.parent,
               "followers": self.followers, "prompt_tokens": self.prompt_tokens,
               "generated_tokens": self.generated_tokens}
        if self.injected:
            out["injected"] = True
        if self.decision is not None:
            out["decision"] = self.decision
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> ActionRecord:
        if isinstance(d, ActionRecord):
            return d
        return cls(d["agent_id"], d["action_id"], d.get("time"), d["state"], d["real_text"], d.get("sim_text"),
                   d.get("parent"), d.get("followers"), d.get("prompt_tokens", 0), d.get("generated_tokens", 0),
                   bool(d.get("injected", False)), d.get("decision"))


@dataclass(slots=True, eq=False)
class StepRecord(_JsonMapping):
    """One finished step of one event: the mean field after it and every action in it."""

    event_id: str
    step: int
    phase: str  # "warmup" | "rollout"
    meanfield: str
    meanfield_state: dict | None
    actions: list[ActionRecord] = field(default_factory=list)
    seconds: float = 0.0

    def _keys(self) -> tuple[str, ...]:
        return _STEP_KEYS

    def to_json(self) -> dict:
        """The steps.jsonl object (without ``sha``: the store adds it)."""
        return {"event_id": self.event_id, "step": self.step, "phase": self.phase, "meanfield": self.meanfield,
                "meanfield_state": self.meanfield_state, "actions": [a.to_json() for a in self.actions],
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: Mapping) -> StepRecord:
        """A record from its steps.jsonl object (a ``sha`` key, already checked by the store, is ignored)."""
        if isinstance(d, StepRecord):
            return d
        return cls(d["event_id"], d["step"], d["phase"], d.get("meanfield", ""), d.get("meanfield_state"),
                   [ActionRecord.from_json(a) for a in d["actions"]], d.get("seconds", 0.0))
