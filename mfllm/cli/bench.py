"""`mfllm bench ...`: benchmarks that print numbers (mounted by mfllm/cli/main.py as ``bench_app``).

One shared typer sub-app; each benchmark adds its command here:

- ``fidelity``: every method (mf, state, recent, popular, ablations) on the same events, model, seeds
  and warm-up, evaluated against the real reactions and the LLM-free baselines -> OUT/results.json and
  OUT/results.md (mfllm/bench/fidelity/, docs/results.md).
- ``throughput``: agents per second of the engine vs a one-agent-at-a-time baseline, tokens per agent across
  population sizes, share of the matmul peak, peak memory -> --json OUT (mfllm/bench/throughput.py,
  docs/performance.md).

User mistakes print one clear line and exit non-zero; an interrupted bench continues when the same
command is run again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mfllm.bench.fidelity.settings import FidelitySettings
from mfllm.cli.errors import fail
from mfllm.errors import MfllmError, from_validation
from mfllm.files import atomic_write_text
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA

_FID_DEFAULTS = FidelitySettings.model_fields  # the CLI's defaults come from the settings model
bench_app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _ints(text: str | None, name: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MfllmError(f"--{name}: expected comma-separated integers, got {text!r}") from None


@bench_app.command("fidelity")
def fidelity_command(
    out: Annotated[Path, typer.Option(help="Bench directory: runs/<row>/ (run directories), results.json, "
                                           "results.md, cost.json. Re-running continues where it stopped.")],
    data: Annotated[str | None, typer.Option(help="Events (CED root, Rumdect, JSONL). Default: the shipped "
                                                  "sample of 40 real CED test events.")] = None,
    split: Annotated[str, typer.Option(help="train | val | test | all (deterministic by event id).")] = "all",
    limit: Annotated[int | None, typer.Option(help="At most this many events (in id order, among those long "
                                                   "enough for warm-up + --min-rollout).")] = None,
    events: Annotated[str | None, typer.Option(help="Comma-separated event ids.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated rows: mf, state, recent, popular; ablations "
                                              "mf-llm (LLM mean field), mf-tf (teacher forcing), diagnostics "
                                              "mf-empty (empty mean field), mf-shuffled (another event's); none: only "
                                              "the LLM-free rows.")]
    = "mf,state,recent,popular",
    variant: Annotated[list[str] | None, typer.Option(
        help="Extra row NAME=BASE[:key=val,...]; keys meanfield|mf (stats|llm), tf (true|false), "
             "policy (adapter dir), mfa (mean-field adapter dir), context (own|empty|shuffled), mfmax (the llm "
             "mean field's summary budget), decay (stats mean field memory, 0..1), temp (0..5) and top_p (the "
             "policy's sampling), mfheader (true|false: a decide model's mean field counts its headers). "
             "E.g. mf-ib=mf:policy=ckpt/policy. Repeatable.")] = None,
    model: Annotated[str | None, typer.Option(help=f"Model path or name. Default: the shipped {DEFAULT_MODEL.name}.")] = None,
    backend: Annotated[str, typer.Option(help="hf (local transformers) | openai | vllm.")] = "hf",
    base_url: Annotated[str | None, typer.Option(help="openai backend: server URL.")] = None,
    api: Annotated[str | None, typer.Option(help="openai backend: completions | chat.")] = None,
    device: Annotated[str | None, typer.Option(help="hf backend: auto | cpu | cuda | mps.")] = None,
    labeler: Annotated[str, typer.Option(help="Labeler for the 9 dimensions (rules: offline).")] = "rules",
    label_cache: Annotated[Path | None, typer.Option(help="SQLite label cache. Default: "
                                                          "~/.cache/mfllm/labels.sqlite.")] = None,
    no_label_cache: Annotated[bool, typer.Option("--no-label-cache", help="No label cache.")] = False,
    marginal: Annotated[Path | None, typer.Option(help="Marginal baseline JSON (`mfllm marginal`). Default: "
                                                       "the packaged one for the labeler.")] = None,
    seed: Annotated[int, typer.Option(help="Seed (the same for every row).")] = 0,
    warmup: Annotated[int, typer.Option(help="Real actions fed before the rollout (the main table's).")] = 48,
    warmups: Annotated[str | None, typer.Option(help="Warm-up sweep, e.g. 16,48,96: every row per warm-up "
                                                     "and a sensitivity table.")] = None,
    max_agents: Annotated[int | None, typer.Option(help="Simulate at most this many rollout agents "
                                                        "per event.")] = None,
    step_size: Annotated[int, typer.Option(help="Agents per step (= per evaluation bin).")] = 16,
    meanfield: Annotated[str, typer.Option(help="Mean-field model of the mf rows: stats | llm.")] = "stats",
    events_in_flight: Annotated[int | None, typer.Option(help="Events advanced together per batched round "
                                                              "(does not change results).")] = None,
    policy_adapter: Annotated[str | None, typer.Option(help="IB-Tune policy adapter dir for every row.")] = None,
    meanfield_adapter: Annotated[str | None, typer.Option(help="IB-Tune mean-field adapter dir "
                                                               "(rows with the llm mean field).")] = None,
    label: Annotated[str | None, typer.Option(help="A label for this bench (e.g. the adapters' name), "
                                                   "shown in results.md.")] = None,
    min_rollout: Annotated[int, typer.Option(help="Select only events with at least max(warm-ups) + this "
                                                  "many actions.")] = 16,
    reference: Annotated[str, typer.Option(help="The row every other mean-field row is compared with in the "
                                                "ablation table (e.g. an untuned mf-llm variant).")] = "mf",
    bin_by: Annotated[str, typer.Option(help="Evaluation bins: steps | actions | seconds.")] = "steps",
    bin_size: Annotated[float, typer.Option(help="Steps / actions / seconds per bin.")] = 1,
    reports: Annotated[bool, typer.Option(help="Also write each run's plots/ and report.html.")] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the relative-KL intervals.")] = 2000,
    replicas: Annotated[int, typer.Option(help="Seeded crowds per event for every simulated and sampled row "
                                               "(runs/ROW/r0, r1, ...), pooled per bin when scored.")]
    = _FID_DEFAULTS["replicas"].default,
    alpha: Annotated[float, typer.Option(help="Pseudo-count per category of the fair scoring rule (additive "
                                              "smoothing of both sides' counts, KL and JS).")]
    = _FID_DEFAULTS["alpha"].default,
    train_events: Annotated[int, typer.Option(help="Training-split events the mf-oracle and marginal-sampled "
                                                   "rows are built from.")]
    = _FID_DEFAULTS["train_events"].default,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Run every method on the same events and score them side by side (the paper's table).

    Example (a few minutes on a CPU): mfllm bench fidelity --data mfllm/assets/ced-sample --limit 10
    --max-agents 96 --out runs/fid-sample
    """
    from mfllm.bench.fidelity import run_fidelity

    con = Console(stderr=True)
    try:
        opts = {k: v for k, v in {"base_url": base_url, "api": api, "device": device}.items() if v}
        s = FidelitySettings(
            out=str(out), data=data, split=split, limit=limit,
            events=[e.strip() for e in events.split(",") if e.strip()] if events else None,
            methods=methods, variants=list(variant or []), model=model, backend=backend, backend_options=opts,
            labeler=labeler, label_cache="" if no_label_cache else (str(label_cache) if label_cache else None),
            marginal=str(marginal) if marginal else None, seed=seed, warmup=warmup,
            warmups=_ints(warmups, "warmups"), max_agents=max_agents, step_size=step_size, meanfield=meanfield,
            events_in_flight=events_in_flight, policy_adapter=policy_adapter, meanfield_adapter=meanfield_adapter,
            label=label, min_rollout=min_rollout, reference=reference, bin_by=bin_by, bin_size=bin_size, reports=reports,
            bootstrap=bootstrap, replicas=replicas, alpha=alpha, train_events=train_events,
            progress=not quiet)
        r = run_fidelity(s, console=con)
    except MfllmError as e:
        raise fail(e) from None
    except ValueError as e:  # pydantic validation of options
        raise fail(from_validation(e)) from None
    print_summary(r)
    con.print(f"[green]wrote[/] {out / 'results.json'} and {out / 'results.md'}", highlight=False)


def print_summary(r: dict) -> None:
    """The long-horizon table and the headline relative KL, on stdout."""
    from rich.table import Table

    from mfllm.bench.fidelity import TABLE_METRICS

    t = Table(title=f"fidelity, long horizon, {r['n_events']} events (mean ± std over events)")
    t.add_column("method")
    for m in TABLE_METRICS:
        t.add_column(m, justify="right")
    for row in r["rows"]:
        cells = []
        for m in TABLE_METRICS:
            v, sp = r["methods"][row][m]["long"], r["spread"][row][m]["long"]
            cells.append("-" if v is None else f"{v:.3f}" + (f" ± {sp['std']:.3f}" if sp["std"] is not None else ""))
        t.add_row(row, *cells)
    Console().print(t)
    for row, per_h in r["relative_kl"].items():
        for h in ("short", "mid", "long"):
            e = per_h[h]
            parts = []
            for k in ("vs_best_non_mf", "vs_persistence"):
                c = e.get(k)
                if c and c.get("change") is not None:
                    ci = c.get("change_ci95")
                    parts.append(f"{k[3:]} ({c['against']}): {100 * c['change']:+.1f}%"
                                 + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""))
            Console().print(f"relative KL {row} {h}: " + "; ".join(parts), highlight=False)


@bench_app.command("model")
def model_command(
    data: str = typer.Option(str(SAMPLE_DATA), help="Held-out events (default: the shipped test-split sample)."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Model directory (HF format)."),
    split: str = typer.Option("test", help="Which split's events to score (never the training split)."),
    limit: int = typer.Option(20, help="Events."),
    agents: int = typer.Option(16, help="Actions scored per event."),
    seed: int = typer.Option(0, help="Seed for the sampled actions and generations."),
    json_out: Path = typer.Option(None, "--json", help="Also write the report as JSON."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Policy model quality: NLL of real actions per method's prompt vs the unigram baseline, whether
    the model reads the mean field (empty / another event's mean field), repost share, samples, speed."""
    import json

    from mfllm.bench.model_quality import model_report

    try:
        r = model_report(model, data, split=split, limit=limit, agents_per_event=agents, seed=seed, progress=not quiet)
    except MfllmError as e:
        raise fail(e) from None
    for name, v in r["nll"].items():
        typer.echo(f"{name:10s} {v['nll_per_char']:.3f} nats/char  {v['nll_per_token']:.3f} nats/token")
    typer.echo(f"plain reposts: simulated {r['repost_share']['simulated']:.1%}, real {r['repost_share']['real']:.1%}")
    typer.echo(f"generation: {r['agents_per_s']:.1f} agents/s ({r['actions']} agents in one batched call)")
    for s in r["samples"]:
        typer.echo(f"  {s['real'][:30]!r} -> {s['simulated'][:30]!r}")
    if json_out:
        atomic_write_text(json_out, json.dumps(r, ensure_ascii=False, indent=1))


@bench_app.command("throughput")
def throughput_command(
    agents: Annotated[str, typer.Option(help="Population sizes N (comma-separated): one event extended to N "
                                             "agents each (real agents first, then resampled profiles).")]
    = "100,1000,10000,100000",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    model: Annotated[str | None, typer.Option(help=f"Model path or name. Default: the shipped {DEFAULT_MODEL.name}.")] = None,
    backend: Annotated[str, typer.Option(help="hf (local transformers) | openai | vllm.")] = "hf",
    base_url: Annotated[str | None, typer.Option(help="openai backend: server URL.")] = None,
    device: Annotated[str | None, typer.Option(help="hf backend: auto | cpu | cuda | mps.")] = None,
    naive_agents: Annotated[int, typer.Option(help="Agents the one-at-a-time baseline simulates.")] = 64,
    step_size: Annotated[int, typer.Option(help="Agents per step (mean-field update after each).")] = 512,
    batch_size: Annotated[int, typer.Option(help="hf backend: rows per decoding batch.")] = 512,
    threads: Annotated[int | None, typer.Option(help="hf on CPU: torch threads (default: the backend's "
                                                     "rule; 1 for mfllm-mini).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generated tokens per agent at most.")] = 48,
    warmup: Annotated[int, typer.Option(help="Real actions fed to the mean field before the rollout.")] = 48,
    data: Annotated[str | None, typer.Option(help="Events (default: the shipped sample).")] = None,
    event: Annotated[str | None, typer.Option(help="Event id (default: the one with the most real actions).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    keep_runs: Annotated[Path | None, typer.Option(help="Keep the run directories here.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Agents per second of the engine vs a one-agent-at-a-time baseline, tokens per agent across
    population sizes, share of the machine's matmul peak, peak memory (all in one run).

    Example: mfllm bench throughput --agents 100,1000,10000 --json runs/throughput.json
    """
    import shlex

    from mfllm.bench.throughput import ThroughputSettings, run_throughput, write_json

    con = Console(stderr=True)
    try:
        sizes = _ints(agents, "agents")
        if not sizes:
            raise MfllmError("--agents: give at least one population size")
        opts = {k: v for k, v in {"base_url": base_url, "device": device}.items() if v}
        s = ThroughputSettings(
            agents=sizes, naive_agents=naive_agents, data=data, event=event, model=model, backend=backend,
            backend_options=opts, batch_size=batch_size, num_threads=threads, step_size=step_size, warmup=warmup,
            max_new_tokens=max_new_tokens, seed=seed, keep_runs=str(keep_runs) if keep_runs else None,
            progress=False)
        s.command = "mfllm bench throughput " + " ".join(shlex.quote(a) for a in s.as_args())
        r = run_throughput(s, log=None if quiet else (lambda m: con.print(m, highlight=False)))
    except MfllmError as e:
        raise fail(e) from None
    except ValueError as e:  # pydantic validation of options
        raise fail(from_validation(e)) from None
    n = r["engine"][-1]["agents"]
    typer.echo(f"engine: {r['agents_per_s']} agents/s at N={n}; naive (one agent per call): "
               f"{r['naive']['agents_per_s']} agents/s; speed-up {r['speedup']}x "
               f"({r['speedup_cpu_time']}x on CPU time: {r['agents_per_cpu_s']} agents per CPU-second)")
    typer.echo("tokens per agent (mf): " + ", ".join(f"N={k}: {v}" for k, v in r["tokens_per_agent"].items()))
    fh = r["context_growth"]["full-history"]
    typer.echo("tokens per agent (full history, computed): " + ", ".join(f"N={k}: {v}" for k, v in fh.items()))
    pf = r["peak_fraction"]
    typer.echo(f"peak fraction: {pf if pf is None else f'{100 * pf:.1f}%'}; peak RSS {r['peak_rss_mb']} MB; "
               f"load {r['load_avg_start']} -> {r['load_avg_end']}")
    if json_out:
        write_json(r, json_out)
        con.print(f"[green]wrote[/] {json_out}", highlight=False)
