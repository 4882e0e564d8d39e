"""Fidelity benchmark: every method on the same events, model, seeds and warm-up; one table.

``run_fidelity(FidelitySettings(...))`` (CLI: ``mfllm bench fidelity``) simulates each method into
``OUT/runs/<row>/`` (a normal run directory: ``mfllm export`` / ``evaluate`` / ``compare`` read it),
evaluates every run with :func:`mfllm.evaluation.evaluate.evaluate_run`, and writes
``OUT/results.json`` and ``OUT/results.md`` (shape: docs/results.md).

Rows
    ``mf``, ``state``, ``recent``, ``popular`` (the paper's methods), the built-in ablations
    ``mf-llm`` (mean field written by the LLM summariser), ``mf-tf`` (teacher forcing: the mean field is
    fed the real actions in rollout, an upper bound), and the diagnostics ``mf-empty`` (the policy always
    reads the empty mean field) and ``mf-shuffled`` (it reads another event's mean field, taken from this
    bench's ``mf`` run at the same step), plus user variants ``NAME=BASE:key=val,...`` (see
    :func:`parse_variant`). The LLM-free baselines ``persistence`` and ``marginal`` are scored by every
    evaluation and taken from the ``mf`` run (else the first row): they depend only on the real data,
    which is the same for every row.

Same events, seeds and warm-up
    Every row gets the same event list, ``seed`` (per-agent seeds derive from (seed, event, action)),
    warm-up, step size and rollout cap, so the rollouts cover the same real agents.

Resumable
    Re-running the same command continues: a complete run (``done.json``) is skipped, an incomplete one
    is resumed with :func:`mfllm.simulation.runner.resume`, a missing one is started. A run directory made
    with other settings is refused (choose another ``--out``). Evaluation is re-run each time (the
    shared label cache makes it cheap). Each session's wall time and backend counters are appended to
    ``OUT/cost.json`` so the cost of a run interrupted and resumed is still complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mfllm.errors import ConfigError
from mfllm.simulation.interventions import Intervention

SCHEMA = 1
KIND = "mfllm-bench-fidelity"
HORIZONS: tuple[str, ...] = ("short", "mid", "long")
# results["methods"][ROW][METRIC][HORIZON]; tv is kept as an extra.
METRICS: tuple[str, ...] = ("kl", "js", "wasserstein", "tv", "dtw", "micro_f1")
TABLE_METRICS: tuple[str, ...] = ("kl", "js", "wasserstein", "dtw", "micro_f1")
HIGHER_IS_BETTER = frozenset({"micro_f1"})
BASELINES: tuple[str, ...] = ("persistence", "marginal")
BASE_METHODS: tuple[str, ...] = ("mf", "state", "recent", "popular")
DEFAULT_METHODS = "mf,state,recent,popular"
CONTEXTS = ("own", "empty", "shuffled")


# ------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a method and its settings."""

    name: str
    method: str  # mf | state | recent | popular
    meanfield: str | None = None  # stats | llm (None = the bench's --meanfield)
    teacher_forcing: bool = False
    policy_adapter: str | None = None  # a LoRA adapter directory (peft)
    meanfield_adapter: str | None = None
    context: str = "own"  # mf only: own | empty (always the empty mean field) | shuffled (another event's)
    meanfield_max_new_tokens: int | None = None  # llm mean field's summary budget (None: SimConfig's default)

    @property
    def is_mf(self) -> bool:
        return self.method == "mf"


BUILTIN: dict[str, MethodSpec] = {
    "mf": MethodSpec("mf", "mf"),
    "state": MethodSpec("state", "state"),
    "recent": MethodSpec("recent", "recent"),
    "popular": MethodSpec("popular", "popular"),
    "mf-llm": MethodSpec("mf-llm", "mf", meanfield="llm"),
    "mf-tf": MethodSpec("mf-tf", "mf", teacher_forcing=True),
    "mf-empty": MethodSpec("mf-empty", "mf", context="empty"),
    "mf-shuffled": MethodSpec("mf-shuffled", "mf", context="shuffled"),
}

_KEYS = {
    "meanfield": "meanfield", "mf": "meanfield",
    "teacher_forcing": "teacher_forcing", "tf": "teacher_forcing",
    "policy_adapter": "policy_adapter", "policy": "policy_adapter",
    "meanfield_adapter": "meanfield_adapter", "mfa": "meanfield_adapter",
    "context": "context",
    "meanfield_max_new_tokens": "meanfield_max_new_tokens", "mfmax": "meanfield_max_new_tokens",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_variant(text: str) -> MethodSpec:
    """``NAME=BASE[:key=val,key=val...]`` -> a row named NAME.

    BASE is a method (mf, state, recent, popular) or a built-in row (mf-llm, mf-tf, ...). Keys:
    ``meanfield``/``mf`` (stats|llm), ``teacher_forcing``/``tf`` (true|false), ``policy_adapter``/``policy``
    (adapter dir), ``meanfield_adapter``/``mfa`` (adapter dir, for meanfield=llm), ``context`` (own|empty|
    shuffled; mf only), ``meanfield_max_new_tokens``/``mfmax`` (the llm mean field's summary budget).
    Example: ``mf-ib=mf:policy=ckpt/policy,mfa=ckpt/meanfield,mf=llm,mfmax=64``.
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ConfigError(f"variant {text!r}: expected NAME=BASE[:key=val,...]", field="variant")
    if name in BUILTIN or name in BASELINES:
        raise ConfigError(f"variant {text!r}: {name!r} is a built-in row name; choose another", field="variant")
    base, _, opts = rest.partition(":")
    base = base.strip()
    if base not in BUILTIN:
        raise ConfigError(f"variant {text!r}: unknown base {base!r} (choose one of {', '.join(BUILTIN)})",
                          field="variant")
    spec = replace(BUILTIN[base], name=name)
    for kv in filter(None, (x.strip() for x in opts.split(","))):
        k, eq, v = kv.partition("=")
        key = _KEYS.get(k.strip().lower())
        if not eq or key is None:
            raise ConfigError(f"variant {text!r}: bad option {kv!r} (keys: {', '.join(sorted(set(_KEYS)))})",
                              field="variant")
        v = v.strip()
        if key == "teacher_forcing":
            if v.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"variant {text!r}: tf must be true or false", field="variant")
            spec = replace(spec, teacher_forcing=v.lower() in _TRUE)
        elif key == "meanfield":
            if v not in ("stats", "llm"):
                raise ConfigError(f"variant {text!r}: meanfield must be stats or llm", field="variant")
            spec = replace(spec, meanfield=v)
        elif key == "context":
            if v not in CONTEXTS:
                raise ConfigError(f"variant {text!r}: context must be one of {', '.join(CONTEXTS)}", field="variant")
            spec = replace(spec, context=v)
        elif key == "meanfield_max_new_tokens":
            if not v.isdigit() or int(v) < 1:
                raise ConfigError(f"variant {text!r}: mfmax must be a whole number >= 1", field="variant")
            spec = replace(spec, meanfield_max_new_tokens=int(v))
        else:
            spec = replace(spec, **{key: v})
    _check_spec(spec, text)
    return spec


def _check_spec(spec: MethodSpec, where: str) -> None:
    if not spec.is_mf and (spec.context != "own" or spec.teacher_forcing or spec.meanfield == "llm"):
        raise ConfigError(f"{where}: context / teacher forcing / meanfield=llm only apply to mf rows", field="variant")
    if spec.meanfield_max_new_tokens is not None and (not spec.is_mf or spec.meanfield == "stats"):
        raise ConfigError(f"{where}: mfmax only applies to rows with meanfield=llm", field="variant")


def parse_methods(methods: str, variants: Sequence[str] = ()) -> list[MethodSpec]:
    """The rows: the comma-separated built-in names of ``methods``, then each ``--variant``."""
    names = [m.strip() for m in (methods or "").split(",") if m.strip()]
    specs: list[MethodSpec] = []
    for n in names:
        if n not in BUILTIN:
            raise ConfigError(f"unknown method {n!r}: choose from {', '.join(BUILTIN)} or define it with "
                              "--variant NAME=BASE:key=val,...", field="methods")
        specs.append(BUILTIN[n])
    specs += [parse_variant(v) for v in variants]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"row {s.name!r} is listed twice", field="methods")
        seen.add(s.name)
    if not specs:
        raise ConfigError("no method to run", field="methods")
    if any(s.context == "shuffled" for s in specs) and "mf" not in seen:
        raise ConfigError("mf-shuffled reads the mean field of the bench's mf run: add mf to --methods",
                          field="methods")
    # mf first (baselines and the shuffled control read it), shuffled rows last
    specs.sort(key=lambda s: (s.name != "mf", s.context == "shuffled"))
    return specs


# ------------------------------------------------------------------------------------------- settings


@dataclass
class FidelitySettings:
    out: str
    data: str | None = None  # None = the shipped sample
    split: str = "all"
    limit: int | None = None
    events: list[str] | None = None
    methods: str = DEFAULT_METHODS
    variants: list[str] = field(default_factory=list)
    model: str | None = None  # None = the shipped mfllm-mini (hf)
    backend: str = "hf"
    backend_options: dict = field(default_factory=dict)
    labeler: str = "rules"
    label_cache: str | None = None  # None = the shared default file; "" = none
    marginal: str | None = None
    seed: int = 0
    warmup: int = 48
    warmups: list[int] | None = None
    max_agents: int | None = None
    step_size: int = 16
    meanfield: str = "stats"
    events_in_flight: int | None = None
    policy_adapter: str | None = None
    meanfield_adapter: str | None = None
    label: str | None = None
    min_rollout: int = 16
    reference: str = "mf"  # the row the ablation table compares every other mf row with
    bin_by: str = "steps"
    bin_size: float = 1
    reports: bool = False
    bootstrap: int = 2000
    progress: bool = True

    def all_warmups(self) -> list[int]:
        ws = list(dict.fromkeys(self.warmups or [self.warmup]))
        if any(w < 0 for w in ws):
            raise ConfigError("warm-ups must be >= 0", field="warmups")
        return ws

    def main_warmup(self) -> int:
        ws = self.all_warmups()
        return self.warmup if self.warmup in ws else ws[0]

    def command(self) -> str:
        """The CLI command that reproduces these settings."""
        a = ["mfllm", "bench", "fidelity"]
        if self.data is not None:
            a += ["--data", self.data]
        a += ["--split", self.split]
        if self.limit is not None:
            a += ["--limit", str(self.limit)]
        if self.events:
            a += ["--events", ",".join(self.events)]
        a += ["--methods", self.methods]
        for v in self.variants:
            a += ["--variant", v]
        if self.model:
            a += ["--model", self.model]
        if self.backend != "hf":
            a += ["--backend", self.backend]
        for k in ("base_url", "api", "device"):
            if self.backend_options.get(k):
                a += [f"--{k.replace('_', '-')}", str(self.backend_options[k])]
        a += ["--labeler", self.labeler, "--seed", str(self.seed), "--warmup", str(self.warmup)]
        if self.warmups:
            a += ["--warmups", ",".join(map(str, self.warmups))]
        if self.max_agents is not None:
            a += ["--max-agents", str(self.max_agents)]
        if self.step_size != 16:
            a += ["--step-size", str(self.step_size)]
        if self.meanfield != "stats":
            a += ["--meanfield", self.meanfield]
        if self.events_in_flight:
            a += ["--events-in-flight", str(self.events_in_flight)]
        for k in ("policy_adapter", "meanfield_adapter", "label", "marginal"):
            if getattr(self, k):
                a += [f"--{k.replace('_', '-')}", str(getattr(self, k))]
        if self.min_rollout != 16:
            a += ["--min-rollout", str(self.min_rollout)]
        if self.reference != "mf":
            a += ["--reference", self.reference]
        if (self.bin_by, self.bin_size) != ("steps", 1):
            a += ["--bin-by", self.bin_by, "--bin-size", f"{self.bin_size:g}"]
        a += ["--out", self.out]
        return shlex.join(a)


def resolve_specs(settings: FidelitySettings) -> list[MethodSpec]:
    """Rows with the bench-wide defaults applied (--meanfield, --policy-adapter, --meanfield-adapter)."""
    out = []
    for s in parse_methods(settings.methods, settings.variants):
        mf_model = s.meanfield or (settings.meanfield if s.is_mf else "stats")
        s = replace(s, meanfield=mf_model,
                    policy_adapter=s.policy_adapter or settings.policy_adapter,
                    meanfield_adapter=s.meanfield_adapter or (settings.meanfield_adapter if mf_model == "llm" else None))
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------- events


def select_events(settings: FidelitySettings):
    """(events, info): the split's events in id order with at least max(warm-ups) + min_rollout actions
    (so every warm-up has a rollout to score), then the first ``limit``."""
    from mfllm.data.load import load_events
    from mfllm.paths import SAMPLE_DATA

    data = settings.data or str(SAMPLE_DATA)
    res = load_events(data, split=settings.split, event_ids=settings.events)
    if settings.events:
        missing = set(settings.events) - {e.event_id for e in res.events}
        if missing:
            raise ConfigError(f"events not found in {data} (split {settings.split}): {', '.join(sorted(missing)[:5])}",
                              field="events")
    need = max(settings.all_warmups()) + max(1, settings.min_rollout)
    ok = [e for e in res.events if len(e.actions) >= need]
    events = ok[: settings.limit] if settings.limit is not None else ok
    if not events:
        raise ConfigError(f"no event of {data} (split {settings.split}) has the {need} actions needed "
                          f"(warm-up {max(settings.all_warmups())} + {settings.min_rollout} rollout)")
    info = {"data": str(Path(data).resolve()), "split": settings.split, "in_split": len(res.events),
            "too_short": len(res.events) - len(ok), "min_actions": need, "selected": len(events)}
    return events, info


# ------------------------------------------------------------------------------------------- interventions


class EmptyMeanField(Intervention):
    """The policy reads the empty mean field at every step (diagnostic: is m_t used at all?)."""

    def __init__(self, lang: str = "zh"):
        from mfllm.prompts.templates import strings

        self.text = strings(lang)["empty_meanfield"]

    def meanfield_text(self, event_id: str, step: int, text: str) -> str:
        return self.text


class DonorMeanField(Intervention):
    """The policy reads another event's mean field at the same step (diagnostic: is m_t used as
    information about *this* event, or only as a generic prompt?). ``donors[event][s]`` is the text the
    donor's policy read at step s (the donor's record of step s-1)."""

    def __init__(self, donor_of: dict[str, str], reads: dict[str, list[str]]):
        self.donor_of, self.reads = donor_of, reads

    def meanfield_text(self, event_id: str, step: int, text: str) -> str:
        seq = self.reads.get(self.donor_of.get(event_id, ""), [])
        return seq[min(step, len(seq) - 1)] if seq else text


def _donor_reads(mf_run: Path, lang: str) -> dict[str, list[str]]:
    from mfllm.prompts.templates import strings
    from mfllm.store.run import iter_steps

    per: dict[str, dict[int, str]] = {}
    for rec in iter_steps(mf_run):
        per.setdefault(rec["event_id"], {})[int(rec["step"])] = rec["meanfield"]
    empty = strings(lang)["empty_meanfield"]
    out = {}
    for e, steps in per.items():
        n = max(steps) + 2
        seq, last = [], empty
        for s in range(n):
            seq.append(last)
            last = steps.get(s, last)
        out[e] = seq
    return out


# ------------------------------------------------------------------------------------------- running


def run_key(spec: MethodSpec, warmup: int, main_warmup: int) -> str:
    """Run directory under OUT/runs/: ``<row>`` for the main warm-up, ``w<W>/<row>`` for the others."""
    return spec.name if warmup == main_warmup else f"w{warmup}/{spec.name}"


def _adapter_role(kind: str, path: str) -> str:
    h = hashlib.blake2b(str(Path(path).expanduser().resolve()).encode(), digest_size=4).hexdigest()
    return f"{kind}-{h}"


def sim_config(settings: FidelitySettings, spec: MethodSpec, warmup: int):
    from mfllm.simulation.engine import SimConfig

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
    return SimConfig(**kw)


def _adapters(spec: MethodSpec) -> dict[str, str]:
    out = {}
    if spec.policy_adapter:
        out[_adapter_role("policy", spec.policy_adapter)] = str(Path(spec.policy_adapter).expanduser().resolve())
    if spec.meanfield_adapter:
        out[_adapter_role("meanfield", spec.meanfield_adapter)] = str(Path(spec.meanfield_adapter).expanduser().resolve())
    return out


# Fields of the stored sim config that do not change results (batching is invisible to per-agent seeds).
_IGNORED_SIM = ("events_in_flight",)


def _intervention_spec(spec: MethodSpec) -> dict | None:
    return None if spec.context == "own" else {"bench_fidelity_context": spec.context}


def check_run_config(run_dir: Path, expected_sim: dict, events: list[str], spec: MethodSpec) -> None:
    """Refuse to continue a run directory made with other settings."""
    from mfllm.simulation.engine import SimConfig
    from mfllm.store.run import RunStore

    cfg = RunStore(run_dir).config()
    # A setting added after the run was made is absent from its config: it ran with that setting's default.
    stored = {k: f.default for k, f in SimConfig.model_fields.items()} | (cfg.get("sim") or {})
    got = {k: v for k, v in stored.items() if k not in _IGNORED_SIM}
    want = {k: v for k, v in expected_sim.items() if k not in _IGNORED_SIM}
    diffs = [f"{k}: {got.get(k)!r} (stored) vs {want.get(k)!r}" for k in sorted(set(got) | set(want))
             if got.get(k) != want.get(k)]
    if cfg.get("events") != events:
        diffs.append(f"events: {len(cfg.get('events') or [])} stored vs {len(events)} selected")
    if cfg.get("interventions") != _intervention_spec(spec):
        diffs.append(f"interventions: {cfg.get('interventions')!r} vs {_intervention_spec(spec)!r}")
    if diffs:
        raise ConfigError(f"{run_dir} was made with other settings ({'; '.join(diffs[:4])}); "
                          "use another --out, or delete that run directory")


class CostLedger:
    """OUT/cost.json: per run key, the sessions that simulated it (wall seconds, backend counters)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, list[dict]] = {}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                self.data = {}

    def add(self, key: str, session: dict) -> None:
        from mfllm.store.run import atomic_write_json

        self.data.setdefault(key, []).append(session)
        atomic_write_json(self.path, self.data)


@dataclass
class RunOutcome:
    key: str
    spec: MethodSpec
    warmup: int
    run_dir: Path
    status: str  # skipped | new | resumed


def _log(console, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False)


def run_all(settings: FidelitySettings, specs: list[MethodSpec], events, data_path: str, console=None,
            backend_factory: Callable[[dict], Any] | None = None) -> list[RunOutcome]:
    """Simulate every (warm-up, row) that is not complete yet. One backend serves every run."""
    from mfllm.backends.base import BackendStats
    from mfllm.simulation.runner import Interrupted, make_backend, resume, simulate
    from mfllm.store.run import CONFIG, RunStore

    out = Path(settings.out)
    runs = out / "runs"
    ledger = CostLedger(out / "cost.json")
    ids = [e.event_id for e in events]
    main_w = settings.main_warmup()
    adapters: dict[str, str] = {}
    for s in specs:
        adapters.update(_adapters(s))
    backend = None

    def get_backend():
        nonlocal backend
        if backend is None:
            opts = dict(settings.backend_options)
            if adapters:
                opts["adapters"] = dict(adapters)
            if backend_factory is not None:
                backend = backend_factory(opts)
            else:
                backend = make_backend(settings.backend, settings.model, **opts)
        return backend

    plan = [(w, s) for w in settings.all_warmups() for s in specs]
    outcomes = []
    for i, (w, spec) in enumerate(plan, 1):
        key = run_key(spec, w, main_w)
        rd = runs / key
        cfg = sim_config(settings, spec, w)
        tag = f"[{i}/{len(plan)}] {key}"
        if (rd / CONFIG).is_file():
            check_run_config(rd, cfg.model_dump(), ids, spec)
            if RunStore(rd).is_done():
                _log(console, f"{tag}: complete, skipped")
                outcomes.append(RunOutcome(key, spec, w, rd, "skipped"))
                continue
            status = "resumed"
        else:
            if rd.exists() and any(rd.iterdir()):
                raise ConfigError(f"{rd} exists and is not a run directory; move it away")
            status = "new"
        interventions = None
        if spec.context == "empty":
            interventions = [EmptyMeanField(cfg.lang)]
        elif spec.context == "shuffled":
            donor_run = runs / run_key(BUILTIN["mf"], w, main_w)
            if not RunStore(donor_run).is_done():
                raise ConfigError(f"{key} needs the complete mf run {donor_run}")
            donor_of = {e: ids[(j + 1) % len(ids)] for j, e in enumerate(ids)}
            interventions = [DonorMeanField(donor_of, _donor_reads(donor_run, cfg.lang))]
        be = get_backend()
        be.stats = BackendStats()
        _log(console, f"{tag}: {'starting' if status == 'new' else 'resuming'} ({len(events)} events, warm-up {w})")
        t0 = time.time()
        session = {"mode": status, "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            if status == "new":
                rd.parent.mkdir(parents=True, exist_ok=True)
                simulate(data_path, str(rd), config=cfg, backend=be, backend_name=settings.backend,
                         model=settings.model, backend_options=_stored_options(settings, spec),
                         interventions=interventions, intervention_spec=_intervention_spec(spec),
                         progress=settings.progress, loaded=events)
            else:
                resume(str(rd), backend=be, progress=settings.progress, interventions=interventions or [])
        except Interrupted:
            raise Interrupted(f"stopped at a step boundary in {rd}; nothing is lost. "
                              "Run the same command again to continue.") from None
        finally:
            session.update(wall_seconds=round(time.time() - t0, 3), backend=be.stats.to_dict(),
                           complete=RunStore(rd).is_done())
            ledger.add(key, session)
        outcomes.append(RunOutcome(key, spec, w, rd, status))
    return outcomes


def _stored_options(settings: FidelitySettings, spec: MethodSpec) -> dict:
    """backend_options written to the run's config.json (what `mfllm simulate --resume` rebuilds)."""
    opts = {k: v for k, v in settings.backend_options.items() if v is not None}
    ad = _adapters(spec)
    if ad:
        opts["adapters"] = ad
    return opts


# ------------------------------------------------------------------------------------------- aggregation


def _mean(xs) -> float | None:
    v = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def _summ(xs) -> dict:
    from mfllm.evaluation.metrics import summarize

    return summarize(list(xs))


def per_event_values(metrics_by_row: dict[str, dict], event_ids: Sequence[str], base_row: str,
                     dims: Sequence[str] | None = None) -> dict:
    """vals[row][horizon][metric] = [value or None per event]; baselines from ``base_row``'s run.
    The value is the evaluation's macro over dimensions, or with ``dims`` the mean over those
    dimensions (the ones with a value)."""

    def one(sc: dict | None, met: str) -> float | None:
        if sc is None:
            return None
        if dims is None:
            return sc["macro"].get(met)
        return _mean([(sc["dimensions"].get(d) or {}).get(met) for d in dims])

    def take(m: dict, src: str) -> dict:
        return {h: {met: [one(m["events"][e]["scores"].get(src, {}).get(h), met) for e in event_ids]
                    for met in METRICS} for h in HORIZONS}

    vals = {row: take(m, m["method"]) for row, m in metrics_by_row.items()}
    for b in BASELINES:
        vals[b] = take(metrics_by_row[base_row], b)
    return vals


def compare_pair(a: Sequence, b: Sequence, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Relative change of the mean of ``a`` against the mean of ``b`` over the events where both exist:
    ``(mean_a - mean_b) / mean_b`` (negative = a lower), with a paired bootstrap 95% interval over events,
    the share of events where a < b, and the per-event difference's mean / std / CI."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True)
             if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)]
    if not pairs:
        return None
    xa, xb = np.array(pairs, dtype=float).T
    ma, mb = float(xa.mean()), float(xb.mean())
    change = (ma - mb) / mb if mb != 0 else None
    ci = None
    if n_boot > 0 and len(xa) >= 2 and mb != 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
        ba, bb = xa[idx].mean(1), xb[idx].mean(1)
        ok = bb != 0
        r = (ba[ok] - bb[ok]) / bb[ok]
        ci = [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))] if r.size else None
    return {"kl": ma, "against_kl": mb, "change": change, "change_ci95": ci,
            "wins": float(np.mean(xa < xb)), "n": int(len(xa)), "diff": _summ(xa - xb)}


def relative_kl(vals: dict, mf_rows: Sequence[str], non_mf_rows: Sequence[str], n_boot: int = 2000,
                metric: str = "kl", reference: str = "mf") -> dict:
    """For every mf row and horizon: its KL against the best (lowest mean KL) non-MF row, against each
    baseline and against every non-MF row. ``change = (KL_mf - KL_other) / KL_other`` (negative = mf better).
    Every mf row but ``reference`` is also compared with it (``vs_reference``; ``vs_mf`` when it is mf).
    """
    out: dict[str, dict] = {}
    for r in mf_rows:
        out[r] = {}
        for h in HORIZONS:
            mine = vals[r][h][metric]
            entry: dict[str, Any] = {"kl": _mean(mine)}
            means = {o: _mean(vals[o][h][metric]) for o in non_mf_rows}
            means = {o: v for o, v in means.items() if v is not None}
            vs = {o: compare_pair(mine, vals[o][h][metric], n_boot) for o in non_mf_rows}
            if means:
                best = min(means, key=means.get)
                entry["vs_best_non_mf"] = {"against": best, **(vs[best] or {})}
            else:
                entry["vs_best_non_mf"] = None
            for b in BASELINES:
                c = compare_pair(mine, vals[b][h][metric], n_boot) if b in vals else None
                entry[f"vs_{b}"] = {"against": b, **c} if c else None
            entry["vs"] = {o: c for o, c in vs.items() if c}
            if r != reference and reference in vals:  # ablations / diagnostics against the reference row
                c = compare_pair(mine, vals[reference][h][metric], n_boot)
                entry["vs_reference"] = {"against": reference, **c} if c else None
                if reference == "mf":
                    entry["vs_mf"] = entry["vs_reference"]
            out[r][h] = entry
    return out


def _changes(entry: dict) -> dict:
    """A relative_kl entry reduced to its changes (per-domain tables)."""
    best = entry.get("vs_best_non_mf") or {}
    out = {"best_non_mf": best.get("against"), "vs_best_non_mf": best.get("change")}
    for b in BASELINES:
        out[f"vs_{b}"] = (entry.get(f"vs_{b}") or {}).get("change")
    return out


def _table(vals: dict, rows: Sequence[str]) -> tuple[dict, dict]:
    methods, spread = {}, {}
    for r in rows:
        methods[r], spread[r] = {}, {}
        for met in METRICS:
            methods[r][met], spread[r][met] = {}, {}
            for h in HORIZONS:
                s = _summ(vals[r][h][met])
                methods[r][met][h] = s["mean"]
                spread[r][met][h] = {"std": s["std"], "ci95": s["ci95"], "n": s["n"]}
    return methods, spread


def aggregate(metrics_by_row: dict[str, dict], specs: dict[str, MethodSpec], event_meta: dict[str, dict],
              n_boot: int = 2000, reference: str = "mf") -> dict:
    """The results block of one warm-up: tables, spreads, relative KL, per dimension, per domain."""
    from mfllm.labels.dimensions import ALL_DIMENSIONS

    rows = list(metrics_by_row)
    base_row = "mf" if "mf" in metrics_by_row else rows[0]
    common = [e for e in event_meta if all(e in m["events"] for m in metrics_by_row.values())]
    if not common:
        raise ConfigError("the runs have no evaluated event in common")
    all_rows = [*rows, *BASELINES]
    vals = per_event_values(metrics_by_row, common, base_row)
    methods, spread = _table(vals, all_rows)
    mf_rows = [r for r in rows if specs[r].is_mf]
    non_mf = [r for r in rows if not specs[r].is_mf]
    rel = relative_kl(vals, mf_rows, non_mf, n_boot, reference=reference)
    label_dims = [d for d in ALL_DIMENSIONS if d != "keywords"]
    vals_nk = per_event_values(metrics_by_row, common, base_row, dims=label_dims)
    nk_methods, nk_spread = _table(vals_nk, all_rows)
    without_kw = {"dimensions": label_dims, "methods": nk_methods, "spread": nk_spread,
                  "relative_kl": relative_kl(vals_nk, mf_rows, non_mf, n_boot, reference=reference)}

    dims: dict = {}
    for r, m in [*((r, (metrics_by_row[r], metrics_by_row[r]["method"])) for r in rows),
                 *((b, (metrics_by_row[base_row], b)) for b in BASELINES)]:
        met_dict, src = m
        dims[r] = {}
        for h in HORIZONS:
            dims[r][h] = {}
            for d in ALL_DIMENSIONS:
                dims[r][h][d] = {}
                for met in METRICS:
                    xs = []
                    for e in common:
                        sc = met_dict["events"][e]["scores"].get(src, {}).get(h)
                        xs.append(None if sc is None else (sc["dimensions"].get(d) or {}).get(met))
                    dims[r][h][d][met] = _mean(xs)

    domains: dict = {}
    by_dom: dict[str, list[int]] = {}
    for i, e in enumerate(common):
        by_dom.setdefault(event_meta[e]["domain"], []).append(i)
    for dom, idx in sorted(by_dom.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        sub = {r: {h: {met: [vals[r][h][met][i] for i in idx] for met in METRICS} for h in HORIZONS}
               for r in all_rows}
        dm, _ = _table(sub, all_rows)
        domains[dom] = {"n_events": len(idx), "events": [common[i] for i in idx], "methods": dm,
                        "relative_kl": {r: {h: _changes(e) for h, e in per_h.items()}
                                        for r, per_h in relative_kl(sub, mf_rows, non_mf, 0).items()}}
    return {"rows": all_rows, "base_row": base_row, "n_events": len(common), "events": common,
            "methods": methods, "spread": spread, "relative_kl": rel, "without_keywords": without_kw,
            "dimensions": dims, "domains": domains,
            "per_event": {r: {h: {"kl": vals[r][h]["kl"], "js": vals[r][h]["js"]} for h in HORIZONS}
                          for r in all_rows}}


def run_cost(run_dir: Path, sessions: list[dict]) -> dict:
    """Agents and tokens from the run's step records (the whole run, over every session); wall time
    and backend calls from the bench's sessions (else done.json's)."""
    from mfllm.store.run import iter_steps

    agents = prompt = gen = 0
    sim_seconds = 0.0
    for rec in iter_steps(run_dir):
        sim_seconds += float(rec.get("seconds") or 0.0)
        if rec["phase"] != "rollout":
            continue
        for a in rec["actions"]:
            if a.get("injected"):
                continue
            agents += 1
            prompt += int(a.get("prompt_tokens") or 0)
            gen += int(a.get("generated_tokens") or 0)
    if sessions:
        wall = sum(s.get("wall_seconds", 0.0) for s in sessions)
        be = [s.get("backend") or {} for s in sessions]
    else:
        done = run_dir / "done.json"
        d = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else {}
        wall = float(d.get("seconds") or 0.0)
        be = [d.get("backend_stats") or {}]
    calls = sum(int(b.get("calls") or 0) for b in be)
    requests = sum(int(b.get("requests") or 0) for b in be)
    cached = sum(int(b.get("cached_prompt_tokens") or 0) for b in be)

    def per(x: int) -> float | None:
        return round(x / agents, 2) if agents else None

    return {"agents": agents, "wall_seconds": round(wall, 1), "sim_seconds": round(sim_seconds, 1),
            "agents_per_second": round(agents / wall, 2) if wall > 0 else None,
            "sessions": len(sessions) or None, "llm_calls": calls, "llm_requests": requests,
            "prompt_tokens": prompt, "generated_tokens": gen, "cached_prompt_tokens": cached,
            "prompt_tokens_per_agent": per(prompt), "generated_tokens_per_agent": per(gen),
            "llm_requests_per_agent": per(requests)}


def model_fingerprint(model: str | None) -> str | None:
    """sha256 of a local model's weights (model.safetensors), so a table names the exact checkpoint."""
    if not model:
        return None
    f = Path(model) / "model.safetensors"
    if not f.is_file():
        return None
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def machine_info(device: str | None = None) -> dict:
    from mfllm.bench.machine import cpu_name, load_avg, usable_cpus

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
            "cpus_usable": usable_cpus(), "load_avg": load_avg(), "device": device}


# ------------------------------------------------------------------------------------------- the bench


def run_fidelity(settings: FidelitySettings, console=None, backend_factory=None) -> dict:
    """Simulate (or continue), evaluate, aggregate; write OUT/results.json and OUT/results.md."""
    from mfllm.evaluation.domains import tag_domain
    from mfllm.evaluation.evaluate import evaluate_run
    from mfllm.paths import DEFAULT_MODEL
    from mfllm.store.run import atomic_write_json, atomic_write_text

    t_start = time.time()
    out = Path(settings.out)
    specs = resolve_specs(settings)
    by_name = {s.name: s for s in specs}
    if settings.reference not in by_name or not by_name[settings.reference].is_mf:
        raise ConfigError(f"--reference {settings.reference!r} is not a mean-field row of this bench (rows: "
                          f"{', '.join(by_name)})", field="reference")
    for s in specs:
        for p in (s.policy_adapter, s.meanfield_adapter):
            if p and not Path(p).expanduser().is_dir():
                raise ConfigError(f"row {s.name}: adapter directory {p} does not exist", field="adapter")
    warnings: list[str] = []
    if settings.meanfield_adapter and not any(s.meanfield == "llm" for s in specs):
        warnings.append("--meanfield-adapter is ignored: no row uses the llm mean field (--meanfield llm)")
    events, sel = select_events(settings)
    if sel["too_short"]:
        warnings.append(f"{sel['too_short']} event(s) of the split with fewer than {sel['min_actions']} actions "
                        "were not selected")
    out.mkdir(parents=True, exist_ok=True)
    _log(console, f"fidelity bench: {len(specs)} row(s) x {len(settings.all_warmups())} warm-up(s) on "
                  f"{len(events)} events -> {out}")
    outcomes = run_all(settings, specs, events, sel["data"], console, backend_factory)

    ledger = CostLedger(out / "cost.json")
    meta = {e.event_id: {"domain": tag_domain(e.source.text), "n_actions": len(e.actions)} for e in events}
    eval_kw = dict(labeler=settings.labeler, bin_size=settings.bin_size, bin_by=settings.bin_by,
                   cache=settings.label_cache, marginal=settings.marginal, plots=settings.reports,
                   report=settings.reports)
    per_w: dict[int, dict] = {}
    metrics_any = None
    for w in settings.all_warmups():
        mets: dict[str, dict] = {}
        for o in (o for o in outcomes if o.warmup == w):
            _log(console, f"evaluate {o.key}")
            mets[o.spec.name] = evaluate_run(o.run_dir, **eval_kw)
            metrics_any = mets[o.spec.name]
        block = aggregate(mets, by_name, meta, settings.bootstrap, settings.reference)
        block["cost"] = {o.spec.name: run_cost(o.run_dir, ledger.data.get(o.key, []))
                         for o in outcomes if o.warmup == w}
        block["runs"] = {o.spec.name: str(Path("runs") / o.key) for o in outcomes if o.warmup == w}
        block["marginal_source"] = mets[block["base_row"]]["baselines"]["marginal"]
        block["warnings"] = sorted({x for m in mets.values() for x in m.get("warnings", [])})
        per_w[w] = block

    main = per_w[settings.main_warmup()]
    warnings += main["warnings"]
    if main["methods"]["marginal"]["kl"]["long"] is None and not any("marginal" in w for w in warnings):
        warnings.append("marginal baseline unavailable: " + str(main["marginal_source"]))
    cfg_example = json.loads((outcomes[0].run_dir / "config.json").read_text(encoding="utf-8"))
    model_path = settings.model or (str(DEFAULT_MODEL) if settings.backend == "hf" else None)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": KIND,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": settings.command(),
        "label": settings.label,
        "settings": {
            "data": sel["data"], "split": settings.split, "limit": settings.limit,
            "events_selection": sel, "seed": settings.seed, "warmup": settings.main_warmup(),
            "warmups": settings.all_warmups(), "max_agents": settings.max_agents, "step_size": settings.step_size,
            "model": model_path,
            "model_sha256": model_fingerprint(model_path),
            "backend": settings.backend, "backend_described": cfg_example.get("backend"),
            "labeler": metrics_any["labeler"] if metrics_any else {"name": settings.labeler},
            "binning": metrics_any["binning"] if metrics_any else None,
            "horizons": metrics_any["horizons"] if metrics_any else None,
            "eps": metrics_any["eps"] if metrics_any else None,
            "marginal": main["marginal_source"],
            "bootstrap": settings.bootstrap,
            "reference": settings.reference,
        },
        "machine": machine_info((cfg_example.get("backend") or {}).get("device")),
        "specs": {s.name: asdict(s) for s in specs},
        "rows": main["rows"],
        "baselines": list(BASELINES),
        "metrics": list(METRICS),
        "horizons": list(HORIZONS),
        "n_events": main["n_events"],
        "events": main["events"],
        "methods": main["methods"],
        "spread": main["spread"],
        "relative_kl": main["relative_kl"],
        "without_keywords": main["without_keywords"],
        "dimensions": main["dimensions"],
        "domains": main["domains"],
        "cost": main["cost"],
        "runs": main["runs"],
        "per_event": main["per_event"],
    }
    if len(per_w) > 1:
        results["warmup_sensitivity"] = {
            str(w): {"n_events": b["n_events"], "methods": b["methods"], "spread": b["spread"],
                     "relative_kl": b["relative_kl"], "without_keywords": b["without_keywords"],
                     "cost": b["cost"], "runs": b["runs"]}
            for w, b in per_w.items()}
    results["warnings"] = warnings
    results["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render_markdown(results))
    return results


# ------------------------------------------------------------------------------------------- markdown


def _f(x: float | None, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def _ci_pct(ci) -> str:
    return "–" if not ci else f"[{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]"


def _rel_cell(c: dict | None, name: bool = False) -> str:
    if not c:
        return "–"
    s = f"{_pct(c.get('change'))} {_ci_pct(c.get('change_ci95'))}"
    if c.get("wins") is not None:
        s += f", wins {round(100 * c['wins'])}%"
    return (f"{c['against']}: " if name and c.get("against") else "") + s


def _relative_rows(rel: dict) -> list[str]:
    """One table line per mean-field row and horizon: KL, then against the best non-MF row and the baselines."""
    lines = []
    for row, per_h in rel.items():
        for h in HORIZONS:
            e = per_h[h]
            lines.append(f"| {row} | {h} | {_f(e['kl'])} | {_rel_cell(e['vs_best_non_mf'], True)} | "
                         f"{_rel_cell(e['vs_persistence'])} | {_rel_cell(e['vs_marginal'])} |")
    return lines


def render_markdown(r: dict) -> str:
    st = r["settings"]
    L: list[str] = []
    title = "Fidelity benchmark" + (f" — {r['label']}" if r.get("label") else "")
    L += [f"# {title}", "",
          f"- command: `{r['command']}`",
          f"- date: {r['created']}; bench wall time (this invocation): {r.get('seconds', 0):.0f} s",
          f"- machine: {r['machine']['cpu']} ({r['machine']['cpus_usable']} usable CPUs, load "
          f"{r['machine']['load_avg']}), device {r['machine']['device']}, {r['machine']['platform']}",
          f"- data: {st['data']} (split {st['split']}): {r['n_events']} events scored "
          f"({st['events_selection']['in_split']} in split, {st['events_selection']['too_short']} too short "
          f"for warm-up + rollout)",
          f"- model: {st['model']} (backend {st['backend']}"
          + (f", weights sha256 {st['model_sha256'][:16]}…" if st.get("model_sha256") else "") + f"); seed {st['seed']}; warm-up {st['warmup']} real "
          f"actions; rollout capped at {st['max_agents'] or 'all'} agents/event; step {st['step_size']} agents",
          f"- labeler: {st['labeler'].get('name')} v{st['labeler'].get('version')}; bins: {st['binning']}; "
          f"marginal: {st['marginal']}",
          "",
          "Metrics are macro over the 9 dimensions, per event, then mean ± std over events (95% CI of the "
          "mean in results.json). KL/JS/W1/DTW: lower is better; F1 (micro-F1): higher is better. "
          "Horizons: short = first third of the rollout bins, mid = first two thirds, long = all.", ""]
    names = {"kl": "KL ↓", "js": "JS ↓", "wasserstein": "W1 ↓", "dtw": "DTW ↓", "micro_f1": "F1 ↑"}
    for h in HORIZONS:
        L += [f"### {h} horizon", "", "| method | " + " | ".join(names[m] for m in TABLE_METRICS) + " |",
              "|---|" + "---:|" * len(TABLE_METRICS)]
        best = {}
        for m in TABLE_METRICS:
            v = {row: r["methods"][row][m][h] for row in r["rows"] if r["methods"][row][m][h] is not None}
            if v:
                best[m] = (max if m in HIGHER_IS_BETTER else min)(v, key=v.get)
        for row in r["rows"]:
            cells = []
            for m in TABLE_METRICS:
                mean, sp = r["methods"][row][m][h], r["spread"][row][m][h]
                c = _f(mean) + (f" ± {_f(sp['std'])}" if sp.get("std") is not None else "")
                cells.append(f"**{c}**" if best.get(m) == row else c)
            L.append(f"| {row} | " + " | ".join(cells) + " |")
        L.append("")
    if r["relative_kl"]:
        L += ["## Relative KL change of the mean-field rows",
              "",
              "`(KL_mf − KL_other) / KL_other` on the mean KL over events (negative = mf better); "
              "[95% paired bootstrap interval over events]; wins = share of events where the mf row's KL is lower.",
              "", "| row | horizon | KL | vs best non-MF | vs persistence | vs marginal |", "|---|---|---:|---|---|---|"]
        L += _relative_rows(r["relative_kl"]) + [""]
    ref = (r.get("settings") or {}).get("reference", "mf")
    abl = {row: per_h for row, per_h in r["relative_kl"].items()
           if row != ref and (per_h["long"].get("vs_reference") or per_h["long"].get("vs_mf"))}
    if abl:
        L += [f"## Mean-field ablations and diagnostics against `{ref}`", "",
              f"`(KL_row − KL_ref) / KL_ref` with ref = `{ref}` [95% paired bootstrap]; wins = share of events "
              "where the row's KL is lower than the reference's. A policy that reads m_t should lose with "
              "`mf-empty` / `mf-shuffled` and gain with `mf-tf`.", "", "| row | short | mid | long |",
              "|---|---|---|---|"]
        for row, per_h in abl.items():
            L.append(f"| {row} | " + " | ".join(_rel_cell(per_h[h].get("vs_reference") or per_h[h].get("vs_mf"))
                                                 for h in HORIZONS) + " |")
        L.append("")
    nk = r.get("without_keywords")
    if nk:
        L += ["## Without the keywords dimension",
              "",
              "The keywords dimension's KL is large for every source (a vocabulary of ~10 words + other, "
              "few actions per bin: the ε penalty dominates) and so dominates the macro KL. The same scores, "
              "macro over the 8 label dimensions only:", "",
              "| method | " + " | ".join(f"{names[m]} {h}" for h in HORIZONS for m in ("kl", "js")) + " |",
              "|---|" + "---:|" * (2 * len(HORIZONS))]
        for row in r["rows"]:
            L.append(f"| {row} | " + " | ".join(
                _f(nk["methods"][row][m][h]) + (f" ± {_f(nk['spread'][row][m][h]['std'])}"
                                                 if nk["spread"][row][m][h].get("std") is not None else "")
                for h in HORIZONS for m in ("kl", "js")) + " |")
        L += ["", "| row | horizon | KL (8 dims) | vs best non-MF | vs persistence | vs marginal |",
              "|---|---|---:|---|---|---|"]
        L += _relative_rows(nk["relative_kl"]) + [""]
    dims = list(next(iter(r["dimensions"].values()))["long"])
    L += ["## Per dimension (long horizon, KL ↓ / F1 ↑)", "",
          "| dimension | " + " | ".join(r["rows"]) + " |", "|---|" + "---:|" * len(r["rows"])]
    for d in dims:
        L.append(f"| {d} | " + " | ".join(
            f"{_f(r['dimensions'][row]['long'][d]['kl'], 2)} / {_f(r['dimensions'][row]['long'][d]['micro_f1'], 2)}"
            for row in r["rows"]) + " |")
    L.append("")
    L += ["## Per domain (long horizon, KL ↓)", "",
          "| domain | events | " + " | ".join(r["rows"]) + " | mf vs best non-MF |",
          "|---|---:|" + "---:|" * (len(r["rows"]) + 1)]
    for dom, b in r["domains"].items():
        rel = (b["relative_kl"].get("mf") or {}).get("long", {}).get("vs_best_non_mf")
        L.append(f"| {dom} | {b['n_events']} | " + " | ".join(_f(b["methods"][row]["kl"]["long"])
                                                             for row in r["rows"]) + f" | {_pct(rel)} |")
    L.append("")
    L += ["## Run cost", "",
          "| row | agents | wall s | agents/s | LLM calls (batches) | LLM requests/agent | prompt tok/agent | "
          "generated tok/agent |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, c in r["cost"].items():
        L.append(f"| {row} | {c['agents']} | {_f(c['wall_seconds'], 0)} | {_f(c['agents_per_second'], 2)} | "
                 f"{c['llm_calls']} | {_f(c['llm_requests_per_agent'], 2)} | {_f(c['prompt_tokens_per_agent'], 1)} | "
                 f"{_f(c['generated_tokens_per_agent'], 1)} |")
    L.append("")
    if r.get("warmup_sensitivity"):
        ws = r["warmup_sensitivity"]
        rows = next(iter(ws.values()))["methods"].keys()
        L += ["## Warm-up sensitivity (long horizon, KL ↓)", "",
              "| warm-up | events | " + " | ".join(rows) + " | mf vs best non-MF | mf vs persistence |",
              "|---:|---:|" + "---:|" * (len(rows) + 2)]
        for w, b in ws.items():
            e = (b["relative_kl"].get("mf") or {}).get("long") or {}
            L.append(f"| {w} | {b['n_events']} | " + " | ".join(_f(b["methods"][row]["kl"]["long"]) for row in rows)
                     + f" | {_rel_cell(e.get('vs_best_non_mf'), True)} | {_rel_cell(e.get('vs_persistence'))} |")
        L.append("")
    if r.get("warnings"):
        L += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    return "\n".join(L)


__all__ = ["FidelitySettings", "MethodSpec", "compare_pair", "parse_methods", "parse_variant",
           "relative_kl", "render_markdown", "run_fidelity"]
