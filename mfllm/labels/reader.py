"""The label reader: what a perfect *reader* of the mean field would decide, at the label level.

The bench's ``mf-oracle`` row runs it closed loop (``mfllm.bench.fidelity.label_rows``); ``mfllm train
decide``'s reader term uses its per-agent distributions as targets.

A multinomial logistic regression per label dimension, fitted on the training split only: the next
action's category from the step-lagged mean-field label shares (the ``stats`` mean field's counts of
every category, through the previous step, at the default policy's memory: decay 1), their logs (so
the reader can copy a mix: p = share is linear in log shares) and the agent's state (profile numbers,
repost depth). Run closed loop on an event (``closed_loop``): the warm-up's real labels fill the
shares; each rollout step's agents draw their labels from the model, and the drawn labels update the
shares for the next step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mfllm.data.schema import Action
from mfllm.labels.base import ActionLabels
from mfllm.labels.dimensions import DIMENSIONS

# The stats mean field's per-step decay, as the default policy reads it (mfllm-decide's meanfield_decay).
# At 0.8 and without log shares this reader was weaker than copying the warm-up on val (50 events:
# 0.111 against persistence-sampled's 0.115); at 1 with logs it is 0.105 (docs/results.md).
DECAY = 1.0
LOG_FLOOR = 0.02  # log(share + LOG_FLOOR): a category never seen stays finite
FEATURES_VERSION = 2  # in the weights' cache key
_CATS = [(d, c) for d, cats in DIMENSIONS.items() for c in cats]


def state_features(a: Action) -> list[float]:
    """The agent's state as numbers (missing -> 0): log counts, verified, gender, bio, repost depth."""
    p = a.profile

    def lg(x) -> float:
        return math.log1p(max(float(x), 0.0)) / 10 if x is not None else 0.0

    return [lg(p.followers), lg(p.friends), lg(p.statuses), lg(p.corpus_activity), float(bool(p.verified)),
            float(p.gender == "m"), float(p.gender == "f"), float(bool(p.has_description or p.description)),
            float((a.depth or 1) > 1), 1.0]


class Shares:
    """The decayed label counts of the actions fed so far (what the stats mean field summarises)."""

    def __init__(self):
        self.c = np.zeros(len(_CATS))
        self.n = 0.0

    def features(self) -> list[float]:
        out = []
        i = 0
        for cats in DIMENSIONS.values():
            tot = self.c[i:i + len(cats)].sum()
            sh = list(self.c[i:i + len(cats)] / tot) if tot > 0 else [0.0] * len(cats)
            out += sh + ([math.log(v + LOG_FLOOR) for v in sh] if tot > 0 else [0.0] * len(cats))
            i += len(cats)
        return out + [math.log1p(self.n) / 5]

    def update(self, labels: Sequence[ActionLabels | None]) -> None:
        self.c *= DECAY
        self.n = self.n * DECAY + len(labels)
        idx = {dc: i for i, dc in enumerate(_CATS)}
        for al in labels:
            if al is None:
                continue
            for d, c in al.labels.items():
                if (d, c) in idx:
                    self.c[idx[(d, c)]] += 1.0


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@dataclass
class LabelModel:
    """Per dimension, a (features x categories) weight matrix."""

    weights: dict[str, np.ndarray]
    fit_info: dict

    def probs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {d: _softmax(x @ w) for d, w in self.weights.items()}

    def to_npz(self) -> dict[str, np.ndarray]:
        return {f"w_{d}": w for d, w in self.weights.items()}

    @classmethod
    def from_npz(cls, z, fit_info: dict) -> LabelModel:
        return cls({d: np.asarray(z[f"w_{d}"]) for d in DIMENSIONS}, fit_info)


def fit_events(events: Iterable[Sequence[Sequence[tuple[Action, ActionLabels | None]]]]) -> LabelModel:
    """The reader fitted on events given as labelled steps (each event: its steps in order, each step its
    (action, labels) pairs), every action teacher forced (`training_rows`)."""
    xs, ys = [], []
    for steps in events:
        x, y = training_rows(steps)
        xs += x
        ys += y
    if not xs:
        raise ValueError("the label reader needs at least one labelled action")
    return fit(xs, ys)


def training_rows(steps: Sequence[Sequence[tuple[Action, ActionLabels | None]]]) -> tuple[list, list]:
    """One event's steps (real actions with their labels, in step order) -> (features, labels) per action,
    each action's features from the shares of the steps before its own (teacher forced)."""
    sh = Shares()
    xs, ys = [], []
    for step in steps:
        f = sh.features()
        for a, al in step:
            if al is not None:
                xs.append(f + state_features(a))
                ys.append(al)
        sh.update([al for _, al in step])
    return xs, ys


def fit(xs: list[list[float]], ys: list[ActionLabels], l2: float = 1e-3, iters: int = 200) -> LabelModel:
    """Multinomial logistic regression per dimension (L-BFGS on the mean log-loss + l2 on the weights)."""
    import torch  # heavy: only when a model is fitted

    x = torch.tensor(np.asarray(xs, dtype=np.float64))
    weights, info = {}, {"n": len(xs), "features": int(x.shape[1]), "l2": l2, "log_loss": {}, "marginal_log_loss": {}}
    for d, cats in DIMENSIONS.items():
        y_np = np.array([cats.index(al.labels[d]) if al.labels.get(d) in cats else -1 for al in ys])
        keep = torch.tensor(y_np >= 0)
        xd, yd = x[keep], torch.tensor(y_np[y_np >= 0])
        w = torch.zeros(x.shape[1], len(cats), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=iters, line_search_fn="strong_wolfe")

        def closure(opt=opt, w=w, xd=xd, yd=yd):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xd @ w, yd) + l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            info["log_loss"][d] = float(torch.nn.functional.cross_entropy(xd @ w, yd))
            freq = torch.bincount(yd, minlength=len(cats)).double() / len(yd)
            info["marginal_log_loss"][d] = float(-(freq[yd].clamp_min(1e-12)).log().mean())
        weights[d] = w.detach().numpy()
    info["gain_nats_per_action"] = sum(info["marginal_log_loss"].values()) - sum(info["log_loss"].values())
    return LabelModel(weights, info)


def closed_loop(model: LabelModel, warm_steps: Sequence[Sequence[ActionLabels | None]],
                roll_steps: Sequence[Sequence[Action]], rng: np.random.Generator,
                keyword_pool: Sequence[ActionLabels]) -> list[ActionLabels]:
    """One crowd for an event's rollout agents: labels drawn from the model, step by step; the drawn
    labels update the shares. Keywords: those of a random warm-up action (the model has none)."""
    sh = Shares()
    for step in warm_steps:
        sh.update(step)
    out: list[ActionLabels] = []
    for step in roll_steps:
        if not step:
            continue
        f = sh.features()
        x = np.array([f + state_features(a) for a in step])
        pr = model.probs(x)
        drawn = []
        for i in range(len(step)):
            labels = {d: DIMENSIONS[d][int(rng.choice(len(DIMENSIONS[d]), p=pr[d][i]))] for d in DIMENSIONS}
            kw = list(keyword_pool[int(rng.integers(len(keyword_pool)))].keywords) if keyword_pool else []
            drawn.append(ActionLabels(labels=labels, keywords=kw))
        out += drawn
        sh.update(drawn)
    return out
