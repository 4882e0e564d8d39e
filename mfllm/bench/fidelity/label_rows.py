"""The LLM-free rows, scored by the same code as every simulated row (evaluate_event, the same rule).

Each needs no simulation, only the real actions: every event is cut into steps exactly as the engine cuts
it (:func:`mfllm.simulation.steps.plan_steps`, the same warm-up and rollout cap), its real actions are
labelled, and each row draws R crowds (replicas) of labels for the rollout's agents:

- ``persistence-sampled``: each agent's labels are those of a random warm-up action of the event;
- ``marginal-sampled``: those of a random training-split action;
- ``oracle-sampled``: those of a random real action of the *same time bin* of the event's rollout (the
  ceiling of any sampler: it knows the real future's label mix in every bin the scorer reads, only not
  who does what; its score is what sampling noise alone costs a perfect simulator under the rule);
- ``oracle-mix``: those of a random action of the whole real rollout (knows the rollout's overall mix
  but not how it moves over time: on events whose mix barely moves, smooth persistence ties it);
- ``mf-oracle``: drawn closed loop from a label model fitted on the training split
  (:mod:`mfllm.bench.fidelity.mf_oracle`).

The smooth baselines ``persistence`` and ``marginal`` are scored beside them, as in every evaluation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfllm.data.load import load_events
from mfllm.data.schema import Action, Event
from mfllm.evaluation import distributions as D
from mfllm.evaluation.evaluate import build_event_labels, evaluate_event, label_texts
from mfllm.evaluation.metrics import Scoring
from mfllm.files import atomic_open, atomic_write_json
from mfllm.labels import reader as mf_oracle
from mfllm.labels.base import ActionLabels, Labeler
from mfllm.seeds import derive_seed
from mfllm.simulation.steps import plan_steps

SOURCE = "labels"  # the pseudo-method name of the LLM-free evaluation


@dataclass
class Skeleton:
    """One event as the bench scores it: its labelled warm-up and rollout, and the rollout's steps."""

    labels: D.EventLabels
    warm_steps: list[list[ActionLabels | None]]
    roll_steps: list[list[Action]]


def event_steps(event: Event, warmup: int, step_size: int, max_agents: int | None):
    """(warm-up steps, rollout steps) of real actions, cut and capped as the engine does."""
    warm, roll = [], []
    done = 0
    for step in plan_steps(event.actions, step_size, warmup):
        if step.phase == "warmup":
            warm.append((step.index, step.actions))
            continue
        acts = step.actions
        if max_agents is not None:
            left = max_agents - done
            if left <= 0:
                break
            acts = acts[:left]
        done += len(acts)
        roll.append((step.index, acts))
    return warm, roll


def skeletons(events: Sequence[Event], labeler: Labeler, warmup: int, step_size: int, max_agents: int | None,
              binning: D.Binning) -> dict[str, Skeleton]:
    cut = {e.event_id: event_steps(e, warmup, step_size, max_agents) for e in events}
    texts = [a.text for w, r in cut.values() for _, acts in (*w, *r) for a in acts]
    labels = label_texts(labeler, texts)
    out = {}
    for eid, (warm, roll) in cut.items():
        recs = [{"event_id": eid, "step": i, "phase": ph, "actions": [
            {"action_id": a.action_id, "time": a.time, "real_text": a.text, "sim_text": None} for a in acts]}
            for ph, steps in (("warmup", warm), ("rollout", roll)) for i, acts in steps]
        out[eid] = Skeleton(build_event_labels(eid, recs, labels, binning),
                            [[labels.get(a.text) for a in acts] for _, acts in warm], [acts for _, acts in roll])
    return out


def _draw(pool: Sequence[ActionLabels], n: int, rng: np.random.Generator) -> list[ActionLabels | None]:
    if not pool:
        return [None] * n
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


def _draw_per_bin(real: Sequence[ActionLabels | None], bins: Sequence[int],
                  rng: np.random.Generator) -> list[ActionLabels | None]:
    """For each rollout agent, the labels of a random labelled real action of its own bin."""
    pools: dict[int, list[ActionLabels]] = {}
    for a, b in zip(real, bins, strict=True):
        if a is not None:
            pools.setdefault(b, []).append(a)
    out: list[ActionLabels | None] = []
    for b in bins:
        pool = pools.get(b)
        out.append(pool[int(rng.integers(0, len(pool)))] if pool else None)
    return out


def _rng(seed: int, row: str, event_id: str, k: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, row, event_id, k))


def crowds(sk: Skeleton, replicas: int, seed: int, train_pool: Sequence[ActionLabels] | None,
           model: mf_oracle.LabelModel | None) -> dict[str, list[list[ActionLabels | None]]]:
    """Every sampled row's R crowds for one event (rows without their input are left out)."""
    ev = sk.labels
    n = len(ev.real)
    warm = [a for a in ev.warmup if a is not None]
    real = [a for a in ev.real if a is not None]
    out: dict[str, list] = {
        "persistence-sampled": [_draw(warm, n, _rng(seed, "persistence-sampled", ev.event_id, k)) for k in range(replicas)],
    }
    if train_pool:
        out["marginal-sampled"] = [_draw(train_pool, n, _rng(seed, "marginal-sampled", ev.event_id, k))
                                   for k in range(replicas)]
    out["oracle-sampled"] = [_draw_per_bin(ev.real, ev.bins, _rng(seed, "oracle-sampled", ev.event_id, k))
                             for k in range(replicas)]
    out["oracle-mix"] = [_draw(real, n, _rng(seed, "oracle-mix", ev.event_id, k)) for k in range(replicas)]
    if model is not None:
        out["mf-oracle"] = [mf_oracle.closed_loop(model, sk.warm_steps, sk.roll_steps,
                                                  _rng(seed, "mf-oracle", ev.event_id, k), warm)
                            for k in range(replicas)]
    return out


def score(sks: dict[str, Skeleton], rules: dict[str, Scoring], replicas: int, seed: int, marginal: dict | None,
          keywords_top_n: int, train_pool, model) -> dict[str, dict[str, dict]]:
    """rule name -> event -> evaluate_event's result for the LLM-free rows (and the smooth baselines)."""
    out: dict[str, dict[str, dict]] = {k: {} for k in rules}
    for eid, sk in sks.items():
        if sk.labels.n_bins == 0:
            continue
        cr = crowds(sk, replicas, seed, train_pool, model)
        for k, rule in rules.items():
            out[k][eid] = evaluate_event(sk.labels, None, marginal, keywords_top_n, rule, crowds=cr)
    return out


# ------------------------------------------------------------------------------------ the training side


def train_side(data: str, labeler: Labeler, warmup: int, step_size: int, max_agents: int | None, n_events: int,
               cache_dir: Path, log=None) -> tuple[list[ActionLabels], mf_oracle.LabelModel | None, dict]:
    """(the training-split action labels marginal-sampled draws from, the fitted mf-oracle, info).

    The first ``n_events`` training events (id order), each cut as the bench cuts events. The fitted
    weights are cached in ``cache_dir`` under a key of everything they depend on."""
    key = hashlib.blake2b(json.dumps([str(Path(data).resolve()), labeler.name, str(labeler.version), warmup,
                                      step_size, max_agents, n_events, mf_oracle.DECAY,
                                      mf_oracle.FEATURES_VERSION]).encode(),
                          digest_size=6).hexdigest()
    npz, meta = cache_dir / f"mf-oracle-{key}.npz", cache_dir / f"mf-oracle-{key}.json"
    res = load_events(data, split="train", limit=n_events)
    if not res.events:
        return [], None, {"train_events": 0, "why": f"no training-split events in {data}"}
    cut = [event_steps(e, warmup, step_size, max_agents) for e in res.events]
    texts = [a.text for w, r in cut for _, acts in (*w, *r) for a in acts]
    labels = label_texts(labeler, texts)
    pool = [al for t in texts if (al := labels.get(t)) is not None]
    if npz.is_file() and meta.is_file():
        info = json.loads(meta.read_text(encoding="utf-8"))
        with np.load(npz) as z:
            return pool, mf_oracle.LabelModel.from_npz(z, info), info
    if log:
        log(f"mf-oracle: fitting on {len(pool)} actions of {len(res.events)} training events")
    model = mf_oracle.fit_events([[(a, labels.get(a.text)) for a in acts] for _, acts in (*w, *r)] for w, r in cut)
    info = {"train_events": len(res.events), "train_actions": len(pool), **model.fit_info, "cache": str(npz)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(npz, "wb") as f:
        np.savez(f, **model.to_npz())
    atomic_write_json(meta, info)
    model.fit_info = info
    return pool, model, info
