"""Labeler interface: turn action texts into the paper's 9-dimension labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class ActionLabels:
    labels: dict[str, str]  # categorical dimension -> category (see dimensions.DIMENSIONS)
    keywords: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"labels": self.labels, "keywords": self.keywords}

    @classmethod
    def from_dict(cls, d: dict) -> ActionLabels:
        return cls(labels=dict(d["labels"]), keywords=list(d.get("keywords", [])))


@runtime_checkable
class Labeler(Protocol):
    name: str
    version: str

    def label(self, texts: list[str]) -> list[ActionLabels | None]:
        """One result per text, in order. None = could not be labelled (never guessed)."""
        ...
