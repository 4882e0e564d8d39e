"""The typed event model every loader produces and every later stage consumes.

An *event* is a source post plus the time-ordered actions (reposts / comments) that followed.
Each action's author is an *agent* whose *profile* becomes its textual state.
Dataclasses with slots, not pydantic: a run can hold millions of actions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Profile:
    """What the data honestly says about a user. Any field may be unknown (None).

    CED reposters only have a uid; for them the loader fills the *derived* fields
    (repost depth, whether it reposts the source, minutes since the source, activity in the corpus).
    """

    uid: str
    screen_name: str | None = None
    gender: str | None = None  # "m" / "f"
    location: str | None = None
    description: str | None = None  # bio text; CED only says whether one exists -> has_description
    has_description: bool | None = None
    followers: int | None = None
    friends: int | None = None
    statuses: int | None = None
    favourites: int | None = None
    verified: bool | None = None
    verified_type: int | None = None
    verified_reason: str | None = None
    created_at: float | None = None  # account creation, unix seconds
    # derived from the cascade / corpus (CED reposters; also filled for other formats when computable)
    corpus_activity: int | None = None  # number of posts by this uid in the corpus it was loaded with
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(**d)


@dataclass(slots=True)
class Action:
    """One agent's reaction. Empty text = a plain repost (real behaviour, ~40% of CED)."""

    action_id: str
    agent_id: str
    time: float  # unix seconds
    text: str
    parent: str | None  # action_id reposted; None when it reposts the source post
    profile: Profile
    depth: int = 1  # 1 = reposts the source, 2 = reposts a repost, ...

    @property
    def is_repost(self) -> bool:
        return self.text.strip() == ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "action_id": self.action_id,
            "agent_id": self.agent_id,
            "time": self.time,
            "text": self.text,
            "parent": self.parent,
            "depth": self.depth,
            "profile": self.profile.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Action:
        return cls(
            action_id=d["action_id"],
            agent_id=d["agent_id"],
            time=d["time"],
            text=d["text"],
            parent=d.get("parent"),
            depth=d.get("depth", 1),
            profile=Profile.from_dict(d["profile"]),
        )


@dataclass(slots=True)
class SourcePost:
    text: str
    time: float
    author: Profile


@dataclass(slots=True)
class DroppedActions:
    """Actions a loader left out of an event because their own row was faulty; the event itself is kept.

    Real cascades hold such rows (a repost dated days before its source post: a clock or time-zone error),
    and one bad row must not lose the event. `counts`: fault kind -> actions dropped (the kinds are
    `mfllm.data._common.FAULT_KINDS`). `first`: the first fault as a one-line message naming the file,
    the field and the post, e.g. "x.json: field 'date': impossible timestamp ... (post 2, mid 9spkMP)".
    """

    origin: str  # the file (or file:line) holding the rows
    counts: dict[str, int]
    first: str

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return f"{self.first}; {self.total} action(s) dropped ({kinds}), the event is kept"


@dataclass(slots=True)
class Event:
    event_id: str
    source: SourcePost
    actions: list[Action]  # sorted by time (stable) by every loader
    label: str | None = None  # e.g. "rumor" / "non-rumor"
    domain: str | None = None  # one of mfllm.evaluation.domains.DOMAINS when tagged
    platform: str = "weibo"
    origin: str | None = None  # file it came from
    dropped: DroppedActions | None = None  # faulty action rows the loader left out (None: none)

    @property
    def dropped_actions(self) -> dict[str, int]:
        """Fault kind -> actions of this event dropped on loading ({} when none)."""
        return dict(self.dropped.counts) if self.dropped else {}

    def __len__(self) -> int:
        return len(self.actions)
