"""Run a simulation into a run directory, or resume one: the library API behind `mfllm simulate`.

    from mfllm.simulation.runner import simulate
    summary = simulate("mfllm/assets/ced-sample", "runs/demo", limit=2, config=SimConfig(method="mf"))
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from pydantic import ValidationError

from mfllm.backends.base import Backend
from mfllm.backends.registry import make_backend
from mfllm.data.load import ProgressFn, count_dropped, load_events
from mfllm.data.schema import Event
from mfllm.errors import ConfigError, DataError, MfllmError, from_validation
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.engine import ResumePoint, RunSummary, SimConfig, Simulator, fold_records
from mfllm.simulation.intervention_spec import build_interventions, parse_spec
from mfllm.simulation.interventions import Intervention
from mfllm.simulation.steps import plan_steps
from mfllm.store.records import StepRecord
from mfllm.store.run import CONFIG, DONE, RunStore, find_damage, remove_run
from mfllm.store.rundir import check_resumable, public_options

Loading = Callable[[], AbstractContextManager[ProgressFn | None]]


class Interrupted(MfllmError):
    exit_code = 130


class StopFlag:
    """Ctrl-C sets the flag; the engine stops at the next step boundary (a second Ctrl-C aborts)."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def simulate(data: str, out: str, *, events: list[str] | None = None, split: str = "all", limit: int | None = None,
             config: SimConfig | None = None, backend: Backend | None = None, backend_name: str = "hf",
             model: str | None = None, backend_options: dict | None = None,
             interventions: list[Intervention] | None = None, intervention_spec: dict | None = None,
             progress: bool = True, loaded: list[Event] | None = None,
             on_skipped: Callable[[list[DataError]], None] | None = None, replace: bool = False,
             loading: Loading | None = None) -> RunSummary:
    """Start a new run in `out`. `loaded` lets a caller pass events it already holds. Bad input files
    (or JSONL lines) are skipped and handed to `on_skipped` (default: logged as warnings). `replace`: a
    run already in `out` is removed, but only once the options, data and model have all loaded.
    `loading()`: a context giving the loaders' ``progress(done, total)`` callback (a bar while a large folder
    loads, closed before the simulation's own bar starts), e.g. ``partial(mfllm.cli.data.loading_progress, quiet)``."""
    config = config or SimConfig()
    check_config(config)  # before anything is loaded or written
    check_out(out, replace)  # an existing run is refused before the (slow) data and model loads
    if loaded is None:
        with (loading or nullcontext)() as progress_fn:
            res = load_events(data, split=split, limit=limit, event_ids=events, progress=progress_fn)
        loaded = res.events
        if res.skipped:
            (on_skipped or _log_skipped)(res.skipped)
    if not loaded:
        raise ConfigError(f"no events selected from {data} (split={split}, events={events})")
    backend_options = dict(backend_options or {})
    backend = backend or make_backend(backend_name, model=model, **backend_options)
    if replace:
        remove_run(out)
    store = RunStore(out)
    store.create({
        "data": str(Path(data).resolve()) if data else None,
        "events": [e.event_id for e in loaded],
        "sim": config.model_dump(),
        "backend": backend.describe(),
        "backend_name": backend_name,
        "backend_options": public_options(backend_options),
        "model": model or (str(DEFAULT_MODEL) if backend_name == "hf" else None),
        "interventions": intervention_spec,
        # actions the loader left out of kept events (faulty rows): kind -> count, overall and per event
        "dropped_actions": {"total": count_dropped(e.dropped for e in loaded),
                            "events": {e.event_id: e.dropped_actions for e in loaded if e.dropped is not None}},
    })
    return _execute(store, loaded, config, backend, {}, interventions, progress)


def check_out(out: str | Path, replace: bool) -> None:
    """The run directory a new run may be written to (checked before anything slow happens)."""
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d} is a file, not a folder")
    if (d / CONFIG).exists() and not replace:
        raise ConfigError(f"{d} already holds a run; use --resume {d} to continue it, or choose another --out "
                          "(or --force to replace it)")
    if replace and d.exists() and any(d.iterdir()) and not (d / CONFIG).exists():
        raise ConfigError(f"{d} exists and is not a run directory; refusing to replace it")


def check_config(config: SimConfig) -> None:
    """A config checked by SimConfig's own rules before a run directory exists (one built with
    ``model_construct`` skipped them; a validated one passes unchanged)."""
    try:
        SimConfig.model_validate(dict(config))
    except ValidationError as e:
        raise from_validation(e) from None


def _log_skipped(skipped: list[DataError]) -> None:
    log = logging.getLogger(__name__)
    log.warning("%d bad input file(s) / line(s) skipped", len(skipped))
    for e in skipped:
        log.warning("skipped: %s", e)


# What a resume may change: where and how the endpoint is reached, never what is simulated.
RESUME_OVERRIDES = ("base_url", "timeout_s", "retries", "max_concurrency", "rate_limit_rps")


def resume(out: str, *, backend: Backend | None = None, progress: bool = True,
           interventions: list[Intervention] | None = None, backend_options: dict | None = None,
           loading: Loading | None = None) -> RunSummary:
    """Continue an interrupted run. `backend_options` may override the openai endpoint's RESUME_OVERRIDES
    (an endpoint that moved); they apply to this session only, config.json keeps the original."""
    store = RunStore(out)
    cfg = store.config()
    # A finished run whose steps.jsonl was damaged afterwards is resumed too: the damaged line and all after it are redone.
    redo_finished = store.is_done() and find_damage(store.dir) is not None
    if store.is_done() and not redo_finished:
        raise ConfigError(f"{out} is already complete; nothing to resume")
    config = check_resumable(cfg, str(store.dir / CONFIG), SimConfig)
    if backend_options:  # checked before the (slow) data load
        bad = sorted(set(backend_options) - set(RESUME_OVERRIDES))
        if bad:
            raise ConfigError(f"a resume cannot change {', '.join(bad)}", field=bad[0])
        if cfg.get("backend_name") != "openai":
            raise ConfigError(f"--base-url / --timeout / --retries / ... apply to an openai run; this run used "
                              f"{cfg.get('backend_name', 'hf')!r}", field="backend")
    with (loading or nullcontext)() as progress_fn:
        loaded = load_events(cfg["data"], event_ids=cfg["events"], progress=progress_fn).events
    missing = set(cfg["events"]) - {e.event_id for e in loaded}
    if missing:
        raise ConfigError(f"cannot resume: events {sorted(missing)[:5]} are no longer in {cfg['data']}")
    if backend is None:
        backend = make_backend(cfg.get("backend_name", "hf"), model=cfg.get("model"),
                               **{**cfg.get("backend_options", {}), **(backend_options or {})})
    if interventions is None and cfg.get("interventions"):
        interventions = build_interventions(parse_spec(cfg["interventions"]))
    if redo_finished:
        (store.dir / DONE).unlink()
    records = fold_records(store.recover_iter(), config.teacher_forcing)
    order = {e: i for i, e in enumerate(cfg["events"])}
    loaded.sort(key=lambda e: order[e.event_id])
    return _execute(store, loaded, config, backend, records, interventions, progress)


def rollout_agents(event: Event, config: SimConfig) -> int:
    """Agents the run simulates for an event (its rollout actions, at most max_rollout_agents)."""
    n = sum(len(s.actions) for s in plan_steps(event.actions, config.step_size, config.warmup, config.time_window)
            if s.phase == "rollout")
    return n if config.max_rollout_agents is None else min(n, config.max_rollout_agents)


def _execute(store: RunStore, events: list[Event], config: SimConfig, backend: Backend,
             records: dict[str, ResumePoint], interventions, progress: bool) -> RunSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    sim = Simulator(backend, config, interventions=interventions)
    # The bar and the summary count the same thing: simulated (rollout) agents of the whole run, those of
    # earlier sessions included; warm-up actions are real ones fed to the mean field, injected posts are no agents.
    total = sum(rollout_agents(e, config) for e in events)
    done_before = sum(r.rollout_done for r in records.values())
    with StopFlag() as flag, Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("simulated agents"), TimeElapsedColumn(),
                                      disable=not progress) as bar:
        task = bar.add_task("sim", total=total, completed=done_before)

        def sink(rec: StepRecord) -> None:
            store.append(rec)
            if rec.phase == "rollout":
                bar.update(task, advance=sum(not a.injected for a in rec.actions))

        try:
            summary = sim.run(events, sink, resume=records, should_stop=lambda: flag.stop)
        finally:
            store.close()
        if not summary.interrupted:  # an intervention that removes arrivals ends below the plan
            bar.update(task, total=bar.tasks[0].completed)
    summary.agents_simulated += done_before
    if summary.interrupted:
        raise Interrupted(f"stopped at a step boundary; nothing is lost. Continue with: mfllm simulate --resume {store.dir}")
    summary_dict = summary.to_dict()
    summary_dict["backend_stats"] = backend.stats.to_dict()
    if hasattr(sim.meanfield, "shortened"):  # llm mean field: prompts shortened to fit the context
        summary_dict["meanfield_prompts_shortened"] = sim.meanfield.shortened
    store.finish(summary_dict)
    return summary
