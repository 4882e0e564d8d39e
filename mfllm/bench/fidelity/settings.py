"""The bench's settings (one pydantic model; the CLI reads its defaults from it) and the command that
reproduces them."""

from __future__ import annotations

import shlex
from typing import Literal

from pydantic import BaseModel, Field

from mfllm.bench.fidelity.rows import DEFAULT_METHODS, MethodSpec, parse_methods
from mfllm.errors import ConfigError
from mfllm.evaluation.metrics import DEFAULT_ALPHA

# Fields the command always names (the reader should see them even at their defaults).
_ALWAYS = ("split", "methods", "labeler", "seed", "warmup", "replicas")
# Fields that are not part of what a bench computes (where output goes, how it is shown, machine paths).
_NOT_IN_COMMAND = ("out", "backend_options", "label_cache", "progress")
# Option names that differ from the field name.
_FLAG = {"variants": "variant"}


class FidelitySettings(BaseModel, extra="forbid"):
    out: str
    data: str | None = None  # None = the shipped sample
    split: Literal["train", "val", "test", "all"] = "all"
    limit: int | None = Field(None, ge=1)
    events: list[str] | None = None
    methods: str = DEFAULT_METHODS
    variants: list[str] = Field(default_factory=list)
    model: str | None = None  # None = the shipped default model, paths.DEFAULT_MODEL (hf)
    backend: str = "hf"
    backend_options: dict = Field(default_factory=dict)  # base_url, api, device
    labeler: Literal["rules", "llm"] = "rules"
    label_cache: str | None = None  # None = the shared default file; "" = none
    marginal: str | None = None
    seed: int = 0
    warmup: int = Field(48, ge=0)
    warmups: list[int] | None = None
    max_agents: int | None = Field(None, ge=1)
    step_size: int = Field(16, ge=1)
    replicas: int = Field(4, ge=1, description="seeded crowds per event for every simulated / sampled row")
    alpha: float = Field(DEFAULT_ALPHA, gt=0, description="pseudo-count per category of the fair scoring rule")
    meanfield: Literal["stats", "llm"] = "stats"
    events_in_flight: int | None = Field(None, ge=1)
    policy_adapter: str | None = None
    meanfield_adapter: str | None = None
    label: str | None = None
    min_rollout: int = Field(16, ge=0)
    reference: str = "mf"  # the row the ablation table compares every other mf row with
    train_events: int = Field(600, ge=1, description="training-split events the mf-oracle / marginal-sampled "
                                                     "rows are built from (the first, in id order)")
    bin_by: Literal["steps", "actions", "seconds"] = "steps"
    bin_size: float = Field(1, gt=0)
    reports: bool = False
    bootstrap: int = Field(2000, ge=0)
    progress: bool = True

    def all_warmups(self) -> list[int]:
        ws = list(dict.fromkeys(self.warmups or [self.warmup]))
        if any(w < 0 for w in ws):
            raise ConfigError("warm-ups must be >= 0", field="warmups")
        return ws

    def main_warmup(self) -> int:
        ws = self.all_warmups()
        return self.warmup if self.warmup in ws else ws[0]

    def command(self) -> str:
        """The CLI command that reproduces these settings: every field that differs from its default
        (and the ones a reader should always see), as the option of the same name."""
        a = ["mfllm", "bench", "fidelity"]
        for name, f in type(self).model_fields.items():
            v = getattr(self, name)
            if name in _NOT_IN_COMMAND or v is None or (v == f.get_default(call_default_factory=True)
                                                        and name not in _ALWAYS):
                continue
            flag = "--" + _FLAG.get(name, name).replace("_", "-")
            if isinstance(v, bool):
                a.append(flag)
            elif name == "variants":
                for x in v:
                    a += [flag, x]
            elif isinstance(v, list):
                a += [flag, ",".join(map(str, v))]
            elif isinstance(v, float):
                a += [flag, f"{v:g}"]
            else:
                a += [flag, str(v)]
            if name == "backend":
                for k, x in sorted(self.backend_options.items()):
                    if x:
                        a += [f"--{k.replace('_', '-')}", str(x)]
        if self.backend == "hf":  # --device is an hf option, given without --backend
            dev = self.backend_options.get("device")
            if dev:
                a += ["--device", str(dev)]
        a += ["--out", self.out]
        return shlex.join(a)


def resolve_specs(settings: FidelitySettings) -> list[MethodSpec]:
    """LLM rows with the bench-wide defaults applied (--meanfield, --policy-adapter, --meanfield-adapter)."""
    out = []
    for s in parse_methods(settings.methods, settings.variants):
        mf_model = s.meanfield or (settings.meanfield if s.is_mf else "stats")
        out.append(s.model_copy(update=dict(
            meanfield=mf_model, policy_adapter=s.policy_adapter or settings.policy_adapter,
            meanfield_adapter=s.meanfield_adapter or (settings.meanfield_adapter if mf_model == "llm" else None))))
    return out
