"""`mfllm train ...`: train mfllm-mini from scratch; IB-Tune (mean field, policy) is added by ibtune."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from mfllm.errors import MfllmError

train_app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@train_app.command("mini")
def train_mini_command(
    data: str = typer.Option(..., help="CED folder (or any loadable data); only its train split is used."),
    out: str = typer.Option(..., help="Output model folder (HF format: config, safetensors, tokenizer)."),
    steps: int = typer.Option(1200, help="Optimisation steps (batch 16)."),
    seed: int = typer.Option(1234, help="Seed (data sampling, init, batch order)."),
    hidden: int = typer.Option(256, help="Hidden size."),
    layers: int = typer.Option(4, help="Transformer layers."),
    agents_per_event: int = typer.Option(24, help="Policy examples sampled per training event."),
    max_train_events: int = typer.Option(None, help="Use only this many training events (quick runs)."),
    threads: int = typer.Option(None, help="CPU threads for torch."),
    device: str = typer.Option("auto", help="cpu | cuda | auto. The default size is a CPU hour; on a GPU try --steps 8000."),
    batch_size: int = typer.Option(16, help="Sequences per optimisation step."),
    examples: str = typer.Option(None, help="Prebuilt examples (.jsonl.gz from --prepare-only): train without the raw data."),
    prepare_only: bool = typer.Option(False, help="Only build the examples file (OUT/_work/examples.jsonl.gz) and stop."),
):
    """Train mfllm-mini from scratch on the training split (about an hour on a 2-core CPU by default).

    Resumable: rerun the same command after an interruption and it continues from the last checkpoint.
    """
    from pathlib import Path

    from mfllm.training.mini import MiniConfig, prepare_examples, train_mini

    cfg = MiniConfig(data=data, out=out, steps=steps, seed=seed, hidden=hidden, layers=layers,
                     heads=max(1, hidden // 64), intermediate=int(hidden * 2.75) // 8 * 8,
                     agents_per_event=agents_per_event, max_train_events=max_train_events, threads=threads,
                     examples=examples, device=device, batch_size=batch_size)
    try:
        if prepare_only:
            p = prepare_examples(cfg, Path(out) / "_work" / "examples.jsonl.gz")
            console.print(f"[green]examples[/] -> {p}")
            return
        info = train_mini(cfg)
    except MfllmError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(getattr(e, "exit_code", 2)) from None
    console.print(json.dumps({k: info[k] for k in ("parameters", "tokens_seen", "train_seconds", "val",
                                                    "unigram_baseline")}, indent=1))


# ----------------------------------------------------------------------------- IB-Tune (docs/ibtune.md)

_BASE_HELP = "Base model: any Hugging Face causal LM folder (safetensors). Default: the shipped mfllm-mini."
_MAX_NEW_HELP = ("Longest summary m in tokens: the simulation's LLM mean-field max_new_tokens (prompt + it must fit "
                 "the model's context; 64 fits mfllm-mini's 320 at --step-size 8, 160 is the default for larger models).")
_STEP_HELP = ("Agents per step: the simulation's --step-size (8 for mfllm-mini with the LLM mean field, whose "
              "prompt of 16 replies exceeds mini's context; 16 for larger models).")
_SPLIT_HELP = "Split trained on (train; `all` only for demos on data that has no train split, e.g. the sample)."


def _tune_config(**kw):
    from mfllm.paths import DEFAULT_MODEL
    from mfllm.training.ibtune import TuneConfig

    kw["base"] = kw.get("base") or str(DEFAULT_MODEL)
    kw["targets_per_unit"] = kw.pop("targets", 8)
    kw["mf_max_new_tokens"] = kw.pop("max_new_tokens", 160)
    kw["pathwise_kl"] = kw.pop("pathwise_kl", True)
    return TuneConfig(**{k: v for k, v in kw.items() if v is not None or k in ("max_events", "threads")})


def _report(infos: dict) -> None:
    rows = {}
    for name, i in infos.items():
        rows[name] = {k: i.get(k) for k in ("finished", "train_seconds", "total_seconds", "peak_rss_mb",
                                             "val_before", "val_reference")
                      if i.get(k) is not None}
        after = i.get("val_after") or {}
        rows[name]["val_after"] = after
        out = i.get("config", {}).get("out")
        if out:
            rows[name]["path"] = out
    console.print_json(json.dumps(rows, ensure_ascii=False))


@train_app.command("meanfield")
def train_meanfield_command(
    data: str = typer.Option(..., help="Events (CED folder, JSONL, Rumdect); only --split is trained on, val on val."),
    out: str = typer.Option(..., help="Output adapter folder (peft: adapter_config.json + adapter_model.safetensors)."),
    base: str = typer.Option(None, help=_BASE_HELP),
    lora_rank: int = typer.Option(16, help="LoRA rank (attention and MLP projections)."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha (scale = alpha / rank)."),
    full: bool = typer.Option(False, help="Full fine-tuning instead of LoRA (writes a whole model folder)."),
    beta: float = typer.Option(0.05, help="Weight of the compression term KL(q(m|X) || p0(m))."),
    length_penalty: float = typer.Option(0.0, help="Penalty per token of m (in nats)."),
    pathwise_kl: bool = typer.Option(True, help="Include the KL term's pathwise gradient (zero-mean)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
    steps: int = typer.Option(30, help="Optimisation steps."),
    batch_size: int = typer.Option(4, help="Histories per step (each with --samples-k summaries)."),
    samples_k: int = typer.Option(4, help="Summaries sampled per history (>= 2, leave-one-out baseline)."),
    targets: int = typer.Option(8, help="Next-step actions scored per history (|Y|)."),
    previous: str = typer.Option("chain", help="m_{t-1} in the prompt: chain (the summariser's own) | stats."),
    policy_adapter: str = typer.Option(None, help="Frozen policy adapter that scores R (default: the base model)."),
    max_new_tokens: int = typer.Option(64, help=_MAX_NEW_HELP),
    step_size: int = typer.Option(8, help=_STEP_HELP),
    max_steps: int = typer.Option(8, help="Use each event's first steps only."),
    max_events: int = typer.Option(None, help="Use at most this many training events."),
    val_events: int = typer.Option(16, help="Validation events (val split)."),
    split: str = typer.Option("train", help=_SPLIT_HELP),
    val_split: str = typer.Option("val", help="Split used for validation."),
    seed: int = typer.Option(0, help="Seed (data, LoRA init, samples)."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16."),
    threads: int = typer.Option(None, help="CPU threads for torch."),
    eval_every: int = typer.Option(15, help="Validate every this many steps."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """IB-Tune stage 1: train the mean-field adapter (REINFORCE with a leave-one-out baseline, see docs/ibtune.md).

    Resumable: rerun the same command after an interruption.
    """
    opts = {k: v for k, v in locals().items() if k != "quiet"}
    from mfllm.training.ibtune import train_meanfield

    try:
        cfg = _tune_config(**opts)
        info = train_meanfield(cfg, progress=not quiet)
    except MfllmError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(getattr(e, "exit_code", 2)) from None
    _report({"meanfield": info})


@train_app.command("policy")
def train_policy_command(
    data: str = typer.Option(..., help="Events (CED folder, JSONL, Rumdect); only --split is trained on, val on val."),
    out: str = typer.Option(..., help="Output adapter folder (peft: adapter_config.json + adapter_model.safetensors)."),
    base: str = typer.Option(None, help=_BASE_HELP),
    meanfield_adapter: str = typer.Option(None, help="Adapter that writes m_t (IB-Tuned); default: the untuned base."),
    context: str = typer.Option("mf", help="mf (m_t from the summariser) | state (SFT without mean field)."),
    lora_rank: int = typer.Option(16, help="LoRA rank (attention and MLP projections)."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha (scale = alpha / rank)."),
    full: bool = typer.Option(False, help="Full fine-tuning instead of LoRA (writes a whole model folder)."),
    lr: float = typer.Option(3e-4, help="Peak learning rate (AdamW, warm-up then cosine)."),
    steps: int = typer.Option(60, help="Optimisation steps."),
    batch_size: int = typer.Option(8, help="Examples per step."),
    agents_per_step: int = typer.Option(4, help="Agents sampled per simulation step of an event."),
    max_new_tokens: int = typer.Option(64, help=_MAX_NEW_HELP),
    step_size: int = typer.Option(8, help=_STEP_HELP),
    max_steps: int = typer.Option(8, help="Use each event's first steps only."),
    max_events: int = typer.Option(None, help="Use at most this many training events."),
    val_events: int = typer.Option(16, help="Validation events (val split)."),
    split: str = typer.Option("train", help=_SPLIT_HELP),
    val_split: str = typer.Option("val", help="Split used for validation."),
    seed: int = typer.Option(0, help="Seed (data, LoRA init, samples)."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16."),
    threads: int = typer.Option(None, help="CPU threads for torch."),
    eval_every: int = typer.Option(20, help="Validate every this many steps."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """IB-Tune stage 2: supervised fine-tuning of the policy adapter on (event, state, m_t) -> real action.

    Resumable: rerun the same command after an interruption.
    """
    opts = {k: v for k, v in locals().items() if k != "quiet"}
    from mfllm.training.ibtune import train_policy

    try:
        cfg = _tune_config(**opts)
        info = train_policy(cfg, progress=not quiet)
    except MfllmError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(getattr(e, "exit_code", 2)) from None
    _report({"policy": info})


@train_app.command("ib-tune")
def train_ibtune_command(
    data: str = typer.Option(..., help="Events (CED folder, JSONL, Rumdect); only --split is trained on, val on val."),
    out: str = typer.Option(..., help="Output folder: OUT/meanfield, OUT/policy, OUT/policy-sft (adapters)."),
    base: str = typer.Option(None, help=_BASE_HELP),
    lora_rank: int = typer.Option(16, help="LoRA rank (both roles)."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha (both roles)."),
    full: bool = typer.Option(False, help="Full fine-tuning instead of LoRA (whole model folders)."),
    beta: float = typer.Option(0.05, help="Stage 1: weight of the KL compression term."),
    length_penalty: float = typer.Option(0.0, help="Stage 1: penalty per token of m."),
    lr: float = typer.Option(1e-3, help="Stage 1 learning rate."),
    steps: int = typer.Option(30, help="Stage 1 steps."),
    batch_size: int = typer.Option(4, help="Stage 1 histories per step."),
    samples_k: int = typer.Option(4, help="Stage 1 summaries per history (>= 2)."),
    targets: int = typer.Option(8, help="Stage 1 next-step actions scored per history."),
    previous: str = typer.Option("chain", help="Stage 1 m_{t-1}: chain | stats."),
    policy_lr: float = typer.Option(3e-4, help="Stage 2 learning rate."),
    policy_steps: int = typer.Option(60, help="Stage 2 steps (each variant)."),
    policy_batch_size: int = typer.Option(8, help="Stage 2 examples per step."),
    sft_baseline: bool = typer.Option(True, help="Also train OUT/policy-sft: SFT with the state context (no MF)."),
    policy_base_mf: bool = typer.Option(False, help="Also train OUT/policy-basemf: SFT on m_t of the untuned summariser."),
    max_new_tokens: int = typer.Option(64, help=_MAX_NEW_HELP),
    step_size: int = typer.Option(8, help=_STEP_HELP),
    max_steps: int = typer.Option(8, help="Use each event's first steps only."),
    max_events: int = typer.Option(None, help="Use at most this many training events."),
    val_events: int = typer.Option(16, help="Validation events (val split)."),
    split: str = typer.Option("train", help=_SPLIT_HELP),
    val_split: str = typer.Option("val", help="Split used for validation."),
    seed: int = typer.Option(0, help="Seed."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
    threads: int = typer.Option(None, help="CPU threads for torch."),
    eval_every: int = typer.Option(15, help="Stage 1: validate every this many steps (stage 2: every 20)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """IB-Tune both stages: the mean-field adapter, then the policy on m_t written by it (+ baselines).

    Resumable: finished stages are skipped and an interrupted one continues from its checkpoint.
    """
    from mfllm.training.ibtune import IBTunePlan, ib_tune

    common = dict(data=data, base=base, lora_rank=lora_rank, lora_alpha=lora_alpha, full=full,
                  max_new_tokens=max_new_tokens, step_size=step_size, max_steps=max_steps, max_events=max_events,
                  val_events=val_events, split=split, val_split=val_split, seed=seed, device=device, dtype=dtype,
                  threads=threads)
    try:
        s1 = _tune_config(out=str(out), beta=beta, length_penalty=length_penalty, lr=lr, steps=steps,
                          batch_size=batch_size, samples_k=samples_k, targets=targets, previous=previous,
                          eval_every=eval_every, **common)
        s2 = _tune_config(out=str(out), lr=policy_lr, steps=policy_steps, batch_size=policy_batch_size,
                          eval_every=20, **common)
        infos = ib_tune(IBTunePlan(s1, s2, sft_baseline=sft_baseline, policy_base_mf=policy_base_mf), out,
                        progress=not quiet)
    except MfllmError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(getattr(e, "exit_code", 2)) from None
    _report(infos)
    console.print(f"[green]adapters[/] -> {out}/meanfield, {out}/policy"
                  + (f", {out}/policy-sft" if sft_baseline else "") + (f", {out}/policy-basemf" if policy_base_mf else ""))
