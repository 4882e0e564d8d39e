"""Cut an event's time-ordered actions into steps.

A step is a batch of k agents (default 16) or a time window. Warm-up is exact: the step that would
straddle the W-th real action is cut there, so exactly W real actions feed the mean field before the
rollout starts (the paper's code decided warm-up per batch, which made W inexact).
Works on any iterable of actions, so a population generated on the fly is never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mfllm.data.schema import Action
from mfllm.errors import ConfigError


@dataclass(slots=True)
class Step:
    index: int
    phase: str  # "warmup" | "rollout"
    actions: list[Action]


def plan_steps(actions: Iterable[Action], step_size: int = 16, warmup: int = 48,
               time_window: float | None = None) -> Iterator[Step]:
    if step_size < 1:
        raise ConfigError("step size must be at least 1", field="step_size")
    if warmup < 0:
        raise ConfigError("warm-up must be >= 0", field="warmup")
    if time_window is not None and time_window <= 0:
        raise ConfigError("time window must be > 0 seconds", field="time_window")
    index, seen = 0, 0
    batch: list[Action] = []
    window_start: float | None = None

    def phase_of(n_before: int) -> str:
        return "warmup" if n_before < warmup else "rollout"

    for a in actions:
        # close the current batch before adding `a` if: the warm-up boundary is reached, or the step is full
        # (agent steps), or `a` falls outside the current time window (time steps)
        if batch:
            at_boundary = seen == warmup
            full = time_window is None and len(batch) >= step_size
            new_window = time_window is not None and a.time >= window_start + time_window
            if at_boundary or full or new_window:
                yield Step(index, phase_of(seen - len(batch)), batch)
                index, batch = index + 1, []
        if not batch:
            window_start = a.time if time_window is None or window_start is None else (
                window_start + time_window * ((a.time - window_start) // time_window))
        batch.append(a)
        seen += 1
    if batch:
        yield Step(index, phase_of(seen - len(batch)), batch)
