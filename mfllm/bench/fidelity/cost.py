"""What a bench row cost (agents, tokens, wall time, backend calls) and what it ran on."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from mfllm.bench.machine import cpu_name, load_avg, usable_cpus
from mfllm.store.replicas import replica_dirs
from mfllm.store.run import iter_steps


def run_cost(row_dir: Path, sessions: list[dict]) -> dict:
    """Agents and tokens from the step records of every replica (the whole run, over every session); wall
    time and backend calls from the bench's sessions (else the replicas' done.json)."""
    agents = prompt = gen = 0
    sim_seconds = 0.0
    dirs = replica_dirs(row_dir) or [row_dir]
    for d in dirs:
        for rec in iter_steps(d):
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
        done = [json.loads((d / "done.json").read_text(encoding="utf-8")) for d in dirs if (d / "done.json").is_file()]
        wall = max((float(x.get("seconds_all_replicas") or x.get("seconds") or 0.0) for x in done), default=0.0)
        be = [done[0].get("backend_stats") or {}] if done else []
    calls = sum(int(b.get("calls") or 0) for b in be)
    requests = sum(int(b.get("requests") or 0) for b in be)
    cached = sum(int(b.get("cached_prompt_tokens") or 0) for b in be)

    def per(x: int) -> float | None:
        return round(x / agents, 2) if agents else None

    return {"agents": agents, "replicas": len(dirs), "wall_seconds": round(wall, 1),
            "sim_seconds": round(sim_seconds, 1),
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
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
            "cpus_usable": usable_cpus(), "load_avg": load_avg(), "device": device}
