"""How far apart are the methods' simulated crowds, compared with their distance to the real crowd?

Per event and label dimension (8 label dims, whole rollout pooled): JS divergence (base 2) between
the label distributions of: real vs each method, and each pair of methods. Plus, per event, the real
distribution's distance from the pooled (all events) real distribution (how event-specific the real
crowds are under this labeler) and the same for each method's simulated crowd.
"""

import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy.spatial.distance import jensenshannon

from mfllm.labels import make_labeler
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.store.run import read_steps

bench = Path(sys.argv[1])
rows = sys.argv[2].split(",") if len(sys.argv) > 2 else ["mf", "state", "recent", "popular"]
lab = make_labeler("rules")
texts = {}
for r in rows:
    for s in read_steps(bench / "runs" / r):
        if s["phase"] != "rollout":
            continue
        for a in s["actions"]:
            texts.setdefault((s["event_id"], "real"), []).append(a["real_text"]) if r == rows[0] else None
            texts.setdefault((s["event_id"], r), []).append(a["sim_text"])
uniq = list({t for v in texts.values() for t in v if t is not None})
labels = dict(zip(uniq, lab.label(uniq), strict=True))
events = sorted({e for e, _ in texts})
dims = list(DIMENSIONS)


def dist(ts, d):
    cats = DIMENSIONS[d]
    c = np.zeros(len(cats))
    for t in ts:
        al = labels.get(t)
        if al is not None and al.labels.get(d) in cats:
            c[cats.index(al.labels[d])] += 1
    return c / c.sum() if c.sum() else None


def js(p, q):
    return float(jensenshannon(p, q, base=2) ** 2)


srcs = ["real", *rows]
D = {(e, s, d): dist(texts[(e, s)], d) for e in events for s in srcs for d in dims}
pooled = {s: {d: np.nanmean([D[(e, s, d)] for e in events if D[(e, s, d)] is not None], axis=0) for d in dims}
          for s in srcs}
out = {"events": len(events), "pairs": {}, "event_specificity": {}, "share_of_plain_reposts": {}}
for a, b in [*(("real", r) for r in rows), *combinations(rows, 2)]:
    v = [js(D[(e, a, d)], D[(e, b, d)]) for e in events for d in dims
         if D[(e, a, d)] is not None and D[(e, b, d)] is not None]
    out["pairs"][f"{a}~{b}"] = float(np.mean(v))
for s in srcs:
    v = [js(D[(e, s, d)], pooled[s][d]) for e in events for d in dims if D[(e, s, d)] is not None]
    out["event_specificity"][s] = float(np.mean(v))
    out["share_of_plain_reposts"][s] = float(np.mean([t.strip() == "" for e in events for t in texts[(e, s)]]))
print(json.dumps(out, indent=1))
json.dump(out, open(bench / "sim_vs_sim.json", "w"), indent=1)
