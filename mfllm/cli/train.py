"""`mfllm train ...`: train mfllm-mini from scratch; IB-Tune (mean field, policy) is added by ibtune."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated

import typer
from rich.console import Console

from mfllm.cli.data import loading_progress
from mfllm.cli.errors import user_errors
from mfllm.paths import MINI_MODEL

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
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Train mfllm-mini from scratch on the training split (about an hour on a 2-core CPU by default).

    Resumable: rerun the same command after an interruption and it continues from the last checkpoint.
    """
    from pathlib import Path

    from mfllm.training.mini import MiniConfig, prepare_examples, train_mini  # torch: loaded when run

    cfg = MiniConfig(data=data, out=out, steps=steps, seed=seed, hidden=hidden, layers=layers,
                     heads=max(1, hidden // 64), intermediate=int(hidden * 2.75) // 8 * 8,
                     agents_per_event=agents_per_event, max_train_events=max_train_events, threads=threads,
                     examples=examples, device=device, batch_size=batch_size)
    loading = partial(loading_progress, quiet)
    with user_errors():
        if prepare_only:
            p = prepare_examples(cfg, Path(out) / "_work" / "examples.jsonl.gz", loading)
            console.print(f"[green]examples[/] -> {p}")
            return
        info = train_mini(cfg, progress=not quiet, loading=loading)
    console.print(mini_summary(info, out), highlight=False)


@train_app.command("decide")
def train_decide_command(
    data: str = typer.Option(..., help="CED folder (or any loadable data); only its train split is used."),
    out: str = typer.Option(..., help="Run folder (checkpoints in OUT/_work; resumable); the model is written to OUT."),
    init: str = typer.Option(None, help="Weights + tokenizer to fine-tune. Default: the shipped mfllm-mini."),
    steps: int = typer.Option(None, help="Optimizer steps (each: --rows-per-step packed event-steps of ~16 actions)."),
    rows_per_step: int = typer.Option(None, help="Packed event-steps per optimizer step."),
    header_weight: float = typer.Option(None, help="Loss weight of the decision-header tokens (text tokens: 1)."),
    seed: int = typer.Option(None, help="Seed (data order, init of nothing else: weights come from --init)."),
    threads: int = typer.Option(None, help="CPU threads for torch (default 2)."),
    config: str = typer.Option(None, help="A JSON file with any DecideConfig fields (options override it)."),
):
    """Fine-tune a policy that decides, then writes: a decision header of 4 label tokens, then the action text,
    after the exact inference prompt with the compact stats mean field (mfllm/assets/models/mfllm-decide's recipe).

    Every option's default is DecideConfig's (mfllm/training/decide/train.py). Resumable: rerun the same command.
    """
    from pathlib import Path

    from mfllm.errors import ConfigError, from_validation
    from mfllm.training.decide.train import DecideConfig, train_decide  # torch: loaded when run

    with user_errors():
        fields: dict = {}
        if config:
            try:
                fields = json.loads(Path(config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{config}: cannot read a JSON config ({e})", field="config") from None
        given = {"init": init or fields.get("init") or str(MINI_MODEL), "steps": steps,
                 "rows_per_step": rows_per_step, "header_weight": header_weight, "seed": seed, "threads": threads}
        fields.update({k: v for k, v in given.items() if v is not None})
        try:
            cfg = DecideConfig(data=data, out=out, **{k: v for k, v in fields.items() if k not in ("data", "out")})
        except ValueError as e:
            raise from_validation(e) from None
        info = train_decide(cfg, log=lambda m: console.print(m, highlight=False))
    console.print(f"[green]decide model[/] -> {out}: {info.get('steps_done')} steps, "
                  f"{info.get('examples_seen')} examples, {info.get('train_seconds')} s", highlight=False)


def mini_summary(info: dict, out: str) -> str:
    """What a finished `train mini` says (training_info.json holds everything)."""
    val, base = info["val"]["policy"]["nll_per_token"], info["unigram_baseline"]["nll_per_token"]
    return (f"[green]trained[/] {info['parameters'] / 1e6:.1f}M parameters on {info['tokens_seen']:,} tokens in "
            f"{info['train_seconds']:.0f}s -> {out}\n"
            f"  validation: {val:.3f} nats per action token (unigram baseline {base:.3f}: "
            f"{100 * (1 - val / base):.0f}% lower); details in {out}/training_info.json, curve in loss_curve.png")


# ----------------------------------------------------------------------------- IB-Tune (docs/ibtune.md)

_BASE_HELP = "Base model: any Hugging Face causal LM folder (safetensors). Default: the shipped mfllm-mini."
_MAX_NEW_HELP = ("Longest summary m in tokens: the simulation's LLM mean-field max_new_tokens (prompt + it must fit "
                 "the model's context; 64 fits mfllm-mini's 320 at --step-size 8, 160 is the default for larger models).")
_STEP_HELP = ("Agents per step: the simulation's --step-size (8 for mfllm-mini with the LLM mean field, whose "
              "prompt of 16 replies exceeds mini's context; 16 for larger models).")
_SPLIT_HELP = "Split trained on (train; `all` only for demos on data that has no train split, e.g. the sample)."


# Options shared by `train meanfield`, `train policy` and `train ib-tune` (one definition each).
Data = Annotated[str, typer.Option(help="Events (CED folder, JSONL, Rumdect); only --split is trained on, val on val.")]
Base = Annotated[str, typer.Option(help=_BASE_HELP)]
LoraRank = Annotated[int, typer.Option(help="LoRA rank (attention and MLP projections).")]
LoraAlpha = Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / rank).")]
Full = Annotated[bool, typer.Option(help="Full fine-tuning instead of LoRA (writes a whole model folder).")]
MaxNew = Annotated[int, typer.Option(help=_MAX_NEW_HELP)]
StepSize = Annotated[int, typer.Option(help=_STEP_HELP)]
MaxSteps = Annotated[int, typer.Option(help="Steps used per event (from --first-step on).")]
FirstStep = Annotated[int, typer.Option(help="Skip each event's first steps: 6 at step size 8 trains on what follows "
                                             "a 48-action warm-up, as the rollout does (default 0: from the start).")]
MaxEvents = Annotated[int, typer.Option(help="Use at most this many training events.")]
ValEvents = Annotated[int, typer.Option(help="Validation events (val split).")]
Split = Annotated[str, typer.Option(help=_SPLIT_HELP)]
ValSplit = Annotated[str, typer.Option(help="Split used for validation.")]
Seed = Annotated[int, typer.Option(help="Seed (data, LoRA init, samples).")]
Device = Annotated[str, typer.Option(help="cpu | cuda | auto.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16.")]
Threads = Annotated[int, typer.Option(help="CPU threads for torch.")]
Quiet = Annotated[bool, typer.Option(help="No progress bar.")]


def _tune_config(**kw):
    from mfllm.training.ibtune import TuneConfig  # torch: loaded when run

    kw["base"] = kw.get("base") or str(MINI_MODEL)
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
    data: Data,
    out: Annotated[str, typer.Option(help="Output adapter folder (peft: adapter_config.json + "
                                          "adapter_model.safetensors).")],
    base: Base = None,
    lora_rank: LoraRank = 16,
    lora_alpha: LoraAlpha = 32,
    full: Full = False,
    beta: Annotated[float, typer.Option(help="Weight of the compression term KL(q(m|X) || p0(m)).")] = 0.05,
    length_penalty: Annotated[float, typer.Option(help="Penalty per token of m (in nats).")] = 0.0,
    pathwise_kl: Annotated[bool, typer.Option(help="Include the KL term's pathwise gradient (zero-mean).")] = True,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 1e-3,
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Histories per step (each with --samples-k summaries).")] = 4,
    samples_k: Annotated[int, typer.Option(help="Summaries sampled per history (>= 2, leave-one-out "
                                                "baseline).")] = 4,
    targets: Annotated[int, typer.Option(help="Next-step actions scored per history (|Y|).")] = 8,
    previous: Annotated[str, typer.Option(help="m_{t-1} in the prompt: chain (the summariser's own) | "
                                               "stats.")] = "chain",
    policy_adapter: Annotated[str, typer.Option(help="Frozen policy adapter that scores R (default: the base "
                                                     "model).")] = None,
    max_new_tokens: MaxNew = 64,
    step_size: StepSize = 8,
    max_steps: MaxSteps = 8,
    first_step: FirstStep = 0,
    max_events: MaxEvents = None,
    val_events: ValEvents = 16,
    split: Split = "train",
    val_split: ValSplit = "val",
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    eval_every: Annotated[int, typer.Option(help="Validate every this many steps.")] = 15,
    quiet: Quiet = False,
):
    """IB-Tune stage 1: train the mean-field adapter (REINFORCE with a leave-one-out baseline, see docs/ibtune.md).

    Resumable: rerun the same command after an interruption.
    """
    opts = {k: v for k, v in locals().items() if k != "quiet"}
    from mfllm.training.ibtune import train_meanfield  # torch: loaded when run

    with user_errors():
        info = train_meanfield(_tune_config(**opts), progress=not quiet)
    _report({"meanfield": info})


@train_app.command("policy")
def train_policy_command(
    data: Data,
    out: Annotated[str, typer.Option(help="Output adapter folder (peft: adapter_config.json + "
                                          "adapter_model.safetensors).")],
    base: Base = None,
    meanfield_adapter: Annotated[str, typer.Option(help="Adapter that writes m_t (IB-Tuned); default: the "
                                                        "untuned base.")] = None,
    context: Annotated[str, typer.Option(help="mf (m_t from the summariser) | state (SFT without mean "
                                              "field).")] = "mf",
    lora_rank: LoraRank = 16,
    lora_alpha: LoraAlpha = 32,
    full: Full = False,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 3e-4,
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 60,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    agents_per_step: Annotated[int, typer.Option(help="Agents sampled per simulation step of an event.")] = 4,
    max_new_tokens: MaxNew = 64,
    step_size: StepSize = 8,
    max_steps: MaxSteps = 8,
    first_step: FirstStep = 0,
    max_events: MaxEvents = None,
    val_events: ValEvents = 16,
    split: Split = "train",
    val_split: ValSplit = "val",
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    eval_every: Annotated[int, typer.Option(help="Validate every this many steps.")] = 20,
    quiet: Quiet = False,
):
    """IB-Tune stage 2: supervised fine-tuning of the policy adapter on (event, state, m_t) -> real action.

    Resumable: rerun the same command after an interruption.
    """
    opts = {k: v for k, v in locals().items() if k != "quiet"}
    from mfllm.training.ibtune import train_policy  # torch: loaded when run

    with user_errors():
        info = train_policy(_tune_config(**opts), progress=not quiet)
    _report({"policy": info})


@train_app.command("ib-tune")
def train_ibtune_command(
    data: Data,
    out: Annotated[str, typer.Option(help="Output folder: OUT/meanfield, OUT/policy, OUT/policy-sft "
                                          "(adapters).")],
    base: Base = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (both roles).")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (both roles).")] = 32,
    full: Annotated[bool, typer.Option(help="Full fine-tuning instead of LoRA (whole model folders).")] = False,
    beta: Annotated[float, typer.Option(help="Stage 1: weight of the KL compression term.")] = 0.05,
    length_penalty: Annotated[float, typer.Option(help="Stage 1: penalty per token of m.")] = 0.0,
    lr: Annotated[float, typer.Option(help="Stage 1 learning rate.")] = 1e-3,
    steps: Annotated[int, typer.Option(help="Stage 1 steps.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Stage 1 histories per step.")] = 4,
    samples_k: Annotated[int, typer.Option(help="Stage 1 summaries per history (>= 2).")] = 4,
    targets: Annotated[int, typer.Option(help="Stage 1 next-step actions scored per history.")] = 8,
    previous: Annotated[str, typer.Option(help="Stage 1 m_{t-1}: chain | stats.")] = "chain",
    policy_lr: Annotated[float, typer.Option(help="Stage 2 learning rate.")] = 3e-4,
    policy_steps: Annotated[int, typer.Option(help="Stage 2 steps (each variant).")] = 60,
    policy_batch_size: Annotated[int, typer.Option(help="Stage 2 examples per step.")] = 8,
    sft_baseline: Annotated[bool, typer.Option(help="Also train OUT/policy-sft: SFT with the state context "
                                                    "(no MF).")] = True,
    policy_base_mf: Annotated[bool, typer.Option(help="Also train OUT/policy-basemf: SFT on m_t of the "
                                                      "untuned summariser.")] = False,
    max_new_tokens: MaxNew = 64,
    step_size: StepSize = 8,
    max_steps: MaxSteps = 8,
    first_step: FirstStep = 0,
    max_events: MaxEvents = None,
    val_events: ValEvents = 16,
    split: Split = "train",
    val_split: ValSplit = "val",
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    eval_every: Annotated[int, typer.Option(help="Stage 1: validate every this many steps (stage 2: every "
                                                 "20).")] = 15,
    quiet: Quiet = False,
):
    """IB-Tune both stages: the mean-field adapter, then the policy on m_t written by it (+ baselines).

    Resumable: finished stages are skipped and an interrupted one continues from its checkpoint.
    """
    from mfllm.training.ibtune import IBTunePlan, ib_tune  # torch: loaded when run

    common = dict(data=data, base=base, lora_rank=lora_rank, lora_alpha=lora_alpha, full=full,
                  max_new_tokens=max_new_tokens, step_size=step_size, max_steps=max_steps, first_step=first_step,
                  max_events=max_events, val_events=val_events, split=split, val_split=val_split, seed=seed,
                  device=device, dtype=dtype, threads=threads)
    with user_errors():
        s1 = _tune_config(out=str(out), beta=beta, length_penalty=length_penalty, lr=lr, steps=steps,
                          batch_size=batch_size, samples_k=samples_k, targets=targets, previous=previous,
                          eval_every=eval_every, **common)
        s2 = _tune_config(out=str(out), lr=policy_lr, steps=policy_steps, batch_size=policy_batch_size,
                          eval_every=20, **common)
        infos = ib_tune(IBTunePlan(s1, s2, sft_baseline=sft_baseline, policy_base_mf=policy_base_mf), out,
                        progress=not quiet)
    _report(infos)
    console.print(f"[green]adapters[/] -> {out}/meanfield, {out}/policy"
                  + (f", {out}/policy-sft" if sft_baseline else "") + (f", {out}/policy-basemf" if policy_base_mf else ""))
