"""Hook points through which interventions change a simulation without editing the engine.

The engine calls these on every active intervention at every step; the defaults change nothing.
Concrete kinds (inject actions, edit the mean field, change who arrives, change instructions) and
the declarative spec live in mfllm.simulation.intervention_spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mfllm.data.schema import Action

if TYPE_CHECKING:
    from mfllm.data.schema import Event
    from mfllm.simulation.steps import Step


@dataclass(slots=True)
class InjectedAction:
    text: str
    state: str  # the injecting agent's state text
    agent_id: str = "injected"


class Intervention:
    """Base class: override what the intervention changes. `step` is the step index within the event."""

    def begin_step(self, event: Event, step: Step) -> None:
        """Called once per event and step, before the other hooks, with the step as planned (its index,
        phase and actions, before `agents` changes them): e.g. to resolve a trigger given in seconds after
        the source post (step.actions[0].time - event.source.time)."""

    def agents(self, event_id: str, step: int, actions: list[Action], seed: int) -> list[Action]:
        """Who arrives this step (reweight / remove agents)."""
        return actions

    def meanfield_text(self, event_id: str, step: int, text: str) -> str:
        """The mean field the policy reads this step (exogenous signals)."""
        return text

    def injected(self, event_id: str, step: int, seed: int) -> list[InjectedAction]:
        """Actions added to the population's reactions this step (before the simulated agents)."""
        return []

    def instruction(self, event_id: str, step: int, action: Action, seed: int) -> str | None:
        """An extra instruction for this agent (placed in its own part of the prompt)."""
        return None
