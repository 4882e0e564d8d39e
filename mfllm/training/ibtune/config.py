"""IB-Tune's settings: one pydantic model for both stages (the CLI's options fill it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mfllm.errors import ConfigError
from mfllm.paths import MINI_MODEL

ROLES = ("meanfield", "policy")
# the LLMMeanField defaults: how m_t is written at inference (chains for `previous` and stage 2)
INFER_TEMPERATURE, INFER_TOP_P = 0.7, 0.95


class TuneConfig(BaseModel):
    """One stage's settings. Library defaults (step size 16 and 160-token summaries, as the simulation's
    defaults); the CLI's defaults are the mfllm-mini CPU recipe (docs/ibtune.md, "Settings").

    A bad value raises :class:`~mfllm.errors.ConfigError` naming the field."""

    model_config = ConfigDict(extra="forbid")

    out: str
    base: str = str(MINI_MODEL)
    data: str | None = None
    seed: int = 0
    lang: Literal["zh", "en"] = "zh"
    # adapters
    full: bool = False  # full fine-tuning instead of LoRA (saves a whole model dir)
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = 32
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"  # attention + MLP projections (never the lm_head)
    # optimisation
    steps: int = Field(60, ge=1)
    batch_size: int = Field(4, ge=1)  # stage 1: histories per step (x samples_k); stage 2: examples per step
    lr: float = Field(5e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch: int = Field(16, ge=1)  # rows per forward pass (memory); does not change the result
    # stage 1
    samples_k: int = Field(4, ge=1)  # stage 1 needs >= 2 (see check)
    beta: float = Field(0.05, ge=0)
    length_penalty: float = Field(0.0, ge=0)  # lam, per token of m
    pathwise_kl: bool = True
    # the policy's target format: None follows the base model's mfllm_policy.json (a decide model writes a
    # decision header before its text, so its targets carry the rules labeler's header, as in its training)
    decision_header: bool | None = None
    mf_max_new_tokens: int = Field(160, ge=1)
    targets_per_unit: int = Field(8, ge=1)  # |Y|: next-step actions scored per history
    units_per_event: int = Field(2, ge=1)
    previous: Literal["chain", "stats"] = "chain"  # what m_{t-1} in the mean-field prompt is
    policy_adapter: str | None = None  # stage 1: a frozen policy adapter scores R (default: the base model)
    # stage 2
    context: Literal["mf", "state"] = "mf"  # mf: m_t from the mean-field adapter; state: SFT without mean field
    meanfield_adapter: str | None = None  # stage 2: the adapter that writes m_t (None: the untuned base)
    agents_per_step: int = Field(4, ge=1)
    # data
    step_size: int = Field(16, ge=1)
    max_steps: int = Field(8, ge=1)  # steps used per event: [first_step, first_step + max_steps)
    first_step: int = Field(0, ge=0)  # skip an event's first steps (6 at step size 8: after a 48-action warm-up)
    max_events: int | None = Field(None, ge=1)
    split: str = "train"
    val_split: str = "val"
    val_events: int = Field(16, ge=0)
    val_units: int = Field(16, ge=0)
    # runtime
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    threads: int | None = Field(None, ge=1)
    eval_every: int = Field(20, ge=1)
    ckpt_every: int = Field(10, ge=1)
    interrupt_after: int | None = None  # stop after this many steps in this call (leaves a checkpoint)

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _config_error(e) from None

    def policy_sim(self) -> dict:
        """What the base model's mfllm_policy.json asks of an `mf` run (the simulator's own reading of it,
        ``apply_policy``): the decision header, the stats mean field and its memory; ``decision_header``
        overrides the header. {"method": "mf"} alone for a model without a policy file."""
        from mfllm.simulation.decision import apply_policy

        sim = apply_policy(self.base, {"method": "mf"})
        if self.decision_header is not None:
            sim["decision_header"] = self.decision_header
        return sim

    def check(self, stage: str) -> None:
        """What only one stage requires."""
        if stage == "meanfield" and self.samples_k < 2:
            raise ConfigError("--samples-k must be >= 2 (the leave-one-out baseline needs two samples)",
                              field="samples_k")


def _config_error(e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    field = ".".join(str(x) for x in err.get("loc", ())) or None
    return ConfigError(f"{err.get('msg', e)} (got {err.get('input')!r})", field=field)


def replace_cfg(cfg: TuneConfig, **kw) -> TuneConfig:
    """A copy with some fields changed (validated)."""
    return TuneConfig(**{**cfg.model_dump(), **kw})
