"""How much of an event's own label mix does a simulated crowd carry? (a `bench fidelity` output folder)

    .venv/bin/python scripts/diagnostics/crowd_slope.py /work/bench/decide3-test50 --rows mf,mf-empty
    .venv/bin/python scripts/diagnostics/crowd_slope.py OUT --rows mf --from 0 --to 16   # first 16 rollout agents

Per label dimension (rules labeler, on the action text) and per event: w = the warm-up's real label shares,
r = the real rollout's shares, s = a row's simulated rollout shares (its replicas pooled), g = the mean of w
over the events. The slope sum((y - g) . (w - g)) / sum(|w - g|^2), y = r or s, says how much of the event's
deviation from the corpus mix carries into the rollout: 1 = all of it, 0 = none (every event gets the
corpus mix). A crowd that reads the mean field well has about the real crowd's slope. Also the mean total
variation between s and r per event. Rollout agents [--from, --to) only (default: all).

--header: for a decide model's rows, also the slope of the header decisions' shares (row:header), and per
header dimension the mean per-step KL(real || simulated) of the text's labels and of the headers' (the
bench's fair rule: pseudo-count 0.5 per category on both sides), to tell a decision that misses the mix
from text that misses the decision.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np

from mfllm.evaluation.metrics import FAIR, kl_js_rows
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.labels.rules import RulesLabeler
from mfllm.simulation.decision import HEADER_DIMS
from mfllm.store.replicas import base_event_id, replica_dirs
from mfllm.store.run import iter_steps

DIMS = ("rumor", "sentiment_state", "sentiment_tendency", "behavior_type", "stance", "belief_degree",
        "subjectivity", "intent")


def mix(labels: list[dict[str, str]], dims: tuple[str, ...] = DIMS) -> dict[str, dict[str, float]]:
    """dimension -> category -> share among `labels` (label dicts: the rules labels of a text, or a header)."""
    out = {}
    for d in dims:
        c = collections.Counter(x[d] for x in labels if d in x)
        n = sum(c.values()) or 1
        out[d] = {k: v / n for k, v in c.items()}
    return out


def read_row(out: str, row: str, lo: int, hi: int, labeler: RulesLabeler) -> dict[str, dict]:
    """event id -> warm: the warm-up's real labels (replica 0); steps: per rollout step (step, replica, real
    labels, simulated text labels, header labels), rollout agents [lo, hi) only. Every text labelled once."""
    per: dict = collections.defaultdict(lambda: {"warm": [], "steps": []})
    for k, run in enumerate(replica_dirs(Path(out) / "runs" / row)):
        seen: collections.Counter = collections.Counter()
        for rec in iter_steps(run):
            ev = per[base_event_id(rec["event_id"])]
            if rec["phase"] == "warmup":
                ev["warm"] += [a["real_text"] for a in rec["actions"]] if k == 0 else []
                continue
            acts = []
            for a in rec["actions"]:
                if lo <= seen[rec["event_id"]] < hi:
                    acts.append(a)
                seen[rec["event_id"]] += 1
            ev["steps"].append((rec["step"], k, [a["real_text"] for a in acts], [a["sim_text"] or "" for a in acts],
                                [a.get("decision") or {} for a in acts]))
    texts = [t for ev in per.values() for t in ev["warm"]]
    texts += [t for ev in per.values() for _, _, real, sim, _ in ev["steps"] for t in (*real, *sim)]
    labels = iter([x.labels if x is not None else {} for x in labeler.label(texts)])
    for ev in per.values():
        ev["warm"] = [next(labels) for _ in ev["warm"]]
    for ev in per.values():
        ev["steps"] = [(st, k, [next(labels) for _ in real], [next(labels) for _ in sim], head)
                       for st, k, real, sim, head in ev["steps"]]
    return per


def rollout(ev: dict, part: int) -> list[dict[str, str]]:
    """All of an event's rollout labels of one kind: 2 = real (replica 0), 3 = simulated text, 4 = headers."""
    return [x for step in ev["steps"] if part != 2 or step[1] == 0 for x in step[part]]


def step_kl(per: dict) -> dict[str, tuple[float, float]]:
    """Per header dimension: mean over events of the mean per-step KL(real || text labels), (real || headers),
    under the bench's fair rule (metrics.FAIR: replicas pooled, additive smoothing of the counts)."""
    out = {}
    for d in HEADER_DIMS:
        cats = DIMENSIONS[d]

        def counts(labels: list[dict], cats=cats, d=d) -> list[float]:
            return [sum(x.get(d) == c for x in labels) for c in cats]

        text_kl, head_kl = [], []
        for ev in per.values():
            bins: dict = collections.defaultdict(lambda: ([], [], []))
            for step, k, real, sim, head in ev["steps"]:
                b = bins[step]
                b[0].extend(real if k == 0 else [])
                b[1].extend(sim)
                b[2].extend(head)
            kept = [b for b in bins.values() if b[0]]
            real_c = [counts(b[0]) for b in kept]
            text_kl.append(kl_js_rows(real_c, [counts(b[1]) for b in kept], FAIR)[0].mean())
            head_kl.append(kl_js_rows(real_c, [counts(b[2]) for b in kept], FAIR)[0].mean())
        out[d] = (float(np.mean(text_kl)), float(np.mean(head_kl)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="a bench fidelity output folder")
    ap.add_argument("--rows", default="mf", help="comma-separated LLM rows")
    ap.add_argument("--from", dest="lo", type=int, default=0)
    ap.add_argument("--to", dest="hi", type=int, default=10**9)
    ap.add_argument("--header", action="store_true", help="also the header decisions (decide models' rows)")
    a = ap.parse_args()
    rows = a.rows.split(",")
    lab = RulesLabeler()
    data = {r: read_row(a.out, r, a.lo, a.hi, lab) for r in rows}
    events = sorted(data[rows[0]])
    base = data[rows[0]]
    W = {e: mix(base[e]["warm"]) for e in events}
    R = {e: mix(rollout(base[e], 2)) for e in events}
    S = {r: {e: mix(rollout(data[r][e], 3)) for e in events} for r in rows}
    if a.header:
        for r in list(rows):
            S[f"{r}:header"] = {e: mix(rollout(data[r][e], 4), HEADER_DIMS) for e in events}
            rows.append(f"{r}:header")
    print(f"{len(events)} events, rollout agents [{a.lo}, {a.hi if a.hi < 10**9 else 'end'})")
    print("dimension".ljust(20), "real".rjust(6), *(r.rjust(12) for r in rows), " | TV to real:", *(r.rjust(12) for r in rows))
    for d in DIMS:
        cats = sorted({k for e in events for k in (*W[e][d], *R[e][d])})

        def mat(sh_by_event: dict, d=d, cats=cats) -> np.ndarray:  # events x categories
            return np.array([[sh_by_event[e][d].get(k, 0.0) for k in cats] for e in events])

        w_abs, r_abs = mat(W), mat(R)
        g = w_abs.mean(axis=0)
        w = w_abs - g

        def slope(y: np.ndarray, w=w) -> float:
            return float((y * w).sum() / max((w * w).sum(), 1e-12))

        real = slope(r_abs - g)
        shown = [r for r in rows if d in next(iter(S[r].values()))]
        sims = [slope(mat(S[r]) - g) if r in shown else float("nan") for r in rows]
        tvs = [float((0.5 * np.abs(mat(S[r]) - r_abs).sum(axis=1)).mean()) if r in shown else float("nan")
               for r in rows]
        print(d.ljust(20), f"{real:6.2f}", *(f"{x:12.2f}" for x in sims), " |            ", *(f"{x:12.3f}" for x in tvs))
    if a.header:
        for r in [x for x in rows if not x.endswith(":header")]:
            print(f"\n{r}: mean per-step KL(real || simulated), text labels / header labels")
            for d, (t, h) in step_kl(data[r]).items():
                print(f"  {d.ljust(18)} {t:.3f} / {h:.3f}")


if __name__ == "__main__":
    main()
