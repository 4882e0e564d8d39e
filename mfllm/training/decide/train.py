"""Train a decide policy: fine-tune mfllm-mini to write a decision header, then the action, reading the mean field.

    train_decide(DecideConfig(data="../shared/data/ced", out="mfllm/assets/models/mfllm-decide"))

Data (mfllm.training.decide.data): every post-warm-up action of every TRAIN-split event, its step's
agents packed after one shared prefix; the prompt is the exact policy prompt of the drawn method
(mf with the compact stats mean field of the real preceding actions, or state / recent / popular, so
the baselines get the same model); the target is ``header + text``. With `meanfield_per_event`, some steps
also become summariser rows (the llm mean field's prompt -> the compact stats text after the step), so the
same model can write the mean field it reads under ``--meanfield llm``. Nothing is fitted on val or test
events: val events only feed the probe (mfllm.training.decide.probe) in the log. Beside the per-action loss,
three opt-in terms (DecideConfig, off by default): the crowd term (a step's mix), the reader term (the label
reader's per-agent distribution) and the contrast term (the text likelier after its own header than after a
changed one).

Starting from the shipped mfllm-mini weights (and its tokenizer) matters: the same budget from
scratch learned nothing (issue 14). Checkpoints every `ckpt_every` steps; a killed run resumes where
it stopped with the same batch order.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from mfllm.backends.hf.loading import load_weights
from mfllm.errors import ConfigError
from mfllm.files import atomic_write_json, atomic_write_text
from mfllm.labels.rules import RulesLabeler
from mfllm.paths import MINI_MODEL
from mfllm.simulation.decision import POLICY_FILE, header_dims
from mfllm.simulation.meanfield import compact_meanfield
from mfllm.simulation.steps import plan_steps
from mfllm.training.decide.data import (
    Contrast,
    StepTokens,
    build_step_tokens,
    contrast_term,
    crowd_kl,
    header_token_ids,
    is_summary,
    pack,
    packed_logits,
    reader_kl,
)
from mfllm.training.decide.probe import run_probe
from mfllm.training.mini import load_checkpoint, load_split, save_checkpoint

DEFAULT_MIX = {"mf": 0.7, "state": 0.1, "recent": 0.1, "popular": 0.1}


class DecideConfig(BaseModel):
    data: str
    out: str
    init: str = Field(str(MINI_MODEL), description="weights + tokenizer to fine-tune")
    seed: int = 1234
    lang: Literal["zh", "en"] = "zh"
    mix: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIX))
    steps: int = Field(1200, ge=1, description="optimizer steps")
    rows_per_step: int = Field(3, ge=1, description="packed event-steps (~16 actions each) per optimizer step")
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    header_weight: float = Field(10.0, ge=0, description="loss weight of the header tokens (text tokens: 1)")
    header_dims: Literal[4, 8] = Field(8, description="dimensions the decision header names: 8 (all the evaluation "
                                       "scores; the model reads the stats-compact8 mean field; the shipped "
                                       "mfllm-decide) or 4 (behaviour, stance, belief, emotion; stats-compact; "
                                       "its first version and stages 1-3 of its recipe)")
    # The shipped run began with header weight 2 and was resumed at step 200 with 10 (the header learned too
    # slowly: its log-loss was still above the marginal's); these two fields make that run reproducible.
    early_header_weight: float | None = Field(None, ge=0, description="header weight before early_steps")
    early_steps: int = Field(0, ge=0)
    max_train_events: int | None = None
    meanfield_per_event: int = Field(2, ge=0, description="summariser rows per train event (the llm mean field's "
                                     "prompt -> the compact stats text after that step); 0: actions only")
    meanfield_decay: float = Field(0.8, ge=0, le=1, description="the compact stats mean field's memory (weight each "
                                   "step keeps of the past counts), in training and in the model's policy file")
    crowd_weight: float = Field(0.0, ge=0, description="weight of the crowd term: per step and header dimension, "
                                "KL(the step's real label mix || the mean of its agents' predicted mixes), added "
                                "to the per-action loss (0: off, as in the shipped stages 1-3)")
    crowd_window: int = Field(0, ge=0, description="the crowd term's real mix: 0 = the step's own agents; N = the "
                              "N real actions from the step's first on (less sampling noise than one step)")
    reader_weight: float = Field(0.0, ge=0, description="weight of the reader term: per agent of an mf step and "
                                 "header dimension, KL(the label reader's distribution || the model's), the reader "
                                 "being mfllm.labels.reader (the bench's mf-oracle) fitted on the first "
                                 "reader_events training events (0: off)")
    contrast_weight: float = Field(0.0, ge=0, description="weight of the contrast term: -log sigmoid(NLL(text | its "
                                   "header with one of contrast_dims changed) - NLL(text | its own header)), mean over "
                                   "agents (0: off). It makes the text carry out the header's decision")
    # behaviour is left out by default: with it, the repost decision broke (20 val events, 8-dimension header:
    # behaviour KL 0.09 -> 0.24, the text no longer a plain repost after a repost header)
    contrast_dims: list[str] | None = Field(None, description="header dimensions a contrast copy may change (None: "
                                            "all the header names but behaviour)")
    reader_events: int = Field(600, ge=1, description="training events the reader term's label reader is fitted on")
    # A plain reader's slot distribution is a marginal; compared with the model's slot after the real earlier
    # slots, it flattens the header's own dependencies (v2: an empty mean field scored the header better
    # than the event's own on sentiment, subjectivity and intent).
    reader_conditional: bool = Field(False, description="the reader term's target for a header slot is the "
                                     "reader's distribution given the real labels of the slots before it (a "
                                     "conditional reader, mfllm.labels.reader `given`), not its marginal")
    probe_events: int = Field(16, ge=2, description="val events in the periodic probe")
    probe_every: int = 200
    ckpt_every: int = 100
    threads: int | None = 2
    bf16: bool = Field(True, description="bfloat16 autocast on the CPU (weights and optimizer stay float32)")

    @property
    def dims(self) -> tuple[str, ...]:
        """The header's dimensions, in header order (`header_dims` of them)."""
        return header_dims(self.header_dims)


def _lr(cfg: DecideConfig, s: int) -> float:
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    frac = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def _batches(steps: list[StepTokens], cfg: DecideConfig) -> list[list[int]]:
    """The whole run's batch order, fixed by the seed: rows of similar length batched (little padding)."""
    rng = random.Random(cfg.seed + 2)
    lengths = [len(s.prefix) + sum(len(a) + len(b) + len(c) for a, b, c in zip(s.suffixes, s.headers, s.texts, strict=True))
               for s in steps]
    order: list[list[int]] = []
    while len(order) < cfg.steps:
        idx = list(range(len(steps)))
        rng.shuffle(idx)
        chunk = cfg.rows_per_step * 50
        part = []
        for i in range(0, len(idx), chunk):
            c = sorted(idx[i:i + chunk], key=lambda j: lengths[j])
            part += [c[k:k + cfg.rows_per_step] for k in range(0, len(c), cfg.rows_per_step)]
        rng.shuffle(part)
        order += part
    return order[: cfg.steps]


def _fit_reader(cfg: DecideConfig, log):
    """The reader term's label reader (mfllm.labels.reader, the bench's mf-oracle model), fitted on the first
    `reader_events` training events: every action, teacher forced, its shares through the step before."""
    from mfllm.labels import reader as label_reader

    events = load_split(cfg.data, "train", cfg.reader_events)
    labeler = RulesLabeler()

    def labelled(ev):
        steps = [st.actions for st in plan_steps(ev.actions, step_size=16, warmup=48)]
        labs = iter(labeler.label([a.text for acts in steps for a in acts]))
        return [[(a, next(labs)) for a in acts] for acts in steps]

    given = {d: cfg.dims[:j] for j, d in enumerate(cfg.dims)} if cfg.reader_conditional else None
    try:
        reader = label_reader.fit_events(map(labelled, events), given=given)
    except ValueError:
        raise ConfigError(f"reader_weight: no training-split actions in {cfg.data} to fit the label reader on",
                          field="reader_weight") from None
    log(f"reader{' (conditional on the earlier header slots)' if given else ''}: fitted on "
        f"{reader.fit_info['n']} actions of {len(events)} training events, "
        f"gain {reader.fit_info['gain_nats_per_action']:.3f} nats/action")
    return reader


def _load_steps(cfg: DecideConfig, tokenizer, max_len: int, work: Path, log) -> tuple[list[StepTokens], dict]:
    path = work / "steps.pkl"
    if path.exists():
        with open(path, "rb") as f:  # our own cache, written below
            return pickle.load(f)
    t0 = time.time()
    reader = _fit_reader(cfg, log) if cfg.reader_weight > 0 else None
    events = load_split(cfg.data, "train", cfg.max_train_events)
    steps = build_step_tokens(events, tokenizer, max_len=max_len, seed=cfg.seed, lang=cfg.lang, mix=cfg.mix,
                              meanfield_per_event=cfg.meanfield_per_event, decay=cfg.meanfield_decay,
                              window=cfg.crowd_window if cfg.crowd_weight > 0 else 0, reader=reader,
                              dims=cfg.dims)
    n_sum = sum(map(is_summary, steps))
    info = {"train_events": len(events), "train_actions": sum(len(e.actions) for e in events),
            "train_steps": len(steps) - n_sum, "train_examples": sum(len(s.suffixes) for s in steps) - n_sum,
            "train_summaries": n_sum, "build_seconds": round(time.time() - t0, 1)}
    log(f"data: {info}")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((steps, info), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return steps, info


def train_decide(cfg: DecideConfig, log=print) -> dict:
    # transformers is heavy: imported here so that importing the config stays cheap
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.init)
    dims = cfg.dims
    token_ids = header_token_ids(tokenizer, cfg.lang, dims)
    asked = [f for f in ("crowd_weight", "reader_weight", "contrast_weight") if getattr(cfg, f) > 0]
    if asked and token_ids is None:
        raise ConfigError(f"{asked[0]} needs every header to be one token per label in the init model's tokenizer",
                          field=asked[0])
    contrast_dims = [d for d in dims if d != "behavior_type"] if cfg.contrast_dims is None else cfg.contrast_dims
    unknown = sorted(set(contrast_dims) - set(dims))
    if cfg.contrast_weight > 0 and (unknown or not contrast_dims):
        what = f"unknown dimension(s) {', '.join(unknown)}" if unknown else "no dimension"
        raise ConfigError(f"{what}; this header's dimensions (header_dims {cfg.header_dims}) are {', '.join(dims)}",
                          field="contrast_dims")
    cat_ids = [torch.tensor(list(ids.values())) for ids in token_ids or []]
    contrast = None
    if cfg.contrast_weight > 0:
        # per header dimension the categories a copy may switch to (None: never changed); plain reposts get no
        # copy: their text carries none of the other dimensions' decisions, and with copies the model learned to
        # write content after a repost header (20 val events: behaviour KL 0.09 -> 0.16)
        b = dims.index("behavior_type")
        contrast = Contrast([list(ids.values()) if d in contrast_dims else None
                             for d, ids in zip(dims, token_ids, strict=True)],
                            np.random.default_rng(cfg.seed + 7), (b, token_ids[b]["share"]))  # a resumed run redraws
        log(f"contrast: copies change one of {', '.join(contrast_dims)}")
    max_len = AutoConfig.from_pretrained(cfg.init).max_position_embeddings
    steps, data_info = _load_steps(cfg, tokenizer, max_len, work, log)
    val_events = load_split(cfg.data, "val")
    probe_events = [e for e in val_events if len(e.actions) >= 64][: cfg.probe_events]
    if len(probe_events) < 2:
        log("no probe: the val split has fewer than 2 events of 64+ actions")

    def opt_factory(m):
        decay = [p for _, p in m.named_parameters() if p.dim() >= 2]
        no_decay = [p for _, p in m.named_parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    ckpt = work / "checkpoint"
    old_ckpt = ckpt.with_name(ckpt.name + ".old")
    if not ckpt.exists() and (old_ckpt / "progress.json").exists():  # killed between save_checkpoint's renames
        os.replace(old_ckpt, ckpt)
    if (ckpt / "progress.json").exists():
        model, opt, start, history = load_checkpoint(ckpt, AutoModelForCausalLM, opt_factory)
        log(f"resumed at step {start}")
    else:
        model = load_weights(cfg.init, torch.float32, "cpu", field="init")  # the one loader (safetensors only)
        opt = opt_factory(model)
        start, history = 0, []
    model.train()
    order = _batches(steps, cfg)
    seen = history[-1]["examples"] if history else 0
    train_s = history[-1]["train_seconds"] if history else 0.0
    t_last = time.time()
    for s in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, s)
        hw = cfg.early_header_weight if s < cfg.early_steps and cfg.early_header_weight is not None else cfg.header_weight
        rows = [steps[i] for i in order[s]]
        batch = pack(rows, header_weight=hw, contrast=contrast)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = packed_logits(model, batch)
        nll = torch.nn.functional.cross_entropy(logits.float(), batch.tgt, reduction="none")
        loss = (nll * batch.weight).sum() / batch.n_examples  # weighted NLL per example (action or summary)
        crowd = None
        if cfg.crowd_weight > 0:
            row_of = [r for r, st in enumerate(rows) for _ in st.suffixes]
            crowd = crowd_kl(logits, batch, row_of, cat_ids, [st.window for st in rows])
            loss = loss + cfg.crowd_weight * crowd
        con = None
        if cfg.contrast_weight > 0:
            con = contrast_term(nll, batch)
            loss = loss + cfg.contrast_weight * con
        reader_term = None
        if cfg.reader_weight > 0:
            reader_term = reader_kl(logits, batch, [(st.reader, len(st.suffixes)) for st in rows], cat_ids)
            loss = loss + cfg.reader_weight * reader_term
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += batch.n_examples
        now = time.time()
        train_s += now - t_last
        row = {"step": s + 1, "loss": round(loss.item(), 4)}
        if crowd is not None:  # loss = the per-action loss + crowd_weight * crowd
            row["crowd"] = round(crowd.item(), 4)
        if reader_term is not None:  # and + reader_weight * reader
            row["reader"] = round(reader_term.item(), 4)
        if con is not None:
            row["contrast"] = round(con.item(), 4)
        row |= {"lr": round(_lr(cfg, s), 6), "examples": seen,
               "train_seconds": round(train_s, 1), "examples_per_s": round(seen / max(train_s, 1e-9), 2)}
        # the probe needs >= 2 val events of 64+ actions (another event's mean field); small data has none
        if len(probe_events) >= 2 and ((s + 1) % cfg.probe_every == 0 or s + 1 == cfg.steps):
            p = run_probe(model, tokenizer, probe_events, lang=cfg.lang, conditions=("own", "other"),
                          decay=cfg.meanfield_decay, dims=dims)
            row["probe"] = {"gain_total": round(p["gain"]["other-own:total"]["mean_per_action"], 4),
                            "gain_header": round(p["gain"]["other-own:header"]["mean_per_action"], 4),
                            "nll_own": round(p["nll_per_action"]["own"]["total"], 4),
                            "header_nll_own": round(p["nll_per_action"]["own"]["header"], 4),
                            "all_dims": round(p["header_accuracy"]["all_dims"], 4)}
        history.append(row)
        if (s + 1) % 10 == 0 or "probe" in row:
            log(json.dumps(row))
        if (s + 1) % cfg.ckpt_every == 0 and s + 1 < cfg.steps:
            save_checkpoint(ckpt, model, opt, s + 1, history)
        t_last = time.time()
    save_checkpoint(ckpt, model, opt, cfg.steps, history)
    return export(cfg, model, tokenizer, history, data_info, time.time() - t_start)


def export(cfg: DecideConfig, model, tokenizer, history: list[dict], data_info: dict, total_seconds: float,
           out: str | None = None) -> dict:
    """Write the model folder: float16 safetensors, tokenizer, policy file, curve and training_info.json."""
    dest = Path(out or cfg.out)
    dest.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "float16"  # halves the file; backends load it as float32 on CPU
    model.to("cpu").half().save_pretrained(dest, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(dest)
    meanfield = compact_meanfield(cfg.dims).name
    atomic_write_json(dest / POLICY_FILE, {"decision_header": True, "header_dims": cfg.header_dims,
                                           "meanfield": meanfield, "meanfield_decay": cfg.meanfield_decay,
                                           "lang": cfg.lang})
    keys = ["step", "loss", "lr", "examples", "train_seconds", "examples_per_s"]
    lines = [",".join([*keys, "probe_gain_total", "probe_gain_header"])]
    for h in history:
        p = h.get("probe", {})
        lines.append(",".join([*(str(h[k]) for k in keys), str(p.get("gain_total", "")), str(p.get("gain_header", ""))]))
    atomic_write_text(dest / "loss_curve.csv", "\n".join(lines) + "\n")
    last = history[-1] if history else {}
    info = {"config": cfg.model_dump(), "data": data_info, "parameters": sum(p.numel() for p in model.parameters()),
            "steps_done": last.get("step", 0), "examples_seen": last.get("examples", 0),
            "train_seconds": last.get("train_seconds"), "examples_per_s": last.get("examples_per_s"),
            "total_seconds": round(total_seconds, 1), "threads": torch.get_num_threads(),
            "probes": [dict(step=h["step"], **h["probe"]) for h in history if "probe" in h]}
    atomic_write_json(dest / "training_info.json", info)
    shutil.rmtree(dest / "_work", ignore_errors=True) if out is None and last.get("step") == cfg.steps else None
    return info


def export_checkpoint(cfg: DecideConfig, dest: str) -> dict:
    """Export the last checkpoint of a run (finished or not) as a model folder at `dest`."""
    from transformers import PreTrainedTokenizerFast

    work = Path(cfg.out) / "_work"
    ckpt = work / "checkpoint"
    model = load_weights(ckpt / "model", torch.float32, "cpu", field="checkpoint")
    history = json.loads((ckpt / "progress.json").read_text())["history"]
    with open(work / "steps.pkl", "rb") as f:  # our own cache (train_decide wrote it)
        _, data_info = pickle.load(f)
    return export(cfg, model, PreTrainedTokenizerFast.from_pretrained(cfg.init), history, data_info,
                  history[-1]["train_seconds"] if history else 0.0, out=dest)


if __name__ == "__main__":  # python -m mfllm.training.decide.train '{"data": ..., "out": ...}' (JSON config)
    import sys

    train_decide(DecideConfig.model_validate_json(sys.argv[1]), log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
