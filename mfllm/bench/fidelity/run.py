"""Simulating the bench's LLM rows: every row's R replica crowds of every event, batched together.

Row ROW's replica K is the run directory ``OUT/runs/ROW/rK`` (``OUT/runs/wW/ROW/rK`` for a warm-up other
than the main one): a normal run directory (``mfllm export`` reads it) whose events are simulated under
the replica ids ``E#rK`` (:mod:`mfllm.store.replicas`; replica 0 keeps ``E``, so r0 equals a one-crowd
run with the same seed). The replicas of a row run in one simulator, so every batched round carries
R times the agents. Re-running continues: a complete replica is skipped, an incomplete one resumes from
its step records (per-agent seeds make it equal to an uninterrupted run), a missing one starts; a
replica made with other settings is refused. Each session's wall time and backend counters go to
``OUT/cost.json``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mfllm.backends.base import Backend, BackendStats
from mfllm.backends.registry import make_backend
from mfllm.bench.fidelity.controls import DonorMeanField, EmptyMeanField, donor_reads
from mfllm.bench.fidelity.rows import BUILTIN, MethodSpec
from mfllm.bench.fidelity.settings import FidelitySettings
from mfllm.data.schema import Event
from mfllm.errors import ConfigError
from mfllm.files import atomic_write_json
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.decision import apply_policy, policy_model
from mfllm.simulation.engine import ResumePoint, SimConfig, Simulator, fold_records
from mfllm.simulation.runner import Interrupted, StopFlag, check_config
from mfllm.store.replicas import replica_event_id
from mfllm.store.run import CONFIG, RunStore
from mfllm.store.rundir import config_diffs, public_options

# Fields of the stored sim config that do not change results (batching is invisible to per-agent seeds).
_IGNORED_SIM = ("events_in_flight",)


def run_key(spec: MethodSpec, warmup: int, main_warmup: int) -> str:
    """Row folder under OUT/runs/: ``<row>`` for the main warm-up, ``w<W>/<row>`` for the others."""
    return spec.name if warmup == main_warmup else f"w{warmup}/{spec.name}"


def _adapter_role(kind: str, path: str) -> str:
    h = hashlib.blake2b(str(Path(path).expanduser().resolve()).encode(), digest_size=4).hexdigest()
    return f"{kind}-{h}"


def sim_config(settings: FidelitySettings, spec: MethodSpec, warmup: int) -> SimConfig:
    kw: dict[str, Any] = dict(
        method=spec.method, meanfield=spec.meanfield or "stats", step_size=settings.step_size, warmup=warmup,
        seed=settings.seed, teacher_forcing=spec.teacher_forcing, max_rollout_agents=settings.max_agents,
        policy_adapter=_adapter_role("policy", spec.policy_adapter) if spec.policy_adapter else None,
        meanfield_adapter=_adapter_role("meanfield", spec.meanfield_adapter) if spec.meanfield_adapter else None,
    )
    if settings.events_in_flight:
        kw["events_in_flight"] = settings.events_in_flight
    if spec.meanfield_max_new_tokens is not None:
        kw["meanfield_max_new_tokens"] = spec.meanfield_max_new_tokens
    if spec.meanfield_decay is not None:
        kw["meanfield_decay"] = spec.meanfield_decay
    if spec.temperature is not None:
        kw["temperature"] = spec.temperature
    if spec.top_p is not None:
        kw["top_p"] = spec.top_p
    if spec.meanfield_header is not None:
        kw["meanfield_header"] = spec.meanfield_header
    # a decide model (a local one, the shipped default, or one served under its shipped name): header + its mean field
    apply_policy(policy_model(settings.backend, settings.model), kw)
    return SimConfig(**kw)


def adapters_of(spec: MethodSpec) -> dict[str, str]:
    out = {}
    if spec.policy_adapter:
        out[_adapter_role("policy", spec.policy_adapter)] = str(Path(spec.policy_adapter).expanduser().resolve())
    if spec.meanfield_adapter:
        out[_adapter_role("meanfield", spec.meanfield_adapter)] = str(Path(spec.meanfield_adapter).expanduser().resolve())
    return out


def intervention_spec(spec: MethodSpec) -> dict | None:
    return None if spec.context == "own" else {"bench_fidelity_context": spec.context}


def check_run_config(run_dir: Path, expected_sim: dict, events: list[str], spec: MethodSpec) -> None:
    """Refuse to continue a run directory made with other settings."""
    diffs = config_diffs(RunStore(run_dir).config(), expected_sim, events, intervention_spec(spec), SimConfig,
                         _IGNORED_SIM)
    if diffs:
        raise ConfigError(f"{run_dir} was made with other settings ({'; '.join(diffs[:4])}); "
                          "use another --out, or delete that run directory")


class CostLedger:
    """OUT/cost.json: per row key, the sessions that simulated it (wall seconds, backend counters)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, list[dict]] = {}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                self.data = {}

    def add(self, key: str, session: dict) -> None:
        self.data.setdefault(key, []).append(session)
        atomic_write_json(self.path, self.data)


@dataclasses.dataclass
class RunOutcome:
    key: str
    spec: MethodSpec
    warmup: int
    run_dir: Path  # the row folder holding r0/, r1/, ...
    status: str  # skipped | new | resumed


def log(console, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False)


def replica_copies(events: list[Event], k: int) -> list[Event]:
    """The events as replica k simulates them (same actions, the replica's event ids)."""
    return [e if k == 0 else dataclasses.replace(e, event_id=replica_event_id(e.event_id, k)) for e in events]


def _interventions(spec: MethodSpec, cfg: SimConfig, runs: Path, key_of_mf: str, ids: list[str],
                   replicas: list[int], key: str) -> list | None:
    if spec.context == "empty":
        return [EmptyMeanField(cfg.lang)]
    if spec.context != "shuffled":
        return None
    donor_of, reads = {}, {}
    for k in replicas:  # replica k reads the mf run's replica k of the next event
        donor = runs / key_of_mf / f"r{k}"
        if not RunStore(donor).is_done():
            raise ConfigError(f"{key} needs the complete mf run {donor}")
        reads.update(donor_reads(donor, cfg.lang))
        donor_of.update({replica_event_id(e, k): replica_event_id(ids[(j + 1) % len(ids)], k)
                         for j, e in enumerate(ids)})
    return [DonorMeanField(donor_of, reads)]


def simulate_replicas(stores: dict[int, RunStore], events: list[Event], cfg: SimConfig, backend: Backend,
                      resume: dict[str, ResumePoint], interventions, progress: bool) -> None:
    """Run the given replicas of ``events`` in one simulator (their records go to their own store)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    copies = [(k, c) for i in range(len(events)) for k in stores for c in [replica_copies([events[i]], k)[0]]]
    owner = {c.event_id: k for k, c in copies}
    in_flight = cfg.events_in_flight * len(stores)
    sim = Simulator(backend, cfg.model_copy(update={"events_in_flight": in_flight}), interventions=interventions)
    cap = None if cfg.max_rollout_agents is None else cfg.warmup + cfg.max_rollout_agents
    total = sum(len(e.actions) if cap is None else min(len(e.actions), cap) for _, e in copies)
    with StopFlag() as flag, Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("agents"), TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("sim", total=total, completed=sum(r.agents for r in resume.values()))

        def sink(rec) -> None:
            stores[owner[rec["event_id"]]].append(rec)
            bar.update(task, advance=len(rec["actions"]))

        try:
            summary = sim.run([c for _, c in copies], sink, resume=resume, should_stop=lambda: flag.stop)
        finally:
            for st in stores.values():
                st.close()
    if summary.interrupted:
        raise Interrupted("interrupted")
    for k, st in stores.items():
        ids = [replica_event_id(e.event_id, k) for e in events]
        per = {e: summary.per_event[e] for e in ids if e in summary.per_event}
        st.finish({"events": len(ids), "replica": k, "agents_simulated": sum(p["agents"] for p in per.values()),
                   "per_event": per, "seconds_all_replicas": summary.seconds,
                   "backend_stats": backend.stats.to_dict()})


def run_all(settings: FidelitySettings, specs: list[MethodSpec], events: list[Event], data_path: str,
            console=None, backend_factory: Callable[[dict], Any] | None = None) -> list[RunOutcome]:
    """Simulate every (warm-up, row) whose replicas are not all complete yet. One backend serves every run."""
    out = Path(settings.out)
    runs = out / "runs"
    ledger = CostLedger(out / "cost.json")
    ids = [e.event_id for e in events]
    main_w = settings.main_warmup()
    adapters: dict[str, str] = {}
    for s in specs:
        adapters.update(adapters_of(s))
    backend = None

    def get_backend():
        nonlocal backend
        if backend is None:
            opts = dict(settings.backend_options)
            if adapters:
                opts["adapters"] = dict(adapters)
            backend = backend_factory(opts) if backend_factory else make_backend(settings.backend, model=settings.model,
                                                                                 **opts)
        return backend

    plan = [(w, s) for w in settings.all_warmups() for s in specs]
    outcomes = []
    for i, (w, spec) in enumerate(plan, 1):
        key = run_key(spec, w, main_w)
        row_dir = runs / key
        cfg = sim_config(settings, spec, w)
        check_config(cfg)
        tag = f"[{i}/{len(plan)}] {key}"
        if (row_dir / CONFIG).is_file():
            raise ConfigError(f"{row_dir} holds a one-crowd run from an older bench; use another --out")
        todo: dict[int, RunStore] = {}
        resume: dict[str, ResumePoint] = {}
        n_new = 0
        for k in range(settings.replicas):
            rd = row_dir / f"r{k}"
            rids = [replica_event_id(e, k) for e in ids]
            st = RunStore(rd)
            if (rd / CONFIG).is_file():
                check_run_config(rd, cfg.model_dump(), rids, spec)
                if st.is_done():
                    continue
                resume.update(fold_records(st.recover_iter(), cfg.teacher_forcing))
            else:
                if rd.exists() and any(rd.iterdir()):
                    raise ConfigError(f"{rd} exists and is not a run directory; move it away")
                n_new += 1
            todo[k] = st
        if not todo:
            log(console, f"{tag}: complete, skipped")
            outcomes.append(RunOutcome(key, spec, w, row_dir, "skipped"))
            continue
        status = "new" if n_new == len(todo) and not resume else "resumed"
        interventions = _interventions(spec, cfg, runs, run_key(BUILTIN["mf"], w, main_w), ids, list(todo), key)
        be = get_backend()
        for k, st in todo.items():
            if not (st.dir / CONFIG).is_file():
                st.create({
                    "data": data_path, "events": [replica_event_id(e, k) for e in ids], "sim": cfg.model_dump(),
                    "backend": be.describe(), "backend_name": settings.backend,
                    "backend_options": public_options(_stored_options(settings, spec)),
                    "model": settings.model or (str(DEFAULT_MODEL) if settings.backend == "hf" else None),
                    "interventions": intervention_spec(spec), "bench_replica": {"index": k, "of": settings.replicas},
                })
        be.stats = BackendStats()
        log(console, f"{tag}: {'starting' if status == 'new' else 'resuming'} replicas "
                     f"{','.join(f'r{k}' for k in todo)} ({len(events)} events, warm-up {w})")
        t0 = time.time()
        session = {"mode": status, "replicas": sorted(todo),
                   "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            simulate_replicas(todo, events, cfg, be, resume, interventions, settings.progress)
        except Interrupted:
            raise Interrupted(f"stopped at a step boundary in {row_dir}; nothing is lost. "
                              "Run the same command again to continue.") from None
        finally:
            session.update(wall_seconds=round(time.time() - t0, 3), backend=be.stats.to_dict(),
                           complete=all(st.is_done() for st in todo.values()))
            ledger.add(key, session)
        outcomes.append(RunOutcome(key, spec, w, row_dir, status))
    return outcomes


def _stored_options(settings: FidelitySettings, spec: MethodSpec) -> dict:
    """backend_options written to the run's config.json (what a resume rebuilds the backend from)."""
    opts = {k: v for k, v in settings.backend_options.items() if v is not None}
    ad = adapters_of(spec)
    if ad:
        opts["adapters"] = ad
    return opts
