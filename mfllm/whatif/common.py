"""What forecast and intervene share: replicas of one event, the output folder, and running an arm.

- **Replicas.** R runs of one event are R copies with ids ``ID#r0 .. ID#r{R-1}``, advanced together by the
  engine (one batched call per round). The engine derives every agent's seed from (seed, event id,
  action id), so replicas differ from each other and each replica is reproducible. Each replica gets its
  own run directory (readable by ``mfllm export`` / ``mfllm evaluate``).
- **Population.** Replica r holds the event's first W real actions (the warm-up), then the agents after
  them: the real ones while the data has them (who arrived and when, not what they wrote), then
  resampled ones (mfllm.simulation.population), W + H agents in all (or up to a time horizon).
- **Arms.** An arm is the R replicas simulated with one set of interventions (none for a forecast or a
  baseline); `intervene` runs two arms with the same replica ids and seed (common random numbers).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mfllm.backends.base import Backend
from mfllm.backends.registry import make_backend
from mfllm.data.schema import Event
from mfllm.errors import ConfigError
from mfllm.evaluation.evaluate import resolve_labeler
from mfllm.labels.base import Labeler
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.engine import SimConfig, Simulator
from mfllm.simulation.interventions import Intervention
from mfllm.simulation.population import synthetic_event
from mfllm.simulation.runner import Interrupted, StopFlag, public_options, rollout_agents
from mfllm.simulation.runner import check_config as check_run_config
from mfllm.store.run import RunStore, read_steps

REPLICA_SEP = "#r"
OUTPUT_MARKERS = ("forecast.json", "effects.json", "whatif.json")


def replica_id(event_id: str, r: int) -> str:
    return f"{event_id}{REPLICA_SEP}{r}"


def replica_events(event: Event, runs: int, observe: int, horizon: int | None = None,
                   horizon_time: float | None = None, seed: int = 0, blind: bool = False) -> list[Event]:
    """R lazy copies of `event`: W real warm-up actions, then H agents (or those up to horizon_time seconds
    after the W-th action). blind: the agents after the warm-up are all resampled from the W observed ones
    (the data's later agents are not used at all)."""
    n_real = len(event.actions)
    if runs < 1:
        raise ConfigError("--runs must be at least 1", field="runs")
    if observe < 0 or observe > n_real:
        raise ConfigError(f"event {event.event_id} has {n_real} real actions; --observe must be 0..{n_real}",
                          field="observe")
    if (horizon is None) == (horizon_time is None):
        raise ConfigError("give exactly one of --horizon (agents) or --horizon-time (seconds)", field="horizon")
    if horizon is not None and horizon < 1:
        raise ConfigError("--horizon must be at least 1 agent", field="horizon")
    if horizon_time is not None and not horizon_time > 0:
        raise ConfigError("--horizon-time must be > 0 seconds", field="horizon_time")
    if blind and observe == 0:
        raise ConfigError("--blind needs observed actions (--observe > 0) to resample from", field="blind")
    obs_time = event.actions[observe - 1].time if observe else event.source.time
    real = event.actions[:observe] if blind else event.actions
    base = Event(event_id=event.event_id, source=event.source, actions=real, label=event.label,
                 domain=event.domain, platform=event.platform, origin=event.origin)
    total = observe + horizon if horizon is not None else None
    until = obs_time + horizon_time if horizon_time is not None else None
    return [synthetic_event(base, total, seed, event_id=replica_id(event.event_id, r), until_time=until, text=None)
            for r in range(runs)]


def check_config(config: SimConfig) -> None:
    """The names a run needs, checked before anything is loaded or written (+ steps of k agents only)."""
    check_run_config(config)
    if config.time_window is not None:
        raise ConfigError("forecast / intervene work with steps of k agents (--step-size), not time windows",
                          field="time_window")


def prepare_out(out: Path, force: bool = False, check_only: bool = False) -> Path:
    """Create the output folder; an existing non-empty one is replaced only with force, and only when it
    holds a previous forecast / intervene output. check_only: raise if not allowed, change nothing."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ConfigError(f"{out} exists and is not empty; choose another --out or pass --force")
        if not out.is_dir() or not any((out / m).exists() for m in OUTPUT_MARKERS):
            raise ConfigError(f"{out} does not hold a forecast / intervene output; refusing to delete it")
        if not check_only:
            shutil.rmtree(out)
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)
    return out


def make_labeler(labeler: str | Labeler = "rules", cache: str | Path | None = None) -> Labeler:
    return resolve_labeler(labeler, cache)


def close_labeler(lab: Labeler, given: str | Labeler) -> None:
    """Close a labeler made here (one passed in by the caller is the caller's to close)."""
    if lab is not given and hasattr(lab, "close"):
        lab.close()


def resolve_backend(backend: Backend | None, backend_name: str, model: str | None,
                    options: dict | None) -> Backend:
    if backend is not None:
        return backend
    return make_backend(backend_name, model=model, **(options or {}))


@dataclass
class Output:
    """What forecast and intervene set up before simulating: the folder, backend, labeler and the run
    metadata (never a secret option)."""

    out: Path
    backend: Backend
    labeler: Labeler
    meta: dict


def open_output(out: Path, force: bool, backend: Backend | None, backend_name: str, model: str | None,
                backend_options: dict | None, labeler: str | Labeler, label_cache, data: str | None,
                whatif: dict) -> Output:
    """Check the folder, then load the backend (slow), then replace the folder: a refused --out costs
    nothing and a failed model load leaves the old output in place."""
    prepare_out(Path(out), force, check_only=True)
    be = resolve_backend(backend, backend_name, model, backend_options)
    out = prepare_out(Path(out), force)
    meta = {"data": data, "backend_name": backend_name,
            "model": model or (str(DEFAULT_MODEL) if backend_name == "hf" and backend is None else None),
            "backend_options": public_options(backend_options), "whatif": whatif}
    return Output(out, be, make_labeler(labeler, label_cache), meta)


@dataclass
class ArmRun:
    name: str
    dirs: list[Path]
    replica_ids: list[str]
    seconds: float = 0.0
    agents_simulated: int = 0
    records: list[list[dict]] = field(default_factory=list)  # per replica, step records in step order

    def load(self) -> ArmRun:
        self.records = [sorted(read_steps(d), key=lambda r: r["step"]) for d in self.dirs]
        return self


def run_arm(name: str, events: list[Event], config: SimConfig, backend: Backend, out: Path, meta: dict,
            interventions: list[Intervention] | None = None, spec: dict | None = None,
            progress: bool = True) -> ArmRun:
    """Simulate the replicas together into out/r0, out/r1, ... (one run directory each)."""
    cfg = config.model_copy(update={"events_in_flight": max(config.events_in_flight, len(events)),
                                    "max_rollout_agents": None})
    describe = getattr(backend, "describe", None)
    stores, dirs = {}, []
    for r, ev in enumerate(events):
        d = out / f"r{r}"
        st = RunStore(d)
        st.create({"data": meta.get("data"), "events": [ev.event_id], "sim": cfg.model_dump(),
                   "backend": describe() if callable(describe) else {"name": getattr(backend, "name", "?")},
                   "backend_name": meta.get("backend_name"), "backend_options": meta.get("backend_options", {}),
                   "model": meta.get("model"), "interventions": spec,
                   "whatif": {**meta.get("whatif", {}), "arm": name, "replica": r}})
        stores[ev.event_id] = st
        dirs.append(d)
    sim = Simulator(backend, cfg, interventions=interventions)
    total = sum(rollout_agents(e, cfg) for e in events)  # as `mfllm simulate`: simulated agents, no posts injected
    with StopFlag() as flag, Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("simulated agents"), TimeElapsedColumn(),
                                      disable=not progress) as bar:
        task = bar.add_task(name, total=total)

        def sink(rec: dict) -> None:
            stores[rec["event_id"]].append(rec)
            if rec["phase"] == "rollout":
                bar.update(task, advance=sum(not a.get("injected") for a in rec["actions"]))

        try:
            summary = sim.run(events, sink, should_stop=lambda: flag.stop)
        finally:
            for st in stores.values():
                st.close()
    if summary.interrupted:
        raise Interrupted(f"stopped at a step boundary; the partial replica runs are in {out} "
                          "(these runs are not resumable: rerun the command)")
    for ev in events:
        stores[ev.event_id].finish({"events": 1, **summary.per_event.get(ev.event_id, {}),
                                    "seconds_all_replicas": summary.seconds})
    return ArmRun(name, dirs, [e.event_id for e in events], summary.seconds, summary.agents_simulated).load()

