"""Run a simulation into a run directory, or resume one: the library API behind `mfllm simulate`.

    from mfllm.simulation.runner import simulate
    summary = simulate("mfllm/assets/ced-sample", "runs/demo", limit=2, config=SimConfig(method="mf"))
"""

from __future__ import annotations

import signal
from pathlib import Path

from mfllm.backends.base import Backend
from mfllm.data.load import load_events
from mfllm.data.schema import Event
from mfllm.errors import ConfigError, MfllmError
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.engine import RunSummary, SimConfig, Simulator
from mfllm.simulation.interventions import Intervention
from mfllm.store.run import RunStore


class Interrupted(MfllmError):
    exit_code = 130


def make_backend(backend: str = "hf", model: str | None = None, **options) -> Backend:
    from mfllm.backends.registry import make_backend as _make

    model = model or str(DEFAULT_MODEL)
    if backend in ("hf", "vllm") and not Path(model).exists() and "/" not in model:
        raise ConfigError(f"model path {model!r} does not exist", field="model")
    return _make(backend, model=model, **options)


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
             progress: bool = True, loaded: list[Event] | None = None) -> RunSummary:
    """Start a new run in `out`. `loaded` lets a caller pass events it already holds."""
    config = config or SimConfig()
    if loaded is None:
        res = load_events(data, split=split, limit=limit, event_ids=events)
        loaded = res.events
    if not loaded:
        raise ConfigError(f"no events selected from {data} (split={split}, events={events})")
    backend_options = dict(backend_options or {})
    backend = backend or make_backend(backend_name, model, **backend_options)
    store = RunStore(out)
    store.create({
        "data": str(Path(data).resolve()) if data else None,
        "events": [e.event_id for e in loaded],
        "sim": config.model_dump(),
        "backend": backend.describe(),
        "backend_name": backend_name,
        "backend_options": {k: v for k, v in backend_options.items() if "key" not in k.lower()},
        "model": model or (str(DEFAULT_MODEL) if backend_name == "hf" else None),
        "interventions": intervention_spec,
    })
    return _execute(store, loaded, config, backend, {}, interventions, progress)


def resume(out: str, *, backend: Backend | None = None, progress: bool = True,
           interventions: list[Intervention] | None = None) -> RunSummary:
    store = RunStore(out)
    cfg = store.config()
    if store.is_done():
        raise ConfigError(f"{out} is already complete; nothing to resume")
    config = SimConfig(**cfg["sim"])
    loaded = load_events(cfg["data"], event_ids=cfg["events"]).events
    missing = set(cfg["events"]) - {e.event_id for e in loaded}
    if missing:
        raise ConfigError(f"cannot resume: events {sorted(missing)[:5]} are no longer in {cfg['data']}")
    if backend is None:
        backend = make_backend(cfg.get("backend_name", "hf"), cfg.get("model"), **cfg.get("backend_options", {}))
    if interventions is None and cfg.get("interventions"):
        from mfllm.simulation.intervention_spec import build_interventions, parse_spec

        interventions = build_interventions(parse_spec(cfg["interventions"]))
    records: dict[str, list[dict]] = {}
    for rec in store.recover():
        records.setdefault(rec["event_id"], []).append(rec)
    order = {e: i for i, e in enumerate(cfg["events"])}
    loaded.sort(key=lambda e: order[e.event_id])
    return _execute(store, loaded, config, backend, records, interventions, progress)


def _execute(store: RunStore, events: list[Event], config: SimConfig, backend: Backend,
             records: dict[str, list[dict]], interventions, progress: bool) -> RunSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    sim = Simulator(backend, config, interventions=interventions)
    total = sum(len(e.actions) for e in events)
    done_before = sum(len(r["actions"]) for recs in records.values() for r in recs)
    with StopFlag() as flag, Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("agents"), TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("sim", total=total, completed=done_before)

        def sink(rec: dict) -> None:
            store.append(rec)
            bar.update(task, advance=len(rec["actions"]))

        try:
            summary = sim.run(events, sink, resume=records, should_stop=lambda: flag.stop)
        finally:
            store.close()
    if summary.interrupted:
        raise Interrupted(f"stopped at a step boundary; nothing is lost. Continue with: mfllm simulate --resume {store.dir}")
    summary_dict = summary.to_dict()
    summary_dict["backend_stats"] = backend.stats.to_dict()
    store.finish(summary_dict)
    return summary
