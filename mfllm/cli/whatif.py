"""`mfllm forecast` and `mfllm intervene` (mounted by mfllm/cli/main.py). See docs/whatif.md.

    mfllm forecast --event 2093_zo3d75jHx_2157801852 --observe 48 --horizon 96 --runs 8 --out out/fc
    mfllm forecast --new-event my_event.json --horizon 200 --runs 8 --out out/fc-new
    mfllm intervene --event 2093_zo3d75jHx_2157801852 --spec examples/rebuttal.yaml --runs 8 --out out/iv
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer
from rich.console import Console

from mfllm.cli.errors import err as _err
from mfllm.cli.errors import fail
from mfllm.cli.simulate import model_bars_off, served_model
from mfllm.data.load import load_events
from mfllm.errors import ConfigError, MfllmError, from_validation
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.simulation.config import SimConfig, choices, default
from mfllm.simulation.decision import apply_policy, policy_model
from mfllm.simulation.intervention_spec import parse_spec


def _load_event(data: str, event: str | None):
    if not event:
        raise ConfigError("--event ID is required (see `mfllm data stats DATA` for the ids), or --new-event FILE")
    res = load_events(data, event_ids=[event])
    if not res.events:
        raise ConfigError(f"event {event!r} is not in {data} (see `mfllm data stats {data}`)", field="event")
    return res.events[0]


def _config(method, meanfield, step_size, lang, seed, temperature, top_p, max_new_tokens, model=None, backend="hf"):
    sim = dict(method=method, meanfield=meanfield, step_size=step_size, lang=lang, seed=seed,
               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    return SimConfig(**apply_policy(policy_model(backend, model), sim))  # a decide model: header + its mean field


# The options' defaults are SimConfig's (simulation/config.py: light, the engine is not imported for --help).
DEFAULTS = {k: default(k) for k in ("step_size", "temperature", "top_p", "max_new_tokens")}


def _backend_options(backend: str, base_url, api, api_key_env) -> dict:
    return {"base_url": base_url, "api": api, "api_key_env": api_key_env} if backend == "openai" else {}


# options shared by both commands
_METHOD = typer.Option(default("method"), help=f"Context: {' | '.join(choices('method'))} (mf = mean field).")
_MEANFIELD = typer.Option(default("meanfield"), help=f"Mean-field model: {' | '.join(choices('meanfield'))}.")
_BACKEND = typer.Option("hf", help="hf (local transformers) | openai (OpenAI-compatible server) | vllm.")
_MODEL = typer.Option(None, help=f"Model path or name. Default: the shipped {DEFAULT_MODEL.name} (with --backend "
                      "openai: the server's only model).")
_BASE_URL = typer.Option(None, help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1.")
_API = typer.Option("completions", help="openai backend: completions | chat.")
_KEY = typer.Option("OPENAI_API_KEY", help="openai backend: environment variable holding the key.")
_STEP = typer.Option(default("step_size"), help="Agents per step.")
_LANG = typer.Option(default("lang"), help=f"Prompt language: {' | '.join(choices('lang'))}.")
_SEED = typer.Option(default("seed"), help="Seed (replica r of event ID is the event 'ID#r<r>': its agents' seeds differ).")
_TEMP = typer.Option(default("temperature"), help="Sampling temperature (0 = greedy; 1 = the model's own "
                                                   "distribution).")
_TOP_P = typer.Option(default("top_p"), help="Nucleus sampling (1 = off).")
_MAXTOK = typer.Option(default("max_new_tokens"), help="Most tokens an agent writes.")
_BINS = typer.Option(1, help="Steps per bin of the share trajectories (a bin = bin-steps x step-size agents).")
_LABELER = typer.Option("rules", help="Labeler for the label shares (rules, offline).")
_CACHE = typer.Option(None, help="SQLite label cache. Default: ~/.cache/mfllm/labels.sqlite.")
_NOCACHE = typer.Option(False, help="Do not use the label cache.")
_FORCE = typer.Option(False, help="Replace --out if it holds a previous forecast / intervene output.")
_QUIET = typer.Option(False, help="No progress bar.")


def forecast_command(
    out: Path = typer.Option(..., help="Output folder: forecast.json/.csv/.md/.png and runs/r0.. run dirs."),
    data: str = typer.Option(str(SAMPLE_DATA), help="Events: a CED folder, Rumdect or JSONL file/folder."),
    event: str = typer.Option(None, help="Event id in --data."),
    new_event: Path = typer.Option(None, help="A new event as JSON: source post + early reactions (docs/whatif.md)."),
    observe: int = typer.Option(None, help="Real actions observed (the warm-up W). Default for --new-event: all."),
    horizon: int = typer.Option(None, help="Agents to simulate after the observed ones (H)."),
    horizon_time: float = typer.Option(None, help="Or: simulate the agents arriving this many seconds after the "
                                                  "last observed action."),
    runs: int = typer.Option(8, help="Replicas (R), simulated together with different seeds."),
    blind: bool = typer.Option(False, help="Resample every agent after the warm-up from the observed ones "
                                           "(do not take who arrives, and when, from the data)."),
    marginal: Path = typer.Option(None, help="Training-split label marginal JSON for the marginal baseline."),
    method: str = _METHOD, meanfield: str = _MEANFIELD, backend: str = _BACKEND, model: str = _MODEL,
    base_url: str = _BASE_URL, api: str = _API, api_key_env: str = _KEY, step_size: int = _STEP,
    lang: str = _LANG, seed: int = _SEED, temperature: float = _TEMP, top_p: float = _TOP_P,
    max_new_tokens: int = _MAXTOK,
    bin_steps: int = _BINS, labeler: str = _LABELER, label_cache: Path = _CACHE,
    no_label_cache: bool = _NOCACHE, force: bool = _FORCE, quiet: bool = _QUIET,
):
    """Forecast label shares after W observed actions: H more agents, R runs, mean and 5-95% band.

    Scored against the real future (KL/JS/W1 per horizon bucket, vs persistence and marginal) when the data has it.

    Example: mfllm forecast --event 2093_zo3d75jHx_2157801852 --observe 48 --horizon 96 --out out/fc
    """
    from mfllm.data.new_event import load_new_event
    from mfllm.whatif.forecast import forecast  # scipy, matplotlib: loaded when run

    try:
        if new_event is not None:
            if event:
                raise ConfigError("give --event or --new-event, not both")
            ev = load_new_event(new_event)
            src = str(new_event)
            if observe is None:
                observe = len(ev.actions)
        else:
            ev = _load_event(data, event)
            src = data
            if observe is None:
                raise ConfigError("--observe W (real actions used as the warm-up) is required", field="observe")
        backend_options = _backend_options(backend, base_url, api, api_key_env)
        model = served_model(backend, model, backend_options)
        with model_bars_off() if quiet else nullcontext():
            res = forecast(ev, out, observe=observe, horizon=horizon, horizon_time=horizon_time, runs=runs,
                           config=_config(method, meanfield, step_size, lang, seed, temperature, top_p, max_new_tokens, model,
                                          backend),
                           backend_name=backend, model=model,
                           backend_options=backend_options,
                           labeler=labeler, label_cache="" if no_label_cache else label_cache, marginal=marginal,
                           bin_steps=bin_steps, blind=blind, data=src, progress=not quiet, force=force)
    except MfllmError as e:
        raise fail(e) from None
    except ValueError as e:  # pydantic validation of options
        raise fail(from_validation(e)) from None
    if res.get("scores"):
        from rich.table import Table

        from mfllm.whatif.forecast import SOURCES

        t = Table(title=f"error by horizon (JS, macro over dimensions) - {ev.event_id}")
        t.add_column("agents after warm-up")
        t.add_column("real", justify="right")
        for s in SOURCES:
            t.add_column(s.replace("_", " "), justify="right")
        for row in res["scores"]["buckets"]:
            t.add_row(f"{row['agents'][0]}-{row['agents'][1]}", str(row["n_real"]),
                      *("-" if row[s]["js"] is None else f"{row[s]['js']:.3f}" for s in SOURCES))
        Console(stderr=True).print(t)
    _err.print(f"[green]done[/] forecast of {ev.event_id}: {runs} runs -> {out}/forecast.json, forecast.md, "
               f"forecast.csv, forecast.png")


def intervene_command(
    spec: Path = typer.Option(..., help="Intervention spec (YAML or JSON), e.g. examples/rebuttal.yaml."),
    out: Path = typer.Option(..., help="Output folder: effects.json/.md, plots, baseline/ and intervened/ runs."),
    data: str = typer.Option(str(SAMPLE_DATA), help="Events: a CED folder, Rumdect or JSONL file/folder."),
    event: str = typer.Option(None, help="Event id in --data."),
    runs: int = typer.Option(8, help="Paired replicas (R): the same seeds in both arms."),
    observe: int = typer.Option(48, help="Real actions used as the warm-up (W)."),
    horizon: int = typer.Option(None, help="Agents simulated after the warm-up (default: the rest of the real "
                                           "ones; more are resampled)."),
    window: int = typer.Option(50, help="Headline effect: over about this many agents from the intervention."),
    method: str = _METHOD, meanfield: str = _MEANFIELD, backend: str = _BACKEND, model: str = _MODEL,
    base_url: str = _BASE_URL, api: str = _API, api_key_env: str = _KEY, step_size: int = _STEP,
    lang: str = _LANG, seed: int = _SEED, temperature: float = _TEMP, top_p: float = _TOP_P,
    max_new_tokens: int = _MAXTOK,
    bin_steps: int = _BINS, labeler: str = _LABELER, label_cache: Path = _CACHE,
    no_label_cache: bool = _NOCACHE, force: bool = _FORCE, quiet: bool = _QUIET,
):
    """Run a baseline and an intervened simulation with paired seeds; report each label share's change.

    Example: mfllm intervene --event 2093_zo3d75jHx_2157801852 --spec examples/rebuttal.yaml --runs 8 --out out/iv
    """
    from mfllm.whatif.intervene import intervene  # scipy, matplotlib: loaded when run, not for --help

    try:
        sp = parse_spec(spec)  # a bad spec fails before any model is loaded
        ev = _load_event(data, event)
        backend_options = _backend_options(backend, base_url, api, api_key_env)
        model = served_model(backend, model, backend_options)
        with model_bars_off() if quiet else nullcontext():
            res = intervene(ev, sp, out, observe=observe, horizon=horizon, runs=runs,
                            config=_config(method, meanfield, step_size, lang, seed, temperature, top_p, max_new_tokens, model,
                                           backend),
                            backend_name=backend, model=model,
                            backend_options=backend_options,
                            labeler=labeler, label_cache="" if no_label_cache else label_cache, bin_steps=bin_steps,
                            window=window, data=data, spec_path=str(spec), progress=not quiet, force=force)
    except MfllmError as e:
        raise fail(e) from None
    except ValueError as e:
        raise fail(from_validation(e)) from None
    for w in res.get("warnings", []):
        _err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    for h in res["headline"]:
        _err.print(f"  {h}", highlight=False, soft_wrap=True)
    _err.print(f"[green]done[/] {runs} paired runs -> {out}/effects.md, effects.json, trajectories.png, effects.png")
