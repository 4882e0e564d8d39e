"""`mfllm bench throughput`: how fast the engine simulates a population, and what it costs per agent.

One run, one machine, one model (everything below is measured in the same process, so ratios hold even
on a busy machine):

* **engine**: for each population size N (``--agents 100,1000,...``), one event is extended to N agents
  with :func:`mfllm.simulation.population.synthetic_event` (the real agents first, then resampled real
  profiles) and simulated end to end through :func:`mfllm.simulation.runner.simulate` (run store included)
  with the ``mf`` method: agents per second, prompt / generated tokens per agent, peak memory.
* **naive baseline**: the same engine, model, prompts and seeds, but the backend is called with one agent
  at a time (no batching, no shared-prefix reuse: the way the paper's API path worked). Only a modest
  number of agents is needed to get its rate. Per-request seeds make its texts identical to the engine's
  (checked: ``naive.identical_fraction``), so the speed-up is the same work done faster.
* **context growth**: prompt tokens per agent of other contexts, computed without generating:
  ``recent`` (bounded: the last 5 actions) and ``full-history`` (every earlier action in the prompt).
* **share of the machine's peak**: model FLOP/s (2 x parameters x tokens the model actually ran) divided
  by a torch matmul peak measured in the same run (same device, dtype and thread count).

The JSON (``--json OUT``) has a stable shape; the top-level keys independent checks read are
``speedup``, ``agents_per_s``, ``tokens_per_agent``, ``peak_fraction`` and ``peak_rss_mb`` (see
docs/performance.md for all fields).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from mfllm.backends.base import BackendStats, Completion, GenerationRequest
from mfllm.bench.machine import cpu_name, load_avg, usable_cpus
from mfllm.errors import ConfigError
from mfllm.files import atomic_write_json

SCHEMA = "mfllm.bench.throughput/1"


class ThroughputSettings(BaseModel, extra="forbid"):
    agents: list[int] = Field(default_factory=lambda: [100, 1000, 10000, 100000])
    naive_agents: int = Field(64, ge=1)  # rollout agents the naive baseline simulates (one at a time)
    data: str | None = None  # default: the shipped sample
    event: str | None = None  # default: the sample event with the most real actions
    model: str | None = None
    backend: str = "hf"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(512, ge=1)  # hf: rows per decoding batch
    num_threads: int | None = None  # hf on CPU (default: the backend's rule, 1 thread for mfllm-mini)
    step_size: int = Field(512, ge=1)  # agents per step (the mean field is updated after every step)
    warmup: int = Field(48, ge=0)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    lang: Literal["zh", "en"] = "zh"
    keep_runs: str | None = None  # keep the run directories here (default: a temp dir, deleted)
    matmul_size: int = 1024
    progress: bool = False
    command: str | None = None

    def as_args(self) -> list[str]:
        """The `mfllm bench throughput` options that reproduce these settings."""
        a = ["--agents", ",".join(map(str, self.agents)), "--naive-agents", str(self.naive_agents),
             "--backend", self.backend, "--step-size", str(self.step_size), "--batch-size", str(self.batch_size),
             "--max-new-tokens", str(self.max_new_tokens), "--warmup", str(self.warmup), "--seed", str(self.seed)]
        for opt, v in (("--model", self.model), ("--data", self.data), ("--event", self.event),
                       ("--threads", self.num_threads), ("--base-url", self.backend_options.get("base_url")),
                       ("--device", self.backend_options.get("device"))):
            if v:
                a += [opt, str(v)]
        return a


# ------------------------------------------------------------------------------------------------ helpers


class NaiveBackend:
    """One request per backend call: no batching, and (with one row) no shared-prefix reuse."""

    name = "naive"

    def __init__(self, inner):
        self.inner = inner
        self.stats = BackendStats()

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        t0 = time.perf_counter()
        out = [self.inner.generate([r])[0] for r in requests]
        self.stats.add(out, time.perf_counter() - t0, calls=len(requests))
        return out

    def score(self, prompts, continuations):
        return [self.inner.score([p], [c])[0] for p, c in zip(prompts, continuations, strict=True)]

    def describe(self) -> dict:
        return {"name": self.name, "inner": self.inner.describe()}


def rss_mb() -> float | None:
    """Current resident memory of this process in MB (Linux /proc, else psutil, else None)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - psutil is optional
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (getrusage; kB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


class RssSampler:
    """The highest current RSS seen while the block runs (sampled every `interval` seconds)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.max_mb = interval, rss_mb() or 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.max_mb = max(self.max_mb, rss_mb() or 0.0)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.max_mb = max(self.max_mb, rss_mb() or 0.0)


def matmul_peak(device: str = "cpu", dtype=None, n: int = 1024, seconds: float = 1.0, trials: int = 3) -> float:
    """FLOP/s of a square ``n x n`` torch matmul on this device / dtype / thread count (best of `trials`)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    a @ b
    sync()
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps % 4 == 0:
                sync()
                dt = time.perf_counter() - t0
                if dt >= seconds / trials:
                    break
        best = max(best, 2.0 * n**3 * reps / dt)
    return best


def machine_info(backend) -> dict:
    import torch

    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": getattr(backend, "device", None)}
    if str(info["device"]).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def count_params(backend) -> int | None:
    lm = getattr(backend, "_lm", None)
    if lm is None:
        return None
    return int(sum(p.numel() for p in lm.parameters()))


def _stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}


def _token_counter(backend) -> tuple[Callable[[list[str]], list[int]], str]:
    """Token counts of texts with the backend's tokenizer, else characters."""
    enc = getattr(backend, "encode", None)
    if callable(enc) and getattr(backend, "tokenizer", None) is not None:
        return (lambda texts: [len(x) for x in enc(texts, add_special_tokens=True)]), "tokens"
    return (lambda texts: [len(t) for t in texts]), "chars"


# ------------------------------------------------------------------------------------------------ parts


def context_growth(backend, event, sizes: list[int], lang: str, measured_mf: dict[str, float],
                   gen_per_agent: float) -> dict:
    """Prompt (+ generated) tokens per agent by context, computed without generating.

    ``recent`` shows the last 5 actions: bounded. ``full-history`` shows every earlier action: agent i's
    prompt holds i items, so the mean over N agents is base + item * (N - 1) / 2. Items are the event's
    real actions (their mean length is used beyond the real ones). ``mf`` is the measured value.
    """
    from mfllm.data.state import agent_state_text
    from mfllm.prompts.templates import policy_prompt, render_context, render_items, strings

    count, unit = _token_counter(backend)
    acts = list(event.actions)
    texts = [a.text for a in acts] or [""]
    states = [agent_state_text(a.profile, lang, depth=a.depth) for a in acts[:64]] or [""]
    src = event.source.text

    def prompt(items: list[str], state: str) -> str:
        return policy_prompt(src, render_context("recent", lang, items=render_items(items, lang) if items
                                                 else strings(lang)["none"]), state, lang)

    base = count([prompt([], s) for s in states])
    base_mean = sum(base) / len(base)
    # recent: agent i sees the 5 actions before it (sampled along the real cascade)
    pos = list(range(5, len(texts) + 1, max(1, len(texts) // 50))) or [len(texts)]
    recent = count([prompt(texts[i - 5:i], states[j % len(states)]) for j, i in enumerate(pos)])
    recent_mean = sum(recent) / len(recent)
    # full history: one more shown action costs `per_item` tokens (measured over up to 200 real actions)
    k = min(len(texts), 200)
    per_item = max(0.0, (count([prompt(texts[:k], states[0])])[0] - base[0]) / max(1, k))
    out: dict[str, Any] = {"unit": unit, "mf": dict(measured_mf), "recent": {}, "full-history": {},
                           "per_item": round(per_item, 2), "model_context": getattr(backend, "max_context", None),
                           "generated_per_agent": round(gen_per_agent, 2)}
    for n in sizes:
        out["recent"][str(n)] = round(recent_mean + gen_per_agent, 1)
        out["full-history"][str(n)] = round(base_mean + per_item * (n - 1) / 2 + gen_per_agent, 1)
    return out


def _pick_event(settings: ThroughputSettings):
    from mfllm.data.load import load_events
    from mfllm.paths import SAMPLE_DATA

    data = settings.data or str(SAMPLE_DATA)
    res = load_events(data, event_ids=[settings.event] if settings.event else None)
    if not res.events:
        raise ConfigError(f"no events in {data}" + (f" with id {settings.event}" if settings.event else ""))
    ev = max(res.events, key=lambda e: (len(e.actions), e.event_id))
    if len(ev.actions) <= settings.warmup:
        raise ConfigError(f"event {ev.event_id} has {len(ev.actions)} actions: not more than --warmup "
                          f"{settings.warmup}", field="warmup")
    return data, ev


def _simulate(data: str, out: Path, event, config, backend, backend_name: str, progress: bool
              ) -> tuple[Any, float, float]:
    """(summary, wall seconds, this process's CPU seconds)."""
    from mfllm.simulation.runner import simulate

    t0, c0 = time.perf_counter(), time.process_time()
    summary = simulate(data, str(out), loaded=[event], config=config, backend=backend, backend_name=backend_name,
                       progress=progress)
    return summary, time.perf_counter() - t0, time.process_time() - c0


def _sim_texts(run_dir: Path, limit: int) -> list[str | None]:
    from mfllm.store.run import iter_steps

    texts: list[str | None] = []
    for rec in iter_steps(run_dir):
        if rec["phase"] != "rollout":
            continue
        for a in rec["actions"]:
            if not a.get("injected"):
                texts.append(a["sim_text"])
                if len(texts) >= limit:
                    return texts
    return texts


def run_throughput(settings: ThroughputSettings, log: Callable[[str], None] | None = None) -> dict:
    """Run the whole bench; returns the JSON-ready result (see the module docstring)."""

    from mfllm.backends.registry import make_backend
    from mfllm.paths import DEFAULT_MODEL
    from mfllm.simulation.engine import SimConfig
    from mfllm.simulation.population import synthetic_event

    log = log or (lambda s: None)
    sizes = sorted({int(n) for n in settings.agents})
    if not sizes or sizes[0] <= settings.warmup:
        raise ConfigError(f"--agents must all exceed --warmup ({settings.warmup}): got {settings.agents}",
                          field="agents")
    if settings.naive_agents < 1:
        raise ConfigError("--naive-agents must be >= 1", field="naive_agents")
    data, event = _pick_event(settings)

    opts = dict(settings.backend_options)
    if settings.backend == "hf":
        opts.setdefault("batch_size", settings.batch_size)
        if settings.num_threads:
            opts.setdefault("num_threads", settings.num_threads)
    model = settings.model or (str(DEFAULT_MODEL) if settings.backend == "hf" else None)
    backend = make_backend(settings.backend, model=model, **opts)
    config = SimConfig(method="mf", meanfield="stats", step_size=settings.step_size, warmup=settings.warmup,
                       max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       top_p=settings.top_p, seed=settings.seed, lang=settings.lang, events_in_flight=1)
    params = count_params(backend)
    device = str(getattr(backend, "device", "cpu"))
    dtype = getattr(backend, "dtype", None)
    result: dict[str, Any] = {
        "schema": SCHEMA, "command": settings.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(backend), "load_avg_start": load_avg(),
        "model": model, "params": params, "backend": settings.backend, "backend_describe": backend.describe(),
        "event": {"event_id": event.event_id, "real_actions": len(event.actions)},
        "config": {k: v for k, v in config.model_dump().items()
                   if k in ("method", "meanfield", "step_size", "warmup", "max_new_tokens", "temperature", "top_p",
                            "seed", "lang")},
        "settings": {k: v for k, v in settings.model_dump().items() if k not in ("backend_options", "command")},
    }
    work = Path(settings.keep_runs) if settings.keep_runs else Path(tempfile.mkdtemp(prefix="mfllm-bench-tp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # warm the model up (first-call allocations), then the matmul peak on the same device / threads
        backend.generate([GenerationRequest("warm up", seed=0)])
        peak_before = matmul_peak(device, dtype, settings.matmul_size) if device in ("cpu",) or \
            device.startswith("cuda") else None
        log(f"matmul peak: {peak_before / 1e9:.1f} GFLOP/s" if peak_before else "matmul peak: n/a")

        # the naive baseline: same engine and prompts, one agent per backend call. Run before and after the
        # engine sizes (a shared machine's load drifts); its rate is over both runs.
        n_naive = settings.warmup + settings.naive_agents
        naive_be = NaiveBackend(backend)

        def run_naive(tag: str) -> dict:
            ev_n = synthetic_event(event, n_naive, seed=settings.seed)
            s0 = backend.stats.to_dict()
            la = load_avg()
            with RssSampler() as rs:
                summ, secs, cpu = _simulate(data, work / tag, ev_n, config, naive_be, settings.backend, False)
            d = _stats_delta(s0, backend.stats.to_dict())
            log(f"naive ({tag}): {summ.agents_simulated / secs:.2f} agents/s ({summ.agents_simulated} agents, "
                f"{secs:.1f}s)")
            return {"agents": n_naive, "rollout_agents": summ.agents_simulated, "seconds": round(secs, 3),
                    "cpu_seconds": round(cpu, 3),
                    "prompt_tokens": summ.prompt_tokens, "generated_tokens": summ.generated_tokens,
                    "cached_prompt_tokens": d.get("cached_prompt_tokens", 0), "backend_calls": d.get("calls", 0),
                    "rss_mb_max": round(rs.max_mb, 1), "load_avg": la}

        naive_runs = [run_naive("naive-start")]
        naive_texts = _sim_texts(work / "naive-start", settings.naive_agents)
        identical: float | None = None

        engine = []
        for n in sizes:
            ev_n = synthetic_event(event, n, seed=settings.seed)
            s0 = backend.stats.to_dict()
            la = load_avg()
            with RssSampler() as rs:
                summ, secs, cpu = _simulate(data, work / f"n{n}", ev_n, config, backend, settings.backend,
                                            settings.progress)
            d = _stats_delta(s0, backend.stats.to_dict())
            k = max(1, summ.agents_simulated)
            computed = d["prompt_tokens"] - d["cached_prompt_tokens"] + d["generated_tokens"]
            flops = 2.0 * params * computed / secs if params and secs > 0 else None
            row = {"agents": n, "rollout_agents": summ.agents_simulated, "steps": summ.steps,
                   "seconds": round(secs, 3), "cpu_seconds": round(cpu, 3),
                   "agents_per_s": round(summ.agents_simulated / secs, 3) if secs > 0 else None,
                   "agents_per_cpu_s": round(summ.agents_simulated / cpu, 3) if cpu > 0 else None,
                   "prompt_tokens_per_agent": round(summ.prompt_tokens / k, 2),
                   "generated_tokens_per_agent": round(summ.generated_tokens / k, 2),
                   "tokens_per_agent": round((summ.prompt_tokens + summ.generated_tokens) / k, 2),
                   "cached_prompt_tokens_per_agent": round(d["cached_prompt_tokens"] / k, 2),
                   "computed_tokens": computed, "backend_seconds": round(d["seconds"], 3),
                   "model_flops_per_s": flops, "rss_mb_max": round(rs.max_mb, 1),
                   "peak_rss_mb": round(peak_rss_mb(), 1), "load_avg": la}
            if naive_texts and identical is None and summ.agents_simulated >= len(naive_texts):
                eng = _sim_texts(work / f"n{n}", len(naive_texts))
                identical = round(sum(a == b for a, b in zip(naive_texts, eng, strict=False)) / len(naive_texts), 4)
            engine.append(row)
            log(f"engine N={n}: {row['agents_per_s']} agents/s, {row['tokens_per_agent']} tokens/agent, "
                f"{secs:.1f}s, rss max {row['rss_mb_max']} MB")
            if not settings.keep_runs:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
        naive_runs.append(run_naive("naive-end"))
        peak_after = matmul_peak(device, dtype, settings.matmul_size) if peak_before else None
    finally:
        if not settings.keep_runs:
            shutil.rmtree(work, ignore_errors=True)

    k_agents = sum(r["rollout_agents"] for r in naive_runs)
    k_secs = sum(r["seconds"] for r in naive_runs)
    k_cpu = sum(r["cpu_seconds"] for r in naive_runs)
    naive = {"agents": n_naive, "rollout_agents": k_agents, "seconds": round(k_secs, 3),
             "cpu_seconds": round(k_cpu, 3),
             "agents_per_s": round(k_agents / k_secs, 3) if k_secs > 0 else None,
             "agents_per_cpu_s": round(k_agents / k_cpu, 3) if k_cpu > 0 else None,
             "prompt_tokens_per_agent": round(sum(r["prompt_tokens"] for r in naive_runs) / max(1, k_agents), 2),
             "generated_tokens_per_agent": round(sum(r["generated_tokens"] for r in naive_runs) / max(1, k_agents),
                                                 2),
             "cached_prompt_tokens": sum(r["cached_prompt_tokens"] for r in naive_runs),
             "backend_calls": sum(r["backend_calls"] for r in naive_runs),
             "identical_fraction": identical,
             "runs": [{k: r[k] for k in ("rollout_agents", "seconds", "cpu_seconds", "rss_mb_max", "load_avg")} | {
                 "agents_per_s": round(r["rollout_agents"] / r["seconds"], 3) if r["seconds"] else None}
                 for r in naive_runs]}
    peak = max(peak_before or 0.0, peak_after or 0.0) or None
    for row in engine:
        row["peak_fraction"] = round(row["model_flops_per_s"] / peak, 4) if peak and row["model_flops_per_s"] else None
    last = engine[-1]
    mf_tokens = {str(r["agents"]): r["tokens_per_agent"] for r in engine}
    gen_mean = sum(r["generated_tokens_per_agent"] for r in engine) / len(engine)
    flat = [r["tokens_per_agent"] for r in engine]
    rss = [r["rss_mb_max"] for r in engine]
    result.update({
        "speedup": round(last["agents_per_s"] / naive["agents_per_s"], 3)
        if last["agents_per_s"] and naive["agents_per_s"] else None,
        "agents_per_s": last["agents_per_s"],
        # the same ratio on this process's CPU time: what a shared machine's drifting load does not move
        "speedup_cpu_time": round(last["agents_per_cpu_s"] / naive["agents_per_cpu_s"], 3)
        if last["agents_per_cpu_s"] and naive["agents_per_cpu_s"] else None,
        "agents_per_cpu_s": last["agents_per_cpu_s"],
        "tokens_per_agent": mf_tokens,
        "peak_fraction": last["peak_fraction"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tokens_per_agent_spread": round((max(flat) - min(flat)) / min(flat), 4) if min(flat) > 0 else None,
        "rss_mb_spread": round((max(rss) - min(rss)) / min(rss), 4) if rss and min(rss) > 0 else None,
        "matmul_peak_flops": {"before": peak_before, "after": peak_after, "used": peak,
                              "size": settings.matmul_size},
        "naive": naive,
        "engine": engine,
        "context_growth": context_growth(backend, event, sizes, settings.lang, mf_tokens, gen_mean),
        "load_avg_end": load_avg(),
        "minutes_per_100k_agents": round(100000 / last["agents_per_s"] / 60, 1) if last["agents_per_s"] else None,
        "cpu_minutes_per_100k_agents": round(100000 / last["agents_per_cpu_s"] / 60, 1)
        if last["agents_per_cpu_s"] else None,
    })
    return result


def write_json(result: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, result, indent=1)


__all__ = ["NaiveBackend", "SCHEMA", "ThroughputSettings", "context_growth", "matmul_peak", "run_throughput",
           "write_json"]
