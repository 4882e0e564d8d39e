"""Would guidance toward the mean field help? Teacher-forced NLL of real actions under
log_softmax((1 + g) * logits(own mean field) - g * logits(unconditional)), per action, header and text.

    .venv/bin/python scripts/diagnostics/guidance_probe.py --split train --events 40

The unconditional context is the empty mean field (`empty`) or no context block (`state`), both seen in
the decide model's training. g = 0 is the model as it is; a gain > 0 at some g > 0 would mean that
sampling with guidance makes real actions more likely. Train split by default (choose on train, never on
test). Events: a seeded shuffle of those with >= 64 actions; the first --max-agents rollout agents each.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mfllm.paths import DEFAULT_MODEL
from mfllm.training.decide.data import pack, packed_logits
from mfllm.training.decide.probe import condition_prefixes, probe_setup

SCALES = (0.0, 0.25, 0.5, 1.0, 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default="/work/shared/data/ced")
    ap.add_argument("--split", default="train", choices=["train", "val"])
    ap.add_argument("--events", type=int, default=40)
    ap.add_argument("--max-agents", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    tok, model, evmap, steps, reads, toks = probe_setup(a.model, a.data, a.split, a.events, a.max_agents, a.threads)
    pre = {c: condition_prefixes(tok, steps, evmap, reads, c, "zh") for c in ("own", "empty", "state")}
    nll = {(u, g): {"header": [], "text": []} for u in ("empty", "state") for g in SCALES}
    ev_of: list[str] = []
    with torch.no_grad():
        for i in range(0, len(toks), 4):
            chunk = toks[i:i + 4]
            logits = {c: packed_logits(model, pack(chunk, prefixes=p[i:i + 4])) for c, p in pre.items()}
            b = pack(chunk, prefixes=pre["own"][i:i + 4])
            ev_of += [steps[i + k].event_id for k in range(len(chunk)) for _ in chunk[k].suffixes]
            for (u, g), acc in nll.items():
                per_tok = torch.nn.functional.cross_entropy((1 + g) * logits["own"] - g * logits[u], b.tgt,
                                                            reduction="none")
                for part, name in ((0, "header"), (1, "text")):
                    acc[name] += torch.zeros(b.n_examples).index_add_(0, b.seg, per_tok * (b.part == part)).tolist()
    evs_arr, ids = np.array(ev_of), sorted(set(ev_of))
    out = {"model": a.model, "split": a.split, "events": len(ids), "actions": len(ev_of), "rows": []}
    for (u, g), acc in nll.items():
        h, t = np.array(acc["header"]), np.array(acc["text"])
        h0 = np.array(nll[(u, 0.0)]["header"])
        gain = np.array([(h0 - h)[evs_arr == e].mean() for e in ids])  # > 0: guidance makes real headers likelier
        se = gain.std(ddof=1) / np.sqrt(len(ids))
        out["rows"].append({"unconditional": u, "g": g, "header_nll": float(h.mean()), "text_nll": float(t.mean()),
                            "header_gain": float(gain.mean()), "header_gain_ci95": [float(gain.mean() - 1.96 * se),
                                                                                   float(gain.mean() + 1.96 * se)]})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
