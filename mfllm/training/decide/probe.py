"""Does a policy read the mean field? Per-action NLL of real actions under their own vs another event's.

Teacher-forced on VAL events: at each rollout step the policy reads the mean field of the REAL
preceding actions (step-lagged, as in warm-up). Conditions: ``own`` (the event's own mean field),
``other`` (another val event's mean field at the same step, or its last one: the event text stays
the event's own), ``empty`` (the empty mean field). The context gain is NLL(other) - NLL(own) per
action, with a paired per-event interval. For a decide model it is also split into header and text,
and the header's teacher-forced accuracy against the rules labels is reported.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import torch

from mfllm.data.load import load_events
from mfllm.data.schema import Event
from mfllm.labels.rules import RulesLabeler
from mfllm.prompts.templates import policy_prefix, render_context, strings
from mfllm.simulation.decision import HEADER_DIMS, header_format, model_header_dims, policy_spec
from mfllm.simulation.meanfield import StatsMeanField, compact_meanfield
from mfllm.training.decide.data import (
    StepText,
    event_steps,
    header_token_ids,
    pack,
    packed_logits,
    tokenize_steps,
)

CONDITIONS = ("own", "other", "empty")


def probe_steps(events: list[Event], *, lang: str = "zh", header: bool = True, compact: bool = True,
                max_agents: int = 64, decay: float = 0.8,
                dims: tuple[str, ...] = HEADER_DIMS) -> tuple[list[StepText], dict[str, dict[str, str]]]:
    """The first `max_agents` rollout agents of each event, with the mean field each step read (headers of `dims`)."""
    mf_model = compact_meanfield(dims, lang=lang, decay=decay) if compact else StatsMeanField(lang=lang, decay=decay)
    labeler = RulesLabeler()
    steps, reads = [], {}
    for ev in events:
        seen, got = 0, {}
        for st in event_steps(ev, lang=lang, meanfield=mf_model, labeler=labeler, meanfield_for=got, dims=dims):
            if seen >= max_agents:
                break
            keep = max_agents - seen
            st.agents, st.labels = st.agents[:keep], st.labels[:keep]
            if not header:
                st.agents = [(s, "", t) for s, _, t in st.agents]
            seen += len(st.agents)
            steps.append(st)
        reads[ev.event_id] = got
    return steps, reads


def probe_setup(model_path: str, data: str, split: str, n_events: int, max_agents: int = 64, threads: int = 2):
    """What the teacher-forced diagnostics share: the model (eval) and tokenizer, the first `n_events` of a seeded
    shuffle of the split's events with 64+ actions (id -> event), their `probe_steps` at the model's own
    mean-field memory and header (its mfllm_policy.json) and the steps' tokens."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # heavy: only the scripts need it

    torch.set_num_threads(threads)
    tok = PreTrainedTokenizerFast.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    evs = [e for e in load_events(data, split=split).events if len(e.actions) >= 64]
    random.Random(0).shuffle(evs)
    evs = evs[:n_events]
    steps, reads = probe_steps(evs, max_agents=max_agents, decay=policy_spec(model_path).get("meanfield_decay", 0.8),
                               dims=model_header_dims(model_path))
    return tok, model, {e.event_id: e for e in evs}, steps, reads, tokenize_steps(tok, steps, max_len=10_000)


def condition_prefixes(tokenizer, steps: list[StepText], events: dict[str, Event], reads: dict, cond: str,
                       lang: str, donor: dict[str, str] | None = None) -> list[np.ndarray]:
    """Each step's shared prompt prefix (token ids) under a condition: ``own`` / ``other`` (the `donor`
    event's mean field at that step, or its last) / ``empty`` mean field, or ``state`` (no context block)."""
    empty = strings(lang)["empty_meanfield"]
    texts = []
    for st in steps:
        if cond == "state":
            context = render_context("state", lang)
        else:
            if cond == "own":
                mf = reads[st.event_id][st.step]
            elif cond == "empty":
                mf = empty
            else:
                d = reads[donor[st.event_id]]
                mf = d.get(st.step, d[max(d)])
            context = render_context("mf", lang, meanfield=mf)
        texts.append(policy_prefix(events[st.event_id].source.text, context, lang))
    return [np.asarray(p, np.int64) for p in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def run_probe(model, tokenizer, events: list[Event], *, lang: str = "zh", header: bool = True, compact: bool = True,
              max_agents: int = 64, rows_per_batch: int = 4, conditions: tuple[str, ...] = CONDITIONS,
              seed: int = 0, decay: float = 0.8, dims: tuple[str, ...] = HEADER_DIMS) -> dict:
    """The probe's numbers (see the module docstring). `events`: val events, at least 2; `dims`: the header's."""
    was_training = model.training
    model.eval()
    evmap = {e.event_id: e for e in events}
    steps, reads = probe_steps(events, lang=lang, header=header, compact=compact, max_agents=max_agents, decay=decay,
                               dims=dims)
    ids = [e.event_id for e in events if reads.get(e.event_id)]
    order = ids[:]
    random.Random(seed).shuffle(order)
    donor = {e: order[(i + 1) % len(order)] for i, e in enumerate(order)}
    toks = tokenize_steps(tokenizer, steps, max_len=10_000)  # no drop: every condition scores the same targets
    slot_ids = header_token_ids(tokenizer, lang, dims) if header else None
    res: dict[str, dict] = {}
    ev_of = [st.event_id for st, tk in zip(steps, toks, strict=True) for _ in tk.suffixes]
    labels = [lab for st in steps for lab in st.labels]
    for cond in conditions:
        pref = condition_prefixes(tokenizer, steps, evmap, reads, cond, lang, donor)
        hdr, txt, hits = [], [], []
        for i in range(0, len(toks), rows_per_batch):
            b = pack(toks[i:i + rows_per_batch], prefixes=pref[i:i + rows_per_batch])
            logits = packed_logits(model, b)
            nll = torch.nn.functional.cross_entropy(logits, b.tgt, reduction="none")
            h = torch.zeros(b.n_examples).index_add_(0, b.seg, nll * (b.part == 0))
            t = torch.zeros(b.n_examples).index_add_(0, b.seg, nll * (b.part == 1))
            hdr += h.tolist()
            txt += t.tolist()
            if slot_ids is not None:
                hits += _slot_hits(logits, b, slot_ids, header_format(lang))
        res[cond] = {"header": np.array(hdr), "text": np.array(txt), "hits": hits}
    out: dict = {"events": len(ids), "actions": len(ev_of), "header": header, "compact_meanfield": compact, "decay": decay,
                 "nll_per_action": {}, "gain": {}}
    for cond, r in res.items():
        out["nll_per_action"][cond] = {"total": float((r["header"] + r["text"]).mean()),
                                       "header": float(r["header"].mean()), "text": float(r["text"].mean())}
    evs = np.array(ev_of)
    for a, b in (("own", "other"), ("own", "empty")):
        if a not in res or b not in res:
            continue
        for part in ("total", "header", "text"):
            da = _part(res[b], part) - _part(res[a], part)  # > 0: own context helps
            per_event = np.array([da[evs == e].mean() for e in ids])
            se = per_event.std(ddof=1) / math.sqrt(len(ids))
            out["gain"][f"{b}-{a}:{part}"] = {"mean_per_action": float(da.mean()), "per_event_mean": float(per_event.mean()),
                                              "ci95": [float(per_event.mean() - 1.96 * se), float(per_event.mean() + 1.96 * se)],
                                              "events_better": float((per_event > 0).mean())}
    if slot_ids is not None and "own" in res:
        out["header_accuracy"] = _accuracy(res["own"]["hits"], labels, dims)
    return _restore(model, was_training, out)


def _restore(model, was_training: bool, out: dict) -> dict:
    if was_training:
        model.train()
    return out


def _part(r: dict, part: str) -> np.ndarray:
    return r["header"] + r["text"] if part == "total" else r[part]


def _slot_hits(logits: torch.Tensor, b, slot_ids: list[dict[str, int]], fmt: dict) -> list[list[str]]:
    """Per example: the argmax category of each header slot among that slot's labels (teacher-forced)."""
    open_len = 1  # the open marker is one token in the formats whose labels are single tokens
    out = []
    hdr_pos = torch.nonzero(b.part == 0).flatten().tolist()
    by_seg: dict[int, list[int]] = {}
    for p in hdr_pos:
        by_seg.setdefault(int(b.seg[p]), []).append(p)
    for ex in range(b.n_examples):
        pos = by_seg.get(ex, [])[open_len:open_len + len(slot_ids)]
        pred = []
        for slot, p in zip(slot_ids, pos, strict=False):
            cats = list(slot)
            vals = logits[p, [slot[c] for c in cats]]
            pred.append(cats[int(vals.argmax())])
        out.append(pred)
    return out


def _accuracy(preds: list[list[str]], labels: list[dict[str, str]], dims: tuple[str, ...]) -> dict:
    """Per header slot and for whole headers ("all_dims": every slot right), against the rules labels."""
    per = Counter()
    joint = 0
    majority = {d: Counter(lab[d] for lab in labels).most_common(1)[0][0] for d in dims}
    base = Counter()
    for p, lab in zip(preds, labels, strict=True):
        ok = [len(p) > i and p[i] == lab[d] for i, d in enumerate(dims)]
        for d, o in zip(dims, ok, strict=True):
            per[d] += o
            base[d] += lab[d] == majority[d]
        joint += all(ok)
    n = len(labels) or 1
    return {"teacher_forced_slot_accuracy": {d: per[d] / n for d in dims}, "all_dims": joint / n,
            "majority_class_accuracy": {d: base[d] / n for d in dims}}
