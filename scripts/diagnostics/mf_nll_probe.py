"""Does mfllm-mini use the mean field? NLL of the REAL rollout actions under different contexts.

Teacher-forced: the stats mean field is built from the real actions (as in warm-up), so 'own' is the
best summary the policy could read. Conditions: own m_t, empty m_t, another event's m_t at the same
step (shuffled), and the state method's context (no block). Lower NLL/token = the context helps
predict what the real agent wrote. Val split only (no tuning on test).
"""

import json
import sys
from collections import defaultdict

import numpy as np

from mfllm.backends.hf import HFBackend
from mfllm.data.load import load_events
from mfllm.data.state import agent_state_text
from mfllm.paths import DEFAULT_MODEL
from mfllm.prompts.templates import action_to_target, policy_prefix, policy_suffix, render_context, strings
from mfllm.simulation.meanfield import MeanFieldUpdate, StatsMeanField
from mfllm.simulation.steps import plan_steps

split = sys.argv[1] if len(sys.argv) > 1 else "val"
n_events = int(sys.argv[2]) if len(sys.argv) > 2 else 20
max_agents = int(sys.argv[3]) if len(sys.argv) > 3 else 64
W, K = 48, 16
evs = [e for e in load_events("/work/shared/data/ced", split=split).events if len(e.actions) >= W + K][:n_events]
mfm = StatsMeanField("zh")
empty = strings("zh")["empty_meanfield"]
rows = []  # (event, step, mf_text_read, state, target, recent5, donor_recent5)
recent_by = {}
mf_by_event = {}
for ev in evs:
    st = mfm.initial("zh")
    reads = {}
    rec_reads = {}
    hist = []
    done = 0
    for step in plan_steps(ev.actions, K, W):
        reads[step.index] = st.text
        rec_reads[step.index] = list(hist[-5:])
        acts = step.actions
        if step.phase == "rollout":
            acts = acts[: max(0, max_agents - done)]
            if not acts:
                break
            for a in acts:
                rows.append((ev.event_id, step.index, st.text, agent_state_text(a.profile, "zh", depth=a.depth),
                             action_to_target(a.text, "zh"), list(hist[-5:])))
            done += len(acts)
        hist += [a.text for a in acts]
        pairs = [("", a.text) for a in acts]
        st = mfm.update_many([MeanFieldUpdate(ev.source.text, st, pairs)])[0]
    mf_by_event[ev.event_id] = reads
    recent_by[ev.event_id] = rec_reads
ids = [e.event_id for e in evs]
src = {e.event_id: e.source.text for e in evs}
donor = {e: ids[(i + 1) % len(ids)] for i, e in enumerate(ids)}


def donor_mf(e, s):
    d = mf_by_event[donor[e]]
    return d.get(s, d[max(d)])


mf_ctx = lambda m: render_context("mf", "zh", meanfield=m)  # noqa: E731
from mfllm.prompts.templates import render_items  # noqa: E402


def donor_recent(e, s):
    d = recent_by[donor[e]]
    return d.get(s, d[max(d)])


conds = {
    "recent": lambda r: render_context("recent", "zh", items=render_items(r[5], "zh")),
    "recent_shuffled": lambda r: render_context("recent", "zh", items=render_items(donor_recent(r[0], r[1]), "zh")),
}
if "--all" in sys.argv:
    conds |= {
    "own": lambda r: mf_ctx(r[2]),
    "empty": lambda r: mf_ctx(empty),
    "shuffled": lambda r: mf_ctx(donor_mf(r[0], r[1])),
    "state": lambda r: render_context("state", "zh"),
    }
be = HFBackend(str(DEFAULT_MODEL), device="cpu")
res = {}
for name, ctx in conds.items():
    prompts = [policy_prefix(src[r[0]], ctx(r), "zh") + policy_suffix(r[3], "zh") for r in rows]
    sc = be.score_tokens(prompts, [r[4] + "\n" for r in rows])
    res[name] = np.array([s for s, _ in sc]), np.array([n for _, n in sc])
    print(name, "nll/token", -res[name][0].sum() / res[name][1].sum(), flush=True)
per_event = defaultdict(dict)
for name, (s, n) in res.items():
    for e in ids:
        idx = [i for i, r in enumerate(rows) if r[0] == e]
        per_event[e][name] = float(-s[idx].sum() / n[idx].sum())
out = {"split": split, "events": len(ids), "agents": len(rows),
       "nll_per_token": {k: float(-s.sum() / n.sum()) for k, (s, n) in res.items()}, "per_event": per_event}
pairs_ = [("own", "shuffled"), ("own", "empty"), ("own", "state"), ("recent", "recent_shuffled")]
for a, b in (p for p in pairs_ if p[0] in res and p[1] in res):
    d = np.array([per_event[e][a] - per_event[e][b] for e in ids])
    out[f"{a}-{b}"] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)), "own_better": float((d < 0).mean())}
    print(a, "-", b, out[f"{a}-{b}"])
tag = "all" if "--all" in sys.argv else "recent"
json.dump(out, open(f"/work/bench/mf_nll_probe_{split}_{tag}.json", "w"), indent=1)
