"""Does a decide model's expected header mix carry each event's own mix? Teacher-forced, no sampling.

    .venv/bin/python scripts/diagnostics/header_mix.py --split val --events 60
    .venv/bin/python scripts/diagnostics/header_mix.py --model /path/to/model --gammas 0,0.5,1

For the first --max-agents rollout agents of each event (real history, real mean field at every step, as
`probe_steps`), the model's distribution over each header dimension's categories (given the real earlier
header tokens), averaged per event: the model's expected mix. Per dimension, against the warm-up's real
shares w and the corpus mix g (the mean of w): the slope of the expected mix on w - g next to the real
rollout's (as crowd_slope.py), and the mean total variation to the real rollout's mix next to the
warm-up's own (what a crowd sampled from the warm-up would expect). --gammas: also with guidance toward
the mean field ((1 + g) * logits(own) - g * logits(empty mean field)). Dimensions after the first see
the real earlier header tokens, so their numbers are a little optimistic.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from mfllm.labels.rules import RulesLabeler
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.decision import model_header_dims
from mfllm.training.decide.data import header_slots, header_token_ids, pack, packed_logits
from mfllm.training.decide.probe import condition_prefixes, probe_setup

WARMUP = 48  # probe_steps' warm-up (event_steps' default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default="/work/shared/data/ced")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--events", type=int, default=60)
    ap.add_argument("--max-agents", type=int, default=64)
    ap.add_argument("--gammas", default="0", help="comma-separated guidance scales (0 = the model as it is)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    tok, model, evmap, steps, reads, toks = probe_setup(a.model, a.data, a.split, a.events, a.max_agents, a.threads)
    evs = list(evmap.values())
    gammas = [float(x) for x in a.gammas.split(",")]
    conds = ["own", "empty"] if any(gammas) else ["own"]
    pre = {c: condition_prefixes(tok, steps, evmap, reads, c, "zh") for c in conds}
    dims = model_header_dims(a.model)
    token_ids = header_token_ids(tok, "zh", dims)
    names = {d: list(ids) for d, ids in zip(dims, token_ids, strict=True)}
    cat_ids = [torch.tensor(list(ids.values())) for ids in token_ids]

    def zeros() -> dict[str, np.ndarray]:
        return {d: np.zeros(len(names[d])) for d in dims}

    pred = {g: collections.defaultdict(zeros) for g in gammas}
    real = collections.defaultdict(zeros)
    with torch.no_grad():
        for i in range(0, len(toks), 4):
            chunk = toks[i:i + 4]
            logits = {c: packed_logits(model, pack(chunk, prefixes=p[i:i + 4])) for c, p in pre.items()}
            b = pack(chunk, prefixes=pre["own"][i:i + 4])
            hdr, seg, slot = header_slots(b)
            header_at = {(int(e), int(k)): int(n) for n, e, k in zip(hdr, seg, slot, strict=True)}
            ex = [(steps[i + k].event_id, lab) for k in range(len(chunk)) for lab in steps[i + k].labels[:len(chunk[k].suffixes)]]
            for e, (eid, labels) in enumerate(ex):
                for k, d in enumerate(dims):
                    n = header_at[(e, 1 + k)]
                    real[eid][d][names[d].index(labels[d])] += 1
                    for g in gammas:
                        lg = (1 + g) * logits["own"][n] - (g * logits["empty"][n] if g else 0.0)
                        pred[g][eid][d] += torch.softmax(lg[cat_ids[k]], 0).numpy()
    lab = RulesLabeler()
    warm = {}
    for ev in evs:
        labs = [x.labels for x in lab.label([x.text for x in ev.actions[:WARMUP]]) if x is not None]
        warm[ev.event_id] = {d: np.array([sum(x[d] == c for x in labs) for c in names[d]], float) for d in dims}
    ids = sorted(real)

    def norm(v: np.ndarray) -> np.ndarray:
        return v / max(v.sum(), 1e-9)

    print(f"{len(ids)} {a.split} events, {sum(real[e][dims[0]].sum() for e in ids):.0f} actions; {a.model}")
    print("dimension".ljust(17), "slope: real", *(f"g={g:g}".rjust(7) for g in gammas),
          " | TV to real: warm-up", *(f"g={g:g}".rjust(7) for g in gammas))
    for d in dims:
        w = np.array([norm(warm[e][d]) for e in ids])
        g0 = w.mean(0)
        wc = w - g0
        r = np.array([norm(real[e][d]) for e in ids])

        def slope(y: np.ndarray, g0=g0, wc=wc) -> float:
            return float(((y - g0) * wc).sum() / max((wc * wc).sum(), 1e-12))

        def tv(y: np.ndarray, r=r) -> float:
            return float((0.5 * np.abs(y - r).sum(1)).mean())

        p = {g: np.array([norm(pred[g][e][d]) for e in ids]) for g in gammas}
        print(d.ljust(17), f"{slope(r):11.2f}", *(f"{slope(p[g]):7.2f}" for g in gammas),
              f" | {tv(w):20.3f}", *(f"{tv(p[g]):7.3f}" for g in gammas))


if __name__ == "__main__":
    main()
