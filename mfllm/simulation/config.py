"""What a simulation run is configured by: :class:`SimConfig`, the one place its names and defaults are defined.

The names a run accepts (method, mean-field model, prompt language) are ``Literal`` fields, so a wrong
name fails when the config is built, before a run directory exists. The CLI reads its defaults and the
choices in its help from here (:func:`default`, :func:`choices`). A new method or mean-field model is
registered in methods.py / meanfield.py and named in ``MethodName`` / ``MeanFieldName`` below (a test
checks the two agree). Kept free of the engine so that ``mfllm --help`` stays light.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from mfllm.backends.base import SamplingParams

MethodName = Literal["mf", "state", "recent", "popular"]
MeanFieldName = Literal["stats", "stats-compact", "stats-compact8", "llm"]
Lang = Literal["zh", "en"]  # = mfllm.prompts.templates.LANGS


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: MethodName = Field("mf", description="the policy's context: mf (mean field) | state | recent | popular")
    meanfield: MeanFieldName = Field("stats", description="mean-field model: stats (no LLM) | llm (summariser prompt)")
    step_size: int = Field(16, ge=1, description="agents per step")
    warmup: int = Field(48, ge=0, description="real actions fed to the mean field before rollout")
    time_window: float | None = Field(None, gt=0, description="seconds per step instead of k agents")
    lang: Lang = Field("zh", description="prompt language")
    seed: int = 0
    # A population simulator samples from the model's distribution: sharpening it (T < 1, top-p < 1)
    # collapses the crowd onto the modal reaction (mfllm-mini: 81% plain reposts at T=0.8/top-p 0.95
    # against 39% real; 35% at T=1/top-p 1).
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(48, ge=1)
    meanfield_max_new_tokens: int = Field(160, ge=1, description="most tokens of one llm mean-field summary")
    meanfield_decay: float | None = Field(None, ge=0, le=1, description="stats mean fields: the weight each step "
                                          "keeps of the past counts (None: what the model's mfllm_policy.json "
                                          "names, 1 for the shipped mfllm-decide; else 0.8, what the shipped models "
                                          "read in training; 1 = never forget the warm-up)")
    teacher_forcing: bool = Field(False, description="ablation: mean field fed real actions in rollout")
    max_rollout_agents: int | None = Field(None, ge=0, description="simulate at most this many agents per event")
    policy_adapter: str | None = None
    meanfield_adapter: str | None = None
    events_in_flight: int = Field(8, ge=1, description="events advanced together per batched round")
    decision_header: bool = Field(False, description="the policy writes a decision header before each action (a "
                                  "decide model, mfllm_policy.json): split off the text, kept as the record's decision")
    meanfield_header: bool = Field(False, description="with a decision header and a stats mean field: in rollout the "
                                   "mean field counts each simulated action's header labels (the dimensions the "
                                   "header names) instead of the rules labeler's reading of its text (checked by "
                                   "the Simulator, once the model's policy file has set decision_header)")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop=("\n",))


def default(name: str) -> Any:
    """SimConfig's default for a field (what a CLI option defaults to)."""
    return SimConfig.model_fields[name].default


def choices(name: str) -> tuple[str, ...]:
    """The names a Literal field accepts, in order."""
    return get_args(SimConfig.model_fields[name].annotation)
