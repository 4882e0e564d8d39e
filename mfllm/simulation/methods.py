"""Methods: each builds the policy's context for a step. Add one by registering a class.

- ``mf``: the mean field m_t (the paper's method)
- ``state``: profile only, no context
- ``recent``: the last k=5 actions
- ``popular``: the top-5 by reach among the last 30 actions (see History.reach for what reach is)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from mfllm.errors import ConfigError
from mfllm.prompts.templates import render_context, render_items
from mfllm.simulation.history import History


class Method(ABC):
    name: ClassVar[str]
    uses_meanfield: ClassVar[bool] = False
    history_window: ClassVar[int] = 0

    @abstractmethod
    def context(self, history: History, meanfield: str, lang: str = "zh") -> str:
        """The context block shared by all agents of the step."""


class MeanFieldMethod(Method):
    name = "mf"
    uses_meanfield = True

    def context(self, history: History, meanfield: str, lang: str = "zh") -> str:
        return render_context("mf", lang, meanfield=meanfield)


class StateMethod(Method):
    name = "state"

    def context(self, history: History, meanfield: str, lang: str = "zh") -> str:
        return render_context("state", lang)


class RecentMethod(Method):
    name = "recent"
    history_window = 5

    def __init__(self, k: int = 5):
        self.k = k

    def context(self, history: History, meanfield: str, lang: str = "zh") -> str:
        return render_context("recent", lang, items=render_items([it.text for it in history.last(self.k)], lang))


class PopularMethod(Method):
    name = "popular"
    history_window = 30

    def __init__(self, k: int = 5, pool: int = 30):
        self.k, self.pool = k, pool

    def context(self, history: History, meanfield: str, lang: str = "zh") -> str:
        pool = history.last(self.pool)
        top = sorted(pool, key=history.reach, reverse=True)[: self.k]
        top.sort(key=lambda it: it.order)  # shown in time order
        return render_context("popular", lang, items=render_items([it.text for it in top], lang))


METHODS: dict[str, type[Method]] = {m.name: m for m in (MeanFieldMethod, StateMethod, RecentMethod, PopularMethod)}


def make_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}", field="method") from None
