"""How often a decide model's header agrees with the labels of the text it then wrote (a simulation run).

    .venv/bin/python scripts/diagnostics/header_agreement.py RUN_DIR [RUN_DIR ...]

Reads each run's steps.jsonl (rollout actions with a `decision`), labels every simulated text with the
rules labeler and prints the share of actions whose header label equals the text's, per header dimension
and for all four (mfllm.simulation.decision.header_agreement); missing headers are counted apart. Beside
it, the agreement expected by chance (header and text labels independent, with their own marginals).
Evaluation always labels the text; this says how far the header is a plan the text follows.

    ... header_agreement.py --mix RUN_DIR [RUN_DIR ...]

also prints, per header dimension, where the crowd's mix is lost: per event, the rollout's pooled mix of
the real actions against that of the headers and that of the texts' labels (KL(real || sim), smoothed
as mfllm.evaluation.metrics.kl; every replica pooled; no time bins, so this is not the bench's KL), mean over
events. A header mix close to the real one with a text mix far from it means the text does not carry
the decision out.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from mfllm.evaluation.metrics import kl
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.labels.rules import RulesLabeler
from mfllm.simulation.decision import FULL_HEADER_DIMS, Decision, header_agreement
from mfllm.store.run import iter_steps


def named(heads: list[dict]) -> list[str]:
    """The dimensions the headers name (a 4- or 8-dimension model), in header order."""
    return [d for d in FULL_HEADER_DIMS if any(d in h for h in heads)]


def chance(decs: list[Decision], labels: list) -> dict[str, float]:
    """The agreement expected if the text's labels were drawn independently of the header (same marginals)."""
    pairs = [(d.labels, lab.labels) for d, lab in zip(decs, labels, strict=True) if d.labels and lab is not None]
    out = {}
    for dim in named([p[0] for p in pairs]):
        h, t = Counter(p[0][dim] for p in pairs), Counter(p[1][dim] for p in pairs)
        n = len(pairs) or 1
        out[dim] = sum(h[c] / n * t[c] / n for c in h)
    return out


def mix_loss(real: dict[str, list[dict]], heads: dict[str, list[dict]], texts: dict[str, list[dict]]) -> dict:
    """Per header dimension: mean over events of KL(real mix || header mix) and KL(real mix || text mix)."""
    out = {}
    for dim in named([h for hs in heads.values() for h in hs]):
        cats = DIMENSIONS[dim]

        def mix(labs: list[dict], dim=dim, cats=cats) -> np.ndarray:
            c = Counter(x[dim] for x in labs)
            return np.array([c[k] for k in cats], float)

        ev = [e for e in real if real[e] and heads.get(e)]
        out[dim] = {"header": float(np.mean([kl(mix(real[e]), mix(heads[e])) for e in ev])) if ev else None,
                    "text": float(np.mean([kl(mix(real[e]), mix(texts[e])) for e in ev])) if ev else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--mix", action="store_true", help="also: per dimension, the pooled real mix against the "
                    "headers' and the texts' (where the crowd's mix is lost)")
    a = ap.parse_args()
    decs: list[Decision] = []
    events: list[str] = []
    real: dict[str, str] = {}  # (event, action) -> real text, once however many replicas
    for run in a.runs:
        for rec in iter_steps(run):
            if rec["phase"] != "rollout":
                continue
            for act in rec["actions"]:
                if act.get("injected") or act.get("sim_text") is None:
                    continue
                decs.append(Decision(text=act["sim_text"], labels=act.get("decision") or None))
                events.append(rec["event_id"])
                real[f"{rec['event_id']}\t{act['action_id']}"] = act.get("real_text") or ""
    labeler = RulesLabeler()
    labels = labeler.label([d.text for d in decs])
    out = header_agreement(decs, labels)
    out["chance_per_dimension"] = chance(decs, labels)
    if a.mix:
        by_real, heads, texts = defaultdict(list), defaultdict(list), defaultdict(list)
        for key, lab in zip(real, labeler.label(list(real.values())), strict=True):
            by_real[key.split("\t")[0]].append(lab.labels)
        for e, d, lab in zip(events, decs, labels, strict=True):
            if d.labels is not None and lab is not None:
                heads[e].append(d.labels)
                texts[e].append(lab.labels)
        out["pooled_mix_kl"] = mix_loss(by_real, heads, texts)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
