"""How often a decide model's header agrees with the labels of the text it then wrote (a simulation run).

    .venv/bin/python scripts/diagnostics/header_agreement.py RUN_DIR [RUN_DIR ...]

Reads each run's steps.jsonl (rollout actions with a `decision`), labels every simulated text with the
rules labeler and prints the share of actions whose header label equals the text's, per header dimension
and for all four (mfllm.simulation.decision.header_agreement); missing headers are counted apart. Beside
it, the agreement expected by chance (header and text labels independent, with their own marginals).
Evaluation always labels the text; this says how far the header is a plan the text follows.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mfllm.labels.rules import RulesLabeler
from mfllm.simulation.decision import HEADER_DIMS, Decision, header_agreement
from mfllm.store.run import iter_steps


def chance(decs: list[Decision], labels: list) -> dict[str, float]:
    """The agreement expected if the text's labels were drawn independently of the header (same marginals)."""
    pairs = [(d.labels, lab.labels) for d, lab in zip(decs, labels, strict=True) if d.labels and lab is not None]
    out = {}
    for dim in HEADER_DIMS:
        h, t = Counter(p[0][dim] for p in pairs), Counter(p[1][dim] for p in pairs)
        n = len(pairs) or 1
        out[dim] = sum(h[c] / n * t[c] / n for c in h)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args()
    decs: list[Decision] = []
    for run in a.runs:
        for rec in iter_steps(run):
            if rec["phase"] != "rollout":
                continue
            for act in rec["actions"]:
                if act.get("injected") or act.get("sim_text") is None:
                    continue
                decs.append(Decision(text=act["sim_text"], labels=act.get("decision") or None))
    labels = RulesLabeler().label([d.text for d in decs])
    out = header_agreement(decs, labels)
    out["chance_per_dimension"] = chance(decs, labels)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
