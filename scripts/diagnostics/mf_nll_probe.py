"""Does a policy read the mean field? Context gain per ACTION on val events (mfllm.training.decide.probe).

    .venv/bin/python scripts/diagnostics/mf_nll_probe.py --model mfllm/assets/models/mfllm-decide
    .venv/bin/python scripts/diagnostics/mf_nll_probe.py --model mfllm/assets/models/mfllm-mini --plain

Teacher-forced: the mean field is built from the real preceding actions (as in warm-up). Reports the
NLL per action of the real actions (header + text for a decide model) with the event's own mean field,
another val event's, and the empty one; the gain other - own with a paired per-event 95% interval;
for a decide model the header/text split and the header's accuracy against the rules labels.
`--plain`: a model without a decision header, reading the default `stats` mean field (mfllm-mini).
Val split by default; never tune on test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mfllm.data.load import load_events
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.decision import model_header_dims, policy_spec
from mfllm.training.decide.probe import run_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default="/work/shared/data/ced")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--events", type=int, default=100, help="first N events with >= 64 actions")
    ap.add_argument("--max-agents", type=int, default=64, help="rollout agents per event")
    ap.add_argument("--plain", action="store_true", help="no decision header; the default stats mean field")
    ap.add_argument("--decay", type=float, default=None,
                    help="the stats mean field's memory (default: the model's mfllm_policy.json, else 0.8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON here")
    a = ap.parse_args()
    # transformers is heavy; only this script needs it
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(a.threads)
    tok = PreTrainedTokenizerFast.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    evs = [e for e in load_events(a.data, split=a.split).events if len(e.actions) >= 64][: a.events]
    t0 = time.time()
    decay = a.decay if a.decay is not None else policy_spec(a.model).get("meanfield_decay", 0.8)
    out = run_probe(model, tok, evs, header=not a.plain, compact=not a.plain, max_agents=a.max_agents, decay=decay,
                    dims=model_header_dims(a.model))
    out |= {"model": a.model, "split": a.split, "seconds": round(time.time() - t0, 1)}
    text = json.dumps(out, indent=1, ensure_ascii=False)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
