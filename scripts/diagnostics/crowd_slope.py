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

from mfllm.labels.dimensions import DIMENSIONS
from mfllm.labels.rules import RulesLabeler
from mfllm.simulation.decision import HEADER_DIMS
from mfllm.store.replicas import base_event_id, replica_dirs
from mfllm.store.run import iter_steps

DIMS = ("rumor", "sentiment_state", "sentiment_tendency", "behavior_type", "stance", "belief_degree",
        "subjectivity", "intent")


def shares(labeler: RulesLabeler, texts: list[str]) -> dict[str, dict[str, float]]:
    labs = [x.labels for x in labeler.label(texts) if x is not None]
    out = {}
    for d in DIMS:
        c = collections.Counter(x[d] for x in labs)
        n = sum(c.values()) or 1
        out[d] = {k: v / n for k, v in c.items()}
    return out


def read_row(out: str, row: str, lo: int, hi: int) -> dict[str, dict[str, list]]:
    """event id -> warm (real), roll (real, replica 0), sim (all replicas) texts; head: the sim actions' header
    labels ({} if none); steps: (step, replica, real texts, sim texts, headers) per rollout step."""
    per: dict = collections.defaultdict(lambda: {"warm": [], "roll": [], "sim": [], "head": [], "steps": []})
    for k, run in enumerate(replica_dirs(Path(out) / "runs" / row)):
        seen: collections.Counter = collections.Counter()
        for rec in iter_steps(run):
            ev = per[base_event_id(rec["event_id"])]
            if rec["phase"] != "warmup":
                ev["steps"].append((rec["step"], k, [], [], []))
            for a in rec["actions"]:
                if rec["phase"] == "warmup":
                    if k == 0:
                        ev["warm"].append(a["real_text"])
                    continue
                i = seen[rec["event_id"]]
                seen[rec["event_id"]] += 1
                if lo <= i < hi:
                    if k == 0:
                        ev["roll"].append(a["real_text"])
                    ev["sim"].append(a["sim_text"] or "")
                    ev["head"].append(a.get("decision") or {})
                    _, _, real, sim, head = ev["steps"][-1]
                    real.append(a["real_text"])
                    sim.append(a["sim_text"] or "")
                    head.append(a.get("decision") or {})
    return per


def header_shares(decisions: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for d in HEADER_DIMS:
        c = collections.Counter(x[d] for x in decisions if d in x)
        n = sum(c.values()) or 1
        out[d] = {k: v / n for k, v in c.items()}
    return out


def step_kl(labeler: RulesLabeler, per: dict) -> dict[str, tuple[float, float]]:
    """Per header dimension: mean over events of the mean per-step KL(real || text labels), (real || headers)."""
    cats = {d: sorted(DIMENSIONS[d]) for d in HEADER_DIMS}

    def dist(labels: list[dict], d: str) -> np.ndarray:
        c = np.array([sum(1 for x in labels if x.get(d) == k) for k in cats[d]], float) + 0.5
        return c / c.sum()

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        return float((p * np.log(p / q)).sum())

    out = {}
    for d in HEADER_DIMS:
        text_kl, head_kl = [], []
        for ev in per.values():
            bins: dict = collections.defaultdict(lambda: {"real": [], "text": [], "head": []})
            for step, k, real, sim, head in ev["steps"]:
                b = bins[step]
                if k == 0:
                    b["real"] += [x.labels for x in labeler.label(real)]
                b["text"] += [x.labels for x in labeler.label(sim)]
                b["head"] += head
            bins = {s: b for s, b in bins.items() if b["real"]}
            text_kl.append(np.mean([kl(dist(b["real"], d), dist(b["text"], d)) for b in bins.values()]))
            head_kl.append(np.mean([kl(dist(b["real"], d), dist(b["head"], d)) for b in bins.values()]))
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
    data = {r: read_row(a.out, r, a.lo, a.hi) for r in rows}
    events = sorted(data[rows[0]])
    base = data[rows[0]]
    W = {e: shares(lab, base[e]["warm"]) for e in events}
    R = {e: shares(lab, base[e]["roll"]) for e in events}
    S = {r: {e: shares(lab, data[r][e]["sim"]) for e in events} for r in rows}
    if a.header:
        for r in list(rows):
            S[f"{r}:header"] = {e: header_shares(data[r][e]["head"]) for e in events}
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
            for d, (t, h) in step_kl(lab, data[r]).items():
                print(f"  {d.ljust(18)} {t:.3f} / {h:.3f}")


if __name__ == "__main__":
    main()
