"""Peak memory of recovering a run's records for resume: every record (the old way) vs folded ResumePoints.

Usage: .venv/bin/python scripts/diagnostics/resume_memory.py 100000   (actions in the synthetic run file)
"""
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from mfllm.data.load import load_events
from mfllm.paths import SAMPLE_DATA
from mfllm.simulation.engine import fold_records
from mfllm.simulation.steps import plan_steps
from mfllm.store.run import RunStore, encode_record

events = load_events(SAMPLE_DATA / "events.jsonl", split="all").events
target = int(sys.argv[1])
d = Path(tempfile.mkdtemp()) / "run"
d.mkdir()
n = 0
with open(d / "steps.jsonl", "w", encoding="utf-8") as f:
    rep = 0
    while n < target:
        for ev in events:
            for st in plan_steps(ev.actions, 16, len(ev.actions)):
                rec = {"event_id": f"{ev.event_id}-{rep}", "step": st.index, "phase": st.phase,
                       "meanfield": "m", "meanfield_state": {"text": "m", "data": {}},
                       "actions": [{"agent_id": a.agent_id, "action_id": a.action_id, "time": a.time,
                                    "state": "用户：资料未知；语料中发帖1次；转发原帖；原帖后7分钟", "real_text": a.text,
                                    "sim_text": None, "parent": a.parent, "followers": None,
                                    "prompt_tokens": 0, "generated_tokens": 0} for a in st.actions],
                       "seconds": 0.1}
                f.write(encode_record(rec))
                n += len(st.actions)
        rep += 1
store = RunStore(d)
print(f"records file: {n} actions, {(d / 'steps.jsonl').stat().st_size / 1e6:.1f} MB")
for name, fn in (("all records", lambda: [r for r in store.recover()]),
                 ("folded", lambda: fold_records(store.recover_iter(), False))):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{name}: peak {peak / 1e6:.1f} MB, held {cur / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
    del out
