"""`mfllm simulate` (run or resume a simulation into a run directory) and `mfllm export` (its actions as a JSONL, CSV or Parquet table).

The options' defaults and the names they accept come from SimConfig (mfllm.simulation.config).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import typer

from mfllm.backends.registry import REMOTE_BACKENDS, make_backend
from mfllm.cli.data import loading_progress
from mfllm.cli.errors import err, fail
from mfllm.errors import MfllmError, from_validation
from mfllm.labels import make_labeler
from mfllm.labels.dimensions import ALL_DIMENSIONS
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.simulation.config import SimConfig, choices, default
from mfllm.simulation.decision import apply_policy, policy_model
from mfllm.simulation.intervention_spec import build_interventions, parse_spec
from mfllm.simulation.runner import check_out
from mfllm.simulation.runner import resume as resume_run
from mfllm.simulation.runner import simulate as run_sim
from mfllm.store.export import FORMATS, check_target, export_actions, format_for
from mfllm.store.run import RunStore, find_damage
from mfllm.store.rundir import read_run_file


def simulate_command(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help="A run config file (YAML or JSON) with the fields of a run's "
                                "config.json (data, events, sim, backend_name, backend_options, model, "
                                "interventions); options given on the command line override it."),
    data: str = typer.Option(str(SAMPLE_DATA), help="Events: a CED folder, Rumdect file/folder or JSONL file/folder."),
    out: Path = typer.Option(None, help="Run directory to create (config, mean field per step, every action)."),
    events: str = typer.Option(None, help="Comma-separated event ids (list them with `mfllm data events`)."),
    split: str = typer.Option("all", help="train | val | test | all (deterministic by event id)."),
    limit: int = typer.Option(None, help="At most this many events (after the split, in id order)."),
    method: str = typer.Option(default("method"), help=f"Context: {' | '.join(choices('method'))} (mf = mean field)."),
    meanfield: str = typer.Option(default("meanfield"), help=f"Mean-field model: {' | '.join(choices('meanfield'))} "
                                  "(stats: no LLM; llm: the summariser prompt)."),
    backend: str = typer.Option("hf", help="hf (local transformers) | openai (any OpenAI-compatible server) | vllm."),
    model: str = typer.Option(None, help=f"Model path or name. Default: the shipped {DEFAULT_MODEL.name} (with --backend "
                               "openai: the server's only model)."),
    base_url: str = typer.Option(None, help="openai backend: server URL, e.g. http://127.0.0.1:8000/v1."),
    api: str = typer.Option("completions", help="openai backend: completions | chat."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="openai backend: environment variable holding the key."),
    timeout: float = typer.Option(None, help="openai backend: seconds one attempt may take (default 60)."),
    retries: int = typer.Option(None, help="openai backend: retries of a failed request (default 5, with backoff)."),
    max_concurrency: int = typer.Option(None, help="openai backend: requests in flight at once (default 8)."),
    rate_limit: float = typer.Option(None, help="openai backend: at most this many requests per second."),
    device: str = typer.Option(None, help="hf backend: auto | cpu | cuda | cuda:N (default auto)."),
    dtype: str = typer.Option(None, help="hf backend: auto | float32 | bfloat16 | float16 (default auto)."),
    batch_size: int = typer.Option(None, help="hf backend: most requests per forward batch (default 64)."),
    step_size: int = typer.Option(default("step_size"), help="Agents per step."),
    time_window: float = typer.Option(default("time_window"), help="Seconds per step instead of a fixed number of agents."),
    warmup: int = typer.Option(default("warmup"), help="Real actions fed to the mean field before the rollout."),
    max_agents: int = typer.Option(default("max_rollout_agents"), help="Simulate at most this many rollout agents per event."),
    temperature: float = typer.Option(default("temperature"), help="Sampling temperature (0 = greedy; 1 = the model's own distribution)."),
    top_p: float = typer.Option(default("top_p"), help="Nucleus sampling (1 = off: keeps the crowd's rarer reactions)."),
    max_new_tokens: int = typer.Option(default("max_new_tokens"), help="Most tokens one agent's action may take."),
    meanfield_max_new_tokens: int = typer.Option(default("meanfield_max_new_tokens"),
                                                 help="--meanfield llm: most tokens of one summary m_t."),
    meanfield_decay: float = typer.Option(None, help="Stats mean fields: the weight each step keeps of the past "
                                          "counts (1 = never forget the warm-up). Default: what the model's "
                                          "mfllm_policy.json names (1 for mfllm-decide), else 0.8."),
    policy_adapter: Path = typer.Option(None, help="hf/vllm: a LoRA adapter dir for the policy "
                                        "(from `mfllm train policy` / `ib-tune`)."),
    meanfield_adapter: Path = typer.Option(None, help="hf/vllm with --meanfield llm: a LoRA adapter dir for "
                                           "the mean-field model (from `mfllm train meanfield` / `ib-tune`)."),
    seed: int = typer.Option(default("seed"), help="Seed: a run with a local model is reproducible."),
    lang: str = typer.Option(default("lang"), help=f"Prompt language: {' | '.join(choices('lang'))}."),
    teacher_forcing: bool = typer.Option(default("teacher_forcing"),
                                         help="Ablation: feed the mean field real actions in rollout."),
    resume: Path = typer.Option(None, help="Continue an interrupted run directory. Other options are ignored, "
                                "except the openai endpoint's (--base-url for an endpoint that moved, --timeout, "
                                "--retries, --max-concurrency, --rate-limit)."),
    force: bool = typer.Option(False, help="Replace --out if it already holds a run."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Simulate how a population reacts to events, step by step, with the mean-field loop.

    Example: mfllm simulate --limit 1 --out runs/demo   (the shipped sample events and model, CPU)
    """
    loading = partial(loading_progress, quiet)
    with model_bars_off() if quiet else nullcontext():
        try:
            if resume is not None:
                http = _http_options(timeout, retries, max_concurrency, rate_limit)
                endpoint = {**({"base_url": base_url} if base_url else {}), **http}
                damage = find_damage(resume)
                if damage is not None:
                    err.print(f"[yellow]note:[/] {damage.path}: {damage.describe()}; this resume redoes them",
                              highlight=False, soft_wrap=True)
                s = resume_run(str(resume), progress=not quiet, backend_options=endpoint or None, loading=loading)
                out = resume
            else:
                if out is None:
                    raise MfllmError("--out RUN_DIR is required (or --resume RUN_DIR)")
                check_out(out, force)  # before the (slow) data and model loads
                opts = dict(ctx.params)
                given = {k for k in opts if _given(ctx, k)}
                req = build_request(opts, given, read_run_file(config, SimConfig) if config else None)
                s = run_sim(req.data, str(out), events=req.events, split=split, limit=limit, config=req.sim,
                            backend_name=req.backend, model=req.model, backend_options=req.backend_options,
                            interventions=req.interventions, intervention_spec=req.intervention_spec,
                            progress=not quiet, on_skipped=_report_skipped, replace=force, loading=loading)
        except MfllmError as e:
            raise fail(e) from None
        except ValueError as e:  # SimConfig's (pydantic) checks of the options
            raise fail(from_validation(e)) from None
    err.print(f"[green]done[/] {s.events} events, {s.agents_simulated} agents simulated (rollout; warm-up not "
              f"counted) in {s.seconds:.1f}s -> {out}", highlight=False)
    _report_context_cuts(out)


# CLI option -> SimConfig field (the others have the same name in both)
SIM_OPTIONS = {"method": "method", "meanfield": "meanfield", "step_size": "step_size", "warmup": "warmup",
               "time_window": "time_window", "lang": "lang", "seed": "seed", "temperature": "temperature",
               "top_p": "top_p", "max_new_tokens": "max_new_tokens",
               "meanfield_max_new_tokens": "meanfield_max_new_tokens", "meanfield_decay": "meanfield_decay",
               "teacher_forcing": "teacher_forcing",
               "max_agents": "max_rollout_agents"}
HF_OPTIONS = ("device", "dtype", "batch_size")
OPENAI_OPTIONS = {"base_url": "base_url", "api": "api", "api_key_env": "api_key_env"}


@dataclass
class SimRequest:
    """What `mfllm simulate` (and mfllm.simulate) runs: the options merged with a run config file."""

    data: str
    events: list[str] | None
    sim: SimConfig
    backend: str
    model: str | None
    backend_options: dict
    interventions: list | None = None
    intervention_spec: dict | None = None


def build_request(opts: dict, given: set[str], file: dict | None = None) -> SimRequest:
    """Merge the command's options with a run config file: an option given on the command line (``given``)
    wins, else the file's field, else the option's default."""
    file = file or {}

    def pick(name: str, key: str) -> object:
        return opts[name] if name in given or key not in file else file[key]

    sim = dict(file.get("sim") or {})
    for name, fld in SIM_OPTIONS.items():
        if name in opts and (name in given or not file):
            sim[fld] = opts[name]
    backend = pick("backend", "backend_name")
    same_backend = file.get("backend_name", "hf") == backend
    backend_options = dict(file.get("backend_options") or {}) if same_backend else {}
    adapters = {**backend_options.get("adapters", {}),
                **_adapter_dirs(backend, sim.get("meanfield", default("meanfield")), opts.get("policy_adapter"),
                                opts.get("meanfield_adapter"))}
    for role in ("policy", "meanfield"):
        if opts.get(f"{role}_adapter"):
            sim[f"{role}_adapter"] = role
    http = _http_options(opts.get("timeout"), opts.get("retries"), opts.get("max_concurrency"),
                         opts.get("rate_limit"))
    if backend == "openai":
        for name, key in OPENAI_OPTIONS.items():
            if name in given or key not in backend_options:
                backend_options[key] = opts.get(name)
        backend_options.update(http)
    elif http:
        raise MfllmError("--timeout / --retries / --max-concurrency / --rate-limit apply to --backend openai only")
    local = {k: opts[k] for k in HF_OPTIONS if opts.get(k) is not None}
    if local and backend != "hf":
        raise MfllmError("--device / --dtype / --batch-size apply to --backend hf")
    if local.get("dtype") == "auto":
        local["dtype"] = None
    backend_options.update(local)
    if adapters:
        backend_options["adapters"] = adapters
    elif backend_options.get("adapters") == {}:
        backend_options.pop("adapters")
    if opts.get("events") and ("events" in given or "events" not in file):
        events = opts["events"].split(",")
    else:
        events = file.get("events")
    model = served_model(backend, pick("model", "model"), backend_options)
    # a decide model's mfllm_policy.json (given none, the model the backend runs: the shipped default, or the server's)
    apply_policy(policy_model(backend, model), sim, keep_meanfield="meanfield" in given)
    spec = file.get("interventions")
    return SimRequest(data=str(pick("data", "data")), events=events, sim=SimConfig(**sim), backend=str(backend),
                      model=model, backend_options=backend_options,
                      interventions=build_interventions(parse_spec(spec)) if spec else None,
                      intervention_spec=spec)


def served_model(backend: str, model: str | None, backend_options: dict) -> str | None:
    """The model a run names: the one given; an OpenAI-compatible server given none runs its only model, asked
    for here (GET /models, as the backend would) so that the run records its name and follows its policy (a
    shipped decide model served by `mfllm serve` is known by its folder's name)."""
    if model or str(backend).strip().lower() not in REMOTE_BACKENDS:
        return model
    return make_backend(backend, **backend_options).model


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether an option was given (command line or environment), not left at its default."""
    src = ctx.get_parameter_source(name)
    return getattr(src, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def _http_options(timeout, retries, max_concurrency, rate_limit) -> dict:
    return {k: v for k, v in {"timeout_s": timeout, "retries": retries, "max_concurrency": max_concurrency,
                              "rate_limit_rps": rate_limit}.items() if v is not None}


@contextmanager
def model_bars_off() -> Iterator[None]:
    """--quiet: no "Loading weights" bar either, for this command only (a notebook or a test calling the
    command keeps its bars for what runs next)."""
    from transformers.utils import logging as tlog  # heavy, but the local backends import it anyway

    was_on = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            tlog.enable_progress_bar()


def _report_context_cuts(run_dir: Path) -> None:
    """Say so when the model's context made the run shorten texts (a small model, e.g. mfllm-mini)."""
    try:
        done = json.loads((Path(run_dir) / "done.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    capped = (done.get("backend_stats") or {}).get("budget_capped") or 0
    shortened = done.get("meanfield_prompts_shortened") or 0
    if capped or shortened:
        err.print(f"[yellow]note:[/] the model's context was too short for {capped} request(s)' new-token budget "
                  f"(cut to fit) and {shortened} mean-field prompt(s) (replies shown shorter); see done.json. "
                  "With mfllm-mini and --meanfield llm, use --step-size 8 --meanfield-max-new-tokens 64.",
                  highlight=False)


def _adapter_dirs(backend: str, meanfield: str, policy: Path | None, mf: Path | None) -> dict[str, str]:
    """Role -> absolute adapter dir (absolute so that --resume finds them from anywhere)."""
    given = {"policy": policy, "meanfield": mf}
    if not any(given.values()):
        return {}
    if backend not in ("hf", "vllm"):
        raise MfllmError(f"--policy-adapter / --meanfield-adapter need a local model (--backend hf or vllm), "
                         f"not {backend!r}; a server applies its own adapters")
    if mf is not None and meanfield != "llm":
        raise MfllmError("--meanfield-adapter needs --meanfield llm (the stats mean field has no model)")
    out = {}
    for role, path in given.items():
        if path is None:
            continue
        if not path.is_dir():
            raise MfllmError(f"--{role}-adapter {path}: not a directory")
        out[role] = str(path.expanduser().resolve())
    return out


def _report_skipped(skipped: list) -> None:
    err.print(f"[yellow]warning:[/] {len(skipped)} bad input file(s) / line(s) skipped:", highlight=False)
    for e in skipped[:20]:
        err.print(f"  {e}", highlight=False, markup=False, soft_wrap=True)
    if len(skipped) > 20:
        err.print(f"  ... and {len(skipped) - 20} more (see `mfllm data stats`)", highlight=False)


def export_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    to: str = typer.Option(..., "--to", help="Output file (.jsonl, .csv or .parquet), or - for stdout (JSONL)."),
    fmt: str = typer.Option(None, "--format", help=f"{' | '.join(FORMATS)}. Default: from --to's suffix."),
    labels: bool = typer.Option(True, help="Add the 9 labels (rules labeler) of each real and simulated text."),
    label_cache: Path = typer.Option(None, help="SQLite label cache (see `mfllm evaluate`). "
                                     "Default: ~/.cache/mfllm/labels.sqlite."),
    no_label_cache: bool = typer.Option(False, "--no-label-cache", help="Do not read or write a label cache."),
    partial: bool = typer.Option(False, help="Export the intact steps of a damaged steps.jsonl (with a warning)."),
):
    """Write every action of a run as a table, one row per agent action: run, method, replica, event_id, step,
    phase, agent_id, time (epoch seconds and ISO 8601, UTC), real_text, sim_text, ... and the 9 labels of each
    text (real_<dimension>, sim_<dimension>). The exports of several runs stack into one table."""
    labeler = None
    try:
        check_target(to)
        fmt = format_for(to, fmt)
        RunStore(run_dir).config()
        if labels:
            labeler = make_labeler("rules", cache="" if no_label_cache else label_cache)
        n = export_actions(run_dir, to, fmt, labeler=labeler, dimensions=ALL_DIMENSIONS if labels else (),
                           partial=partial)
    except MfllmError as e:
        raise fail(e) from None
    finally:
        if labeler is not None and hasattr(labeler, "close"):
            labeler.close()
    damage = find_damage(run_dir) if partial else None
    if damage is not None:
        err.print(f"[yellow]warning:[/] {damage.path}: {damage.message()}", highlight=False, soft_wrap=True)
    err.print(f"[green]wrote[/] {n} actions ({fmt}) -> {'stdout' if to == '-' else to}", highlight=False)
