"""IB-Tune stage 2: the policy pi_phi.

Supervised fine-tuning on (event, state, m_t) -> real action (``action_to_target`` + eos), where m_t
is written by the (tuned) mean-field adapter from the real history (chained exactly as in warm-up,
sampled with the inference settings: temperature 0.7, top-p 0.95, ``mf_max_new_tokens``, stop at a
newline).
``context="state"`` is the paper's "SFT" row: the same SFT with the ``state`` method's context (no
mean field).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch

from mfllm.data.schema import Event
from mfllm.errors import ConfigError
from mfllm.training.ibtune.config import TuneConfig
from mfllm.training.ibtune.examples import (
    PolicyExample,
    build_policy_examples,
    load_json_gz,
    save_json_gz,
    stage_events,
)
from mfllm.training.ibtune.loop import finish_stage, last_val, prepare_work, stage_roles, train_loop
from mfllm.training.ibtune.roles import Roles
from mfllm.training.ibtune.tokens import encode_targets, seq_logprobs
from mfllm.training.mini import write_curves


def encode_examples(roles: Roles, exs: list[PolicyExample]) -> list[tuple[list[int], list[int]]]:
    p = roles.encode_prompts([e.prompt for e in exs])
    t = encode_targets(roles.tokenizer, [e.target for e in exs], roles.eos_id)
    return list(zip(p, t, strict=True))


def fits_context(roles: Roles, rows: list) -> list:
    """Examples within the model's context (as mfllm-mini's trainer drops longer ones)."""
    return [r for r in rows if not roles.max_context or len(r[0]) + len(r[1]) <= roles.max_context]


def sft_step(roles: Roles, rows: list[tuple[list[int], list[int]]], micro: int, backward: bool = True) -> dict:
    """Mean NLL per target token over the batch (gradients accumulated when backward)."""
    n_tok = sum(len(c) for _, c in rows)
    with roles.active(roles.trainable_role) as model:
        w = torch.full((len(rows),), -1.0 / n_tok) if backward else None
        lp, _ = seq_logprobs(roles, model, rows, micro=micro, weights=w)
    return {"train_loss": float(-lp.sum() / n_tok), "tokens": n_tok}


@torch.no_grad()
def evaluate_policy(roles: Roles, rows: list[tuple[list[int], list[int]]], micro: int, role: str | None) -> dict:
    if not rows:
        return {}
    with roles.active(role) as model:
        lp, n = seq_logprobs(roles, model, rows, micro=micro)
    return {"action_nll_per_token": float(-lp.sum() / n.sum())}


def train_policy(cfg: TuneConfig, train_events: list[Event] | None = None, val_events: list[Event] | None = None,
                 *, progress: bool = True) -> dict:
    """Stage 2: SFT of the policy adapter on (event, state, m_t) -> real action (or the `state` context)."""
    cfg.check("policy")
    t_start = time.time()
    work = prepare_work(cfg, "policy")
    roles, mf_role = stage_roles(cfg, "policy", "meanfield",
                                  cfg.meanfield_adapter if cfg.context == "mf" else None)

    data_path = work / "examples.json.gz"
    t_data = time.time()
    if data_path.exists():
        d = load_json_gz(data_path)
        train = [PolicyExample(**e) for e in d["train"]]
        val = [PolicyExample(**e) for e in d["val"]]
    else:
        train_events, val_events = stage_events(cfg, "policy", train_events, val_events)
        train = build_policy_examples(train_events, cfg, cfg.steps * cfg.batch_size, random.Random(cfg.seed),
                                      roles, mf_role)
        val = build_policy_examples(val_events, cfg, 8 * cfg.val_units,
                                    random.Random(cfg.seed + 1), roles, mf_role)
        if not train:
            raise ConfigError("no training examples: the training events have no actions")
        save_json_gz(data_path, {"train": [dataclasses.asdict(e) for e in train], "val": [dataclasses.asdict(e) for e in val]})
    data_seconds = time.time() - t_data
    train_rows = fits_context(roles, encode_examples(roles, train))
    val_rows = fits_context(roles, encode_examples(roles, val))
    if not train_rows:
        raise ConfigError(f"every training example is longer than the model's context ({roles.max_context})")
    before = evaluate_policy(roles, val_rows, cfg.micro_batch, None)
    tokens = [0]

    def step_fn(s, batch):
        m = sft_step(roles, [train_rows[i] for i in batch], cfg.micro_batch)
        tokens[0] += m["tokens"]
        return {"train_loss": m["train_loss"], "tokens": tokens[0]}

    def eval_fn():
        return evaluate_policy(roles, val_rows, cfg.micro_batch, "policy")

    history, seconds, finished = train_loop("policy", cfg, roles, len(train_rows), step_fn, eval_fn, work,
                                             progress)
    out = Path(cfg.out)
    info = {"stage": "policy", "context": cfg.context, "meanfield_adapter": cfg.meanfield_adapter,
            "finished": finished, "config": cfg.model_dump(), "train_examples": len(train_rows),
            "val_examples": len(val_rows), "dropped_too_long": len(train) + len(val) - len(train_rows) - len(val_rows),
            "data_seconds": round(data_seconds, 1), "train_seconds": round(seconds, 1),
            "total_seconds": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
            "device": roles.device, "val_before": before, "val_after": last_val(history),
            "last_step": history[-1] if history else {}}
    if history:
        write_curves(out, history)
    if not finished:
        return info
    return finish_stage(cfg, roles, "policy", info)
