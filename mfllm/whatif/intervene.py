"""What-if experiments: replicas of an event run together, label-share trajectories, and interventions.

Shared by `mfllm forecast` (mfllm.whatif.forecast) and `mfllm intervene` (here):

- **Replicas.** R runs of one event are R copies with ids ``ID#r0 .. ID#r{R-1}``, advanced together by the
  engine (one batched call per round). The engine derives every agent's seed from (seed, event id,
  action id), so replicas differ from each other and each replica is reproducible. Each replica gets its
  own run directory (readable by ``mfllm export`` / ``mfllm evaluate``).
- **Population.** Replica r holds the event's first W real actions (the warm-up), then the agents after
  them: the real ones while the data has them (who arrived and when, not what they wrote), then
  resampled ones (mfllm.simulation.population), W + H agents in all (or up to a time horizon).
- **Paired arms.** `intervene` runs the baseline arm and the intervened arm with the *same* replica ids,
  action ids and seed (common random numbers): before the intervention both arms produce identical
  actions, and after it the difference per replica is the intervention's effect, not sampling noise.
  Effects are the paired differences of label shares (intervened - baseline) per replica, summarised
  by their mean and a 95% Student-t interval over the R replicas (mfllm.evaluation.metrics.summarize).

Shares: per dimension, the share of each category among the simulated agents of a bin whose text could
be labelled (injected posts are not agents and are never counted). Bins are groups of ``bin_steps``
rollout steps (``step_size`` planned agents per step).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mfllm.backends.base import Backend
from mfllm.data.schema import Event
from mfllm.errors import ConfigError, MfllmError
from mfllm.evaluation import metrics as M
from mfllm.labels.base import ActionLabels, Labeler
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.engine import SimConfig, Simulator
from mfllm.simulation.interventions import Intervention
from mfllm.simulation.population import synthetic_event
from mfllm.simulation.runner import public_options
from mfllm.store.run import atomic_write_json, atomic_write_text, read_steps

REPLICA_SEP = "#r"
CATS: tuple[tuple[str, str], ...] = tuple((d, c) for d, cs in DIMENSIONS.items() for c in cs)
BLOCKS: dict[str, slice] = {}
_i = 0
for _d, _cs in DIMENSIONS.items():
    BLOCKS[_d] = slice(_i, _i + len(_cs))
    _i += len(_cs)
del _i, _d, _cs
# the categories drawn in the trajectory plots (a binary dimension's second category is the mirror image)
PLOT_CATS: dict[str, tuple[str, ...]] = {
    "rumor": ("counter",), "belief_degree": ("doubt",), "behavior_type": ("comment",),
    "subjectivity": ("subjective",), "stance": DIMENSIONS["stance"],
    "sentiment_tendency": DIMENSIONS["sentiment_tendency"], "intent": DIMENSIONS["intent"],
    "sentiment_state": DIMENSIONS["sentiment_state"],
}
OUTPUT_MARKERS = ("forecast.json", "effects.json", "whatif.json")


class Interrupted(MfllmError):
    exit_code = 130


# ------------------------------------------------------------------------------------------------ setup


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
    from mfllm.simulation.runner import check_config as check_run_config

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
    from mfllm.evaluation.evaluate import resolve_labeler

    return resolve_labeler(labeler, cache)


def resolve_backend(backend: Backend | None, backend_name: str, model: str | None,
                    options: dict | None) -> Backend:
    if backend is not None:
        return backend
    from mfllm.simulation.runner import make_backend

    return make_backend(backend_name, model, **(options or {}))


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mfllm.simulation.runner import StopFlag
    from mfllm.store.run import RunStore

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
    total = sum(len(e.actions) for e in events)
    with StopFlag() as flag, Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("agents"), TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task(name, total=total)

        def sink(rec: dict) -> None:
            stores[rec["event_id"]].append(rec)
            bar.update(task, advance=len(rec["actions"]))

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


# ------------------------------------------------------------------------------------------------ labels


def label_records(arms: Sequence[ArmRun], labeler: Labeler, extra_texts: Sequence[str] = ()) -> dict:
    """Label every distinct text the arms need (warm-up real texts, rollout simulated texts) once."""
    from mfllm.evaluation.evaluate import label_texts

    texts = list(extra_texts)
    for arm in arms:
        for recs in arm.records:
            for rec in recs:
                for a in rec["actions"]:
                    if a.get("injected"):
                        continue
                    t = a.get("real_text") if rec["phase"] == "warmup" else a.get("sim_text")
                    if t is not None:
                        texts.append(t)
    return label_texts(labeler, texts)


def count_vector(labels: Sequence[ActionLabels | None]) -> np.ndarray:
    """Counts of every (dimension, category) of CATS over the labelled items (None skipped)."""
    out = np.zeros(len(CATS))
    index = {dc: i for i, dc in enumerate(CATS)}
    for al in labels:
        if al is None:
            continue
        for d in DIMENSIONS:
            i = index.get((d, al.labels.get(d)))
            if i is not None:
                out[i] += 1
    return out


def block_shares(counts: np.ndarray) -> np.ndarray:
    """Shares within each dimension's block of CATS, along the last axis; NaN where a block has no count."""
    c = np.asarray(counts, dtype=float)
    out = np.full(c.shape, np.nan)
    for sl in BLOCKS.values():
        s = c[..., sl].sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[..., sl] = np.where(s > 0, c[..., sl] / np.where(s > 0, s, 1), np.nan)
    return out


@dataclass
class Trajectories:
    """One arm's label counts per replica and rollout step (aligned across replicas and arms by step)."""

    first_step: int  # the first rollout step (all replicas share the warm-up, so it is the same)
    step_size: int
    steps: np.ndarray  # (R, S, K) counts of the simulated agents' labels per rollout step
    agents: np.ndarray  # (R, S) simulated agents per step (labelled or not)
    hours: np.ndarray  # (R, S) mean arrival time of the step's agents, hours after the source; NaN if none
    warm: np.ndarray  # (K,) counts of the warm-up's real actions (replica 0)
    meanfield: list[dict[int, str]]  # per replica: step -> m_t after that step

    @property
    def n_steps(self) -> int:
        return self.steps.shape[1]

    def bins(self, bin_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(R, B, K) counts, (R, B) agents, (R, B) mean hours per bin of `bin_steps` rollout steps."""
        b = max(1, int(bin_steps))
        nb = math.ceil(self.n_steps / b) if self.n_steps else 0
        r = self.steps.shape[0]
        counts = np.zeros((r, nb, len(CATS)))
        agents = np.zeros((r, nb))
        hours = np.full((r, nb), np.nan)
        for i in range(nb):
            sl = slice(i * b, (i + 1) * b)
            counts[:, i] = self.steps[:, sl].sum(1)
            agents[:, i] = self.agents[:, sl].sum(1)
            w = self.agents[:, sl]
            h = np.nan_to_num(self.hours[:, sl]) * w
            with np.errstate(invalid="ignore", divide="ignore"):
                hours[:, i] = np.where(w.sum(1) > 0, h.sum(1) / np.where(w.sum(1) > 0, w.sum(1), 1), np.nan)
        return counts, agents, hours

    def window(self, starts: Sequence[int], n_steps: int | None) -> np.ndarray:
        """(R, K) counts pooled over the rollout steps [start_r, start_r + n_steps) of each replica
        (start given as an event step index; n_steps None = to the end)."""
        out = np.zeros((self.steps.shape[0], len(CATS)))
        for r, s in enumerate(starts):
            lo = max(0, s - self.first_step)
            hi = self.n_steps if n_steps is None else min(self.n_steps, lo + n_steps)
            out[r] = self.steps[r, lo:hi].sum(0)
        return out


def trajectories(arm: ArmRun, labels: dict, source_time: float, step_size: int,
                 first_step: int | None = None, n_steps: int | None = None) -> Trajectories:
    recs = arm.records
    roll = [r["step"] for rr in recs for r in rr if r["phase"] == "rollout"]
    if first_step is None:
        first_step = min(roll) if roll else 0
    if n_steps is None:
        n_steps = (max(roll) - first_step + 1) if roll else 0
    R = len(recs)
    steps = np.zeros((R, n_steps, len(CATS)))
    agents = np.zeros((R, n_steps))
    hours = np.full((R, n_steps), np.nan)
    warm_labels: list = []
    mfs: list[dict[int, str]] = []
    for r, rr in enumerate(recs):
        mf: dict[int, str] = {}
        for rec in rr:
            mf[rec["step"]] = rec.get("meanfield", "")
            acts = [a for a in rec["actions"] if not a.get("injected")]
            if rec["phase"] == "warmup":
                if r == 0:
                    warm_labels.extend(labels.get(a.get("real_text")) for a in acts if a.get("real_text") is not None)
                continue
            i = rec["step"] - first_step
            if not 0 <= i < n_steps:
                continue
            steps[r, i] = count_vector([labels.get(a["sim_text"]) for a in acts if a.get("sim_text") is not None])
            agents[r, i] = len(acts)
            ts = [a["time"] for a in acts if a.get("time") is not None]
            if ts:
                hours[r, i] = (float(np.mean(ts)) - source_time) / 3600.0
        mfs.append(mf)
    return Trajectories(first_step, step_size, steps, agents, hours, count_vector(warm_labels), mfs)


def band(shares: np.ndarray, lo: float = 5, hi: float = 95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and the lo-hi percentiles over axis 0 (replicas), ignoring NaN (all-NaN -> NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmean(shares, 0), np.nanpercentile(shares, lo, axis=0), np.nanpercentile(shares, hi, axis=0))


def per_dim(vec: np.ndarray, fmt=lambda x: x) -> dict[str, dict[str, Any]]:
    """A (..., K) array as {dimension: {category: fmt(values)}}."""
    return {d: {c: fmt(vec[..., BLOCKS[d]][..., j]) for j, c in enumerate(cs)} for d, cs in DIMENSIONS.items()}


def _num(x) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)


def _nums(a) -> list[float | None]:
    return [_num(v) for v in np.asarray(a).ravel()]


def bin_ranges(n_bins: int, bin_steps: int, step_size: int, total: int | None = None) -> list[list[int]]:
    """[first, last] planned agent (1-based, after the warm-up) of each bin (total: the last agent)."""
    k = bin_steps * step_size
    return [[i * k + 1, (i + 1) * k if total is None else min((i + 1) * k, total)] for i in range(n_bins)]


# ------------------------------------------------------------------------------------------------ intervene


def _summ(values: np.ndarray) -> dict:
    s = M.summarize([float(v) for v in values if np.isfinite(v)])
    return {"mean": s["mean"], "ci95": s["ci95"], "std": s["std"], "n": s["n"]}


def paired_effects(base: np.ndarray, intv: np.ndarray) -> dict[str, dict[str, dict]]:
    """{dim: {cat: {mean, ci95, std, n}}} of the per-replica differences intervened - baseline (shares,
    (R, K) arrays); replicas where either arm has no labelled agent are dropped."""
    diff = block_shares(intv) - block_shares(base)
    return per_dim(diff, _summ)


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def describe_effect(dim: str, cat: str, e: dict, where: str) -> str:
    if e["mean"] is None:
        return f"{dim}={cat}: no data {where}"
    s = f"{dim}={cat} {_pts(e['mean'])} points"
    if e["ci95"] is not None:
        lo, hi = e["ci95"]
        s += f" (95% interval {100 * lo:+.1f} to {100 * hi:+.1f}, {e['n']} paired runs)"
    else:
        s += f" (no interval: {e['n']} paired run{'s' if e['n'] != 1 else ''})"
    return s + f" {where}"


def headline(effects: dict, top: int = 5) -> list[tuple[str, str, dict]]:
    """The largest effects: per dimension its category with the largest |mean| (binary dimensions are
    mirror images), ordered by interval-excludes-zero first, then |mean|."""
    rows = []
    for d, cats in effects.items():
        best = max(cats.items(), key=lambda kv: -1 if kv[1]["mean"] is None else abs(kv[1]["mean"]))
        c, e = best
        if e["mean"] is None:
            continue
        sig = e["ci95"] is not None and (e["ci95"][0] > 0 or e["ci95"][1] < 0)
        rows.append((not sig, -abs(e["mean"]), d, c, e))
    rows.sort(key=lambda x: (x[0], x[1]))
    return [(d, c, e) for _, _, d, c, e in rows[:top]]


def intervene(event: Event, spec: Any, out: str | Path, *, observe: int = 48, horizon: int | None = None,
              runs: int = 8, config: SimConfig | None = None, backend: Backend | None = None,
              backend_name: str = "hf", model: str | None = None, backend_options: dict | None = None,
              labeler: str | Labeler = "rules", label_cache: str | Path | None = None, bin_steps: int = 1,
              window: int = 50, data: str | None = None, spec_path: str | None = None, plots: bool = True,
              progress: bool = True, force: bool = False) -> dict:
    """Run the baseline and the intervened arm (paired seeds) and write effects.json / effects.md / plots.

    horizon: agents simulated after the W observed ones (default: the event's remaining real ones).
    window: the headline effect pools the simulated agents of the first ceil(window / step_size) steps
    from the intervention's first step. Returns the effects dict (also in out/effects.json).
    """
    from mfllm.simulation.intervention_spec import build_interventions, parse_spec

    spec_obj = parse_spec(spec, path=spec_path)
    config = (config or SimConfig()).model_copy(update={"warmup": observe})
    check_config(config)
    if bin_steps < 1:
        raise ConfigError("--bin-steps must be at least 1", field="bin_steps")
    if window < 1:
        raise ConfigError("--window must be at least 1 agent", field="window")
    if horizon is None:
        horizon = len(event.actions) - observe
        if horizon < 1:
            raise ConfigError(f"event {event.event_id} has no real action after the first {observe}; "
                              "give --horizon to simulate resampled agents", field="horizon")
    if spec_obj.lang is None:
        spec_obj = spec_obj.model_copy(update={"lang": config.lang})
    base_events = replica_events(event, runs, observe, horizon, None, config.seed)
    int_events = replica_events(event, runs, observe, horizon, None, config.seed)
    o = open_output(out, force, backend, backend_name, model, backend_options, labeler, label_cache, data,
                    {"command": "intervene", "event": event.event_id, "observe": observe, "horizon": horizon,
                     "runs": runs})
    out, backend, lab, meta = o.out, o.backend, o.labeler, o.meta
    atomic_write_json(out / "whatif.json", {"command": "intervene", "event": event.event_id,
                                            "spec": spec_obj.dump()})
    base = run_arm("baseline", base_events, config, backend, out / "baseline", meta, None, None, progress)
    ivs = build_interventions(spec_obj, lang=config.lang)
    intv = run_arm("intervened", int_events, config, backend, out / "intervened", meta, ivs, spec_obj.dump(),
                   progress)
    try:
        labels = label_records([base, intv], lab)
    finally:
        if lab is not labeler and hasattr(lab, "close"):
            lab.close()
    tb = trajectories(base, labels, event.source.time, config.step_size)
    ti = trajectories(intv, labels, event.source.time, config.step_size, tb.first_step, tb.n_steps)
    result = effects_report(event, spec_obj, ivs, tb, ti, base, intv, config, observe, horizon, runs, bin_steps,
                            window, lab)
    if plots:
        from mfllm.whatif.forecast import plot_effects, plot_trajectories

        plot_trajectories(out / "trajectories.png", {"baseline": tb, "intervened": ti}, bin_steps,
                          title=f"{event.event_id}: baseline vs intervened ({runs} paired runs, band 5-95%)",
                          marker_step=result["intervention"]["start_step"], total=horizon)
        plot_effects(out / "effects.png", result, title=f"{event.event_id}: effect of the intervention "
                                                         "(intervened - baseline, 95% interval)")
        result["plots"] = ["trajectories.png", "effects.png"]
    atomic_write_json(out / "effects.json", result)
    atomic_write_text(out / "effects.md", effects_markdown(result))
    return result


def _policy_read(ivs: list[Intervention], rid: str, step: int, text: str) -> str:
    """The mean field the policy read at `step` in the intervened arm (the signal hooks applied)."""
    from mfllm.simulation.intervention_spec import MeanFieldSignal

    for iv in ivs:
        if isinstance(iv, MeanFieldSignal) and iv.was_in(rid, step):
            text = iv.apply(text)
    return text


def effects_report(event: Event, spec, ivs, tb: Trajectories, ti: Trajectories, base: ArmRun, intv: ArmRun,
                   config: SimConfig, observe: int, horizon: int, runs: int, bin_steps: int, window: int,
                   lab: Labeler) -> dict:
    rids = base.replica_ids
    firsts = []
    for rid in rids:
        f = [iv.first_step[rid] for iv in ivs if rid in getattr(iv, "first_step", {})]
        firsts.append(min(f) if f else None)
    warnings_: list[str] = []
    if all(f is None for f in firsts):
        warnings_.append("the intervention never became active in the simulated steps: check at_step / at_time "
                         f"(the rollout is steps {tb.first_step}..{tb.first_step + tb.n_steps - 1})")
    starts = [max(tb.first_step, f if f is not None else tb.first_step) for f in firsts]
    start_step = int(np.median(starts)) if starts else tb.first_step
    # identical before the intervention? (common random numbers; a check, reported)
    same_before = all(
        [a.get("sim_text") for r in br if r["step"] < s for a in r["actions"]]
        == [a.get("sim_text") for r in ir if r["step"] < s for a in r["actions"]]
        for br, ir, s in zip(base.records, intv.records, starts, strict=True))
    if not same_before:
        warnings_.append("the arms differ before the intervention step (a backend without per-request seeds?); "
                         "the paired differences then include sampling noise")
    k = config.step_size
    w_steps = max(1, math.ceil(window / k))
    windows = {}
    for name, n in ((f"the first {w_steps * k} agents", w_steps), ("all agents", None)):
        cb, ci = tb.window(starts, n), ti.window(starts, n)
        windows[name] = {
            "steps": n, "planned_agents": None if n is None else n * k,
            "baseline_share": per_dim(block_shares(cb), lambda v: _summ(v)["mean"]),
            "intervened_share": per_dim(block_shares(ci), lambda v: _summ(v)["mean"]),
            "effect": paired_effects(cb, ci),
            "agents": {"baseline": float(tb.agents.sum(1).mean()), "intervened": float(ti.agents.sum(1).mean())},
        }
    cb, _, hb = tb.bins(bin_steps)
    ci, _, _ = ti.bins(bin_steps)
    nb = cb.shape[1]
    per_bin = []
    for b in range(nb):
        per_bin.append(paired_effects(cb[:, b], ci[:, b]))
    series = {d: {c: {"mean": [per_bin[b][d][c]["mean"] for b in range(nb)],
                      "lo": [None if per_bin[b][d][c]["ci95"] is None else per_bin[b][d][c]["ci95"][0]
                             for b in range(nb)],
                      "hi": [None if per_bin[b][d][c]["ci95"] is None else per_bin[b][d][c]["ci95"][1]
                             for b in range(nb)]}
                  for c in cs} for d, cs in DIMENSIONS.items()}
    sb, si = block_shares(cb), block_shares(ci)
    mb, mi = band(sb)[0], band(si)[0]
    main_name = next(iter(windows))
    head = headline(windows[main_name]["effect"])
    # the mean field the policy read at the intervention step and two steps later (replica 0)
    rid0 = rids[0]
    mf_rows = []
    for s in (start_step, start_step + 2):
        if s - 1 in tb.meanfield[0] or s - 1 in ti.meanfield[0]:
            mf_rows.append({"step": s, "baseline": tb.meanfield[0].get(s - 1, ""),
                            "intervened": _policy_read(ivs, rid0, s, ti.meanfield[0].get(s - 1, ""))})
    return {
        "event": {"event_id": event.event_id, "label": event.label, "source": event.source.text[:200],
                  "real_actions": len(event.actions)},
        "spec": spec.dump(),
        "config": {"observe": observe, "horizon": horizon, "runs": runs, "bin_steps": bin_steps,
                   "step_size": k, "window": window, "sim": config.model_dump(),
                   "labeler": {"name": str(getattr(lab, "name", "?")), "version": str(getattr(lab, "version", "?"))}},
        "intervention": {"start_step": start_step, "first_active_step": firsts,
                         "first_rollout_step": tb.first_step,
                         "agents_before": (start_step - tb.first_step) * k,
                         "items": [{"label": getattr(iv, "label", type(iv).__name__),
                                    "steps": getattr(iv, "steps_in", {}).get(rid0)} for iv in ivs]},
        "paired_identical_before": same_before,
        "interval": "mean of the per-replica paired differences (intervened - baseline) with a 95% Student-t "
                    "interval over the replicas (mfllm.evaluation.metrics.summarize)",
        "headline": [describe_effect(d, c, e, f"over {main_name} from the intervention step on")
                     for d, c, e in head],
        "windows": windows,
        "bins": {"agents": bin_ranges(nb, bin_steps, k, horizon), "hours_after_source": _nums(band(hb[..., None])[0])},
        "trajectories": {"baseline": per_dim(mb, _nums), "intervened": per_dim(mi, _nums)},
        "effect_by_bin": series,
        "meanfield": mf_rows,
        "runs": {"baseline": [str(Path("baseline") / d.name) for d in base.dirs],
                 "intervened": [str(Path("intervened") / d.name) for d in intv.dirs]},
        "seconds": {"baseline": base.seconds, "intervened": intv.seconds},
        "warnings": warnings_,
    }


def effects_markdown(res: dict) -> str:
    ev, cfg = res["event"], res["config"]
    lines = [f"# Intervention effects: {ev['event_id']} ({ev.get('label') or 'unlabelled'})", "",
             f"> {ev['source'][:120]}", "",
             f"- warm-up: {cfg['observe']} real actions; then {cfg['horizon']} simulated agents; "
             f"{cfg['runs']} paired runs (same seeds in both arms); steps of {cfg['step_size']} agents",
             f"- intervention first active at step {res['intervention']['start_step']} "
             f"({res['intervention']['agents_before']} simulated agents after the warm-up)",
             f"- spec: `{json.dumps(res['spec'], ensure_ascii=False)}`",
             f"- arms identical before the intervention: {'yes' if res['paired_identical_before'] else 'NO'}",
             f"- interval: {res['interval']}", ""]
    for w in res.get("warnings", []):
        lines += [f"**warning:** {w}", ""]
    lines += ["## Headline", ""] + [f"- {h}" for h in res["headline"]] + [""]
    for name, w in res["windows"].items():
        lines += [f"## Effect over {name} from the intervention step on", "",
                  "| dimension | category | baseline | intervened | effect (points) | 95% interval | runs |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for d, cats in w["effect"].items():
            for c, e in cats.items():
                b, i = w["baseline_share"][d][c], w["intervened_share"][d][c]
                ci = "-" if e["ci95"] is None else f"{100 * e['ci95'][0]:+.1f} to {100 * e['ci95'][1]:+.1f}"
                lines.append(f"| {d} | {c} | {'-' if b is None else f'{100 * b:.1f}%'} | "
                             f"{'-' if i is None else f'{100 * i:.1f}%'} | {_pts(e['mean'])} | {ci} | {e['n']} |")
        lines.append("")
    if res.get("meanfield"):
        lines += ["## The mean field the policy read (run r0)", ""]
        for row in res["meanfield"]:
            lines += [f"Step {row['step']}:", "", f"- baseline: {row['baseline']}",
                      f"- intervened: {row['intervened']}", ""]
    if res.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]] + [""]
    return "\n".join(lines)
