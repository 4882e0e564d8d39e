"""``mfllm train ib-tune``: stage 1 (the mean-field adapter), then stage 2 (the policy on m_t written by it),
plus optional baselines; each stage is resumable and a finished one is skipped."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mfllm.data.schema import Event
from mfllm.files import atomic_write_json
from mfllm.training.ibtune.config import TuneConfig, replace_cfg
from mfllm.training.ibtune.examples import events_needed, sample_events
from mfllm.training.ibtune.loop import is_done
from mfllm.training.ibtune.meanfield_stage import train_meanfield
from mfllm.training.ibtune.policy_stage import train_policy


@dataclass
class IBTunePlan:
    """`mfllm train ib-tune`: stage 1, then stage 2 with the tuned mean field, plus optional baselines."""

    meanfield: TuneConfig
    policy: TuneConfig
    sft_baseline: bool = True  # also OUT/policy-sft: SFT with the `state` context (no mean field)
    policy_base_mf: bool = False  # also OUT/policy-basemf: SFT with m_t from the untuned summariser
    outputs: dict = field(default_factory=dict)


def ib_tune(plan: IBTunePlan, out: str | os.PathLike, *, progress: bool = True,
            train_events: list[Event] | None = None, val_events: list[Event] | None = None) -> dict:
    """Run the stages that are not done yet (each is resumable); return {name: training_info}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg1 = plan.meanfield
    jobs: list[tuple[str, TuneConfig]] = [("meanfield", cfg1)]
    jobs.append(("policy", replace_cfg(plan.policy, context="mf", meanfield_adapter=str(out / "meanfield"))))
    if plan.sft_baseline:
        jobs.append(("policy-sft", replace_cfg(plan.policy, context="state", meanfield_adapter=None)))
    if plan.policy_base_mf:
        jobs.append(("policy-basemf", replace_cfg(plan.policy, context="mf", meanfield_adapter=None)))
    todo = [name for name, _ in jobs if not is_done(out / name)]
    if train_events is None and todo:  # one sample of events serves every stage
        n = max(events_needed(cfg1, "meanfield"), events_needed(plan.policy, "policy"))
        train_events = sample_events(replace_cfg(cfg1, max_steps=max(cfg1.max_steps, plan.policy.max_steps)),
                                     cfg1.split, n)
    if val_events is None and todo:
        val_events = sample_events(cfg1, cfg1.val_split, cfg1.val_events)
    infos = {}
    for name, cfg in jobs:
        cfg = replace_cfg(cfg, out=str(out / name))
        if is_done(cfg.out):
            infos[name] = json.loads((Path(cfg.out) / "training_info.json").read_text())
            continue
        fn = train_meanfield if name == "meanfield" else train_policy
        infos[name] = fn(cfg, train_events, val_events, progress=progress)
        if not infos[name].get("finished", True):
            break
    summary = {name: {"path": str(out / name), "train_seconds": i.get("train_seconds"),
                      "total_seconds": i.get("total_seconds"), "peak_rss_mb": i.get("peak_rss_mb"),
                      "val_before": i.get("val_before"), "val_after": i.get("val_after")} for name, i in infos.items()}
    atomic_write_json(out / "ibtune.json", summary)
    return infos
