"""IB-Tune's training loop, shared by both stages: AdamW with warm-up + cosine, a fixed batch order, periodic
validation, and atomic checkpoints (trainable tensors and optimizer state in safetensors, progress in JSON;
``mini.save_checkpoint``) in ``OUT/_work``, so a rerun of the same command resumes where it stopped."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from mfllm.errors import ConfigError
from mfllm.files import atomic_write_json
from mfllm.training.ibtune.config import TuneConfig
from mfllm.training.ibtune.roles import Roles, TrainableView
from mfllm.training.mini import load_checkpoint, save_checkpoint


def lr_at(cfg: TuneConfig, s: int) -> float:
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    frac = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


def batches(n_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The whole batch order, fixed by the seed (a resumed run sees the same batches)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        idx = list(range(n_items))
        rng.shuffle(idx)
        order += idx
    return [order[s * batch_size: (s + 1) * batch_size] for s in range(steps)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_loop(stage: str, cfg: TuneConfig, roles: Roles, n_items: int, step_fn, eval_fn, work: Path,
                progress: bool) -> tuple[list[dict], float, bool]:
    """Optimise with AdamW, evaluating, checkpointing and showing progress. step_fn(s, batch) -> metrics
    (gradients accumulated); eval_fn() -> metrics. Returns (history, seconds, finished)."""
    view = TrainableView(roles)

    def opt_factory(_m):
        return torch.optim.AdamW(roles.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)

    ckpt = work / "checkpoint"
    if (ckpt / "progress.json").exists():
        _, opt, start, history = load_checkpoint(ckpt, view, opt_factory)
    else:
        opt, start, history = opt_factory(view), 0, []
    order = batches(n_items, cfg.batch_size, cfg.steps, cfg.seed + 2)
    t0 = time.time()
    ran = 0
    key = "objective" if stage == "meanfield" else "train_loss"
    with Progress(TextColumn(f"[bold]train {stage}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task(stage, total=cfg.steps, completed=start, info="")
        for s in range(start, cfg.steps):
            if cfg.interrupt_after is not None and ran >= cfg.interrupt_after:
                save_checkpoint(ckpt, view, opt, s, history)
                return history, time.time() - t0, False
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, s)
            row = {"step": s + 1, **step_fn(s, order[s]), "lr": lr_at(cfg, s)}
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(roles.parameters(), cfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
                row.update({f"val_{k}": v for k, v in eval_fn().items()})
            history.append(row)
            ran += 1
            info = f"{key} {row[key]:.3f}" + "".join(f" {k} {v:.3f}" for k, v in row.items()
                                                      if k.startswith("val_") and k != "val_action_nll_per_token")
            if "val_action_nll_per_token" in row:
                info += f" val {row['val_action_nll_per_token']:.3f}"
            bar.update(task, advance=1, info=info)
            if (s + 1) % cfg.ckpt_every == 0 and s + 1 < cfg.steps:
                save_checkpoint(ckpt, view, opt, s + 1, history)
    return history, time.time() - t0, True


def prepare_work(cfg: TuneConfig, stage: str) -> Path:
    """OUT/_work with the stage's config; a rerun with other settings must not resume the old checkpoint."""
    work = Path(cfg.out) / "_work"
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "config.json"
    mine = {k: v for k, v in cfg.model_dump().items()
            if k not in ("interrupt_after", "threads", "eval_every", "ckpt_every", "device", "micro_batch")}
    mine["stage"] = stage
    if saved.exists():
        old = json.loads(saved.read_text())
        if old != json.loads(json.dumps(mine)):
            diff = sorted(k for k in set(old) | set(mine) if old.get(k) != json.loads(json.dumps(mine)).get(k))
            raise ConfigError(f"{cfg.out} holds an unfinished {old.get('stage')} run with other settings "
                              f"({', '.join(diff)}); rerun with the same options or use a new --out")
    else:
        atomic_write_json(saved, mine, indent=1)
    return work


def finish_stage(cfg: TuneConfig, roles: Roles, role: str, info: dict) -> dict:
    out = Path(cfg.out)
    roles.save_role(role, out)
    info["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if roles.device.startswith("cuda"):
        info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    info["trainable_parameters"] = sum(p.numel() for p in roles.parameters())
    info["base_parameters"] = sum(p.numel() for n, p in roles.base.named_parameters() if "lora_" not in n)
    atomic_write_json(out / "training_info.json", info)
    shutil.rmtree(out / "_work", ignore_errors=True)
    return info


def last_val(history: list[dict]) -> dict:
    """The last validation metrics of a run (without the val_ prefix)."""
    for h in reversed(history):
        v = {k[4:]: x for k, x in h.items() if k.startswith("val_")}
        if v:
            return v
    return {}


def stage_roles(cfg: TuneConfig, trainable: str, frozen: str, frozen_path: str | None) -> tuple[Roles, str | None]:
    """The base model with the stage's trainable role and, if given, the other role frozen from disk
    (returned as its name, None when the base model plays it)."""
    roles = Roles(cfg.base, cfg.device, cfg.dtype, cfg.threads)
    roles.add_trainable(trainable, full=cfg.full, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                        dropout=cfg.lora_dropout, target_modules=cfg.target_modules, seed=cfg.seed)
    if not frozen_path:
        return roles, None
    roles.load_frozen(frozen, frozen_path)
    return roles, frozen


def is_done(out: str | os.PathLike) -> bool:
    return (Path(out) / "training_info.json").is_file()
