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
