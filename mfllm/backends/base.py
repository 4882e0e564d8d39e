"""The one small interface every LLM backend implements (in the spirit of vLLM's LLM/SamplingParams).

- ``generate(requests)``: batched text generation. Each request carries its own seed so a local
  seeded model gives the same text whatever the batch it lands in (needed for resume and Ray).
- ``score(prompts, continuations)``: log-likelihood of given continuations (NLL metric, IB-Tune).

Prompts put what all agents of a step share (instructions + event + mean field) first, so a backend
can find that common prefix from the tokens and compute it once. Backends must return exactly one result per request, in order, or raise
BackendError: an error is never returned as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class SamplingParams:
    # The crowd setting: a population simulator samples from the model's own distribution (sharpening it
    # collapses the crowd onto the modal reaction; see SimConfig). Callers that want otherwise say so.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 48
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(slots=True)
class GenerationRequest:
    prompt: str
    seed: int = 0
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # LoRA adapter name (role), where the backend supports it


@dataclass(slots=True)
class Completion:
    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str = "stop"  # "stop" | "length"
    cached_prompt_tokens: int = 0  # prompt tokens served from a reused prefix / cache (not recomputed)


@dataclass(slots=True)
class BackendStats:
    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from a reused prefix / response cache
    budget_capped: int = 0  # requests whose max_new_tokens was cut to fit the context
    seconds: float = 0.0

    def add(self, completions: list[Completion], seconds: float, calls: int = 1, budget_capped: int = 0) -> None:
        """Count one generate() call's completions (every backend accounts the same way)."""
        self.calls += calls
        self.requests += len(completions)
        self.prompt_tokens += sum(c.prompt_tokens for c in completions)
        self.generated_tokens += sum(c.generated_tokens for c in completions)
        self.cached_prompt_tokens += sum(c.cached_prompt_tokens for c in completions)
        self.budget_capped += budget_capped
        self.seconds += seconds

    def to_dict(self) -> dict:
        return {
            "calls": self.calls,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "budget_capped": self.budget_capped,
            "seconds": round(self.seconds, 3),
        }


@runtime_checkable
class Backend(Protocol):
    name: str
    stats: BackendStats

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...

    def score(self, prompts: list[str], continuations: list[str]) -> list[float]:
        """Sum of log p(continuation | prompt) in nats, one per pair."""
        ...

    def describe(self) -> dict:
        """What to write into a run's config (never secrets)."""
        ...
