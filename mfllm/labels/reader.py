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

A reader may also be *conditional* (``given``): a dimension's model then also reads the labels of the
dimensions named before it (one-hot), as a decision header writes its slots one after the other. Its
distribution for a slot is then what a header should say there given the slots already written, which
is what ``mfllm train decide``'s reader term compares with (``reader_conditional``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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


def given_features(labels: Sequence[dict[str, str]], dims: Sequence[str]) -> np.ndarray:
    """[rows, categories of `dims`]: the one-hot labels of `dims` (a missing label: all zeros)."""
    out = np.zeros((len(labels), sum(len(DIMENSIONS[d]) for d in dims)))
    k = 0
    for d in dims:
        cats = DIMENSIONS[d]
        for i, lab in enumerate(labels):
            if lab.get(d) in cats:
                out[i, k + cats.index(lab[d])] = 1.0
        k += len(cats)
    return out


@dataclass
class LabelModel:
    """Per dimension, a (features x categories) weight matrix; `given[d]`: the dimensions whose labels
    dimension d's model also reads (its features, then their one-hots; empty for a plain reader)."""

    weights: dict[str, np.ndarray]
    fit_info: dict
    given: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def probs(self, x: np.ndarray, labels: Sequence[dict[str, str]] | None = None) -> dict[str, np.ndarray]:
        """Per dimension, [rows, categories]; `labels` (one dict per row) are required by a conditional reader."""
        out = {}
        for d, w in self.weights.items():
            g = self.given.get(d, ())
            if g and labels is None:
                raise ValueError(f"the reader of {d!r} is conditional on {list(g)}: pass their labels")
            out[d] = _softmax((np.hstack([x, given_features(labels, g)]) if g else x) @ w)
        return out

    def to_npz(self) -> dict[str, np.ndarray]:
        return {f"w_{d}": w for d, w in self.weights.items()}

    @classmethod
    def from_npz(cls, z, fit_info: dict) -> LabelModel:
        """The weights `to_npz` wrote; a conditional reader's `given` is read back from `fit_info` (`fit` keeps it there)."""
        given = {d: tuple(g) for d, g in (fit_info.get("given") or {}).items()}
        return cls({d: np.asarray(z[f"w_{d}"]) for d in DIMENSIONS}, fit_info, given)


def fit_events(events: Iterable[Sequence[Sequence[tuple[Action, ActionLabels | None]]]],
               given: dict[str, tuple[str, ...]] | None = None) -> LabelModel:
    """The reader fitted on events given as labelled steps (each event: its steps in order, each step its
    (action, labels) pairs), every action teacher forced (`training_rows`); `given` as in `fit`."""
    xs, ys = [], []
    for steps in events:
        x, y = training_rows(steps)
        xs += x
        ys += y
    if not xs:
        raise ValueError("the label reader needs at least one labelled action")
    return fit(xs, ys, given=given)


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


def fit(xs: list[list[float]], ys: list[ActionLabels], l2: float = 1e-3, iters: int = 200,
        given: dict[str, tuple[str, ...]] | None = None) -> LabelModel:
    """Multinomial logistic regression per dimension (L-BFGS on the mean log-loss + l2 on the weights, the
    bias excepted). `given[d]`: dimension d's model also reads those dimensions' labels (a conditional reader)."""
    import torch  # heavy: only when a model is fitted

    given = {d: tuple(g) for d, g in (given or {}).items() if g}
    x_all = torch.tensor(np.asarray(xs, dtype=np.float64))
    weights, info = {}, {"n": len(xs), "features": int(x_all.shape[1]), "l2": l2, "log_loss": {},
                         "marginal_log_loss": {}, "given": {d: list(g) for d, g in given.items()}}
    bias = x_all.shape[1] - 1  # state_features ends with the constant 1
    labels = [al.labels for al in ys]
    onehot = {g: torch.tensor(given_features(labels, (g,))) for g in {g for gs in given.values() for g in gs}}
    for d, cats in DIMENSIONS.items():
        g = given.get(d, ())
        x = torch.cat([x_all, *(onehot[k] for k in g)], 1) if g else x_all
        y_np = np.array([cats.index(lab[d]) if lab.get(d) in cats else -1 for lab in labels])
        keep = torch.tensor(y_np >= 0)
        xd, yd = x[keep], torch.tensor(y_np[y_np >= 0])
        penalised = torch.ones(x.shape[1], 1, dtype=torch.float64)
        penalised[bias] = 0.0
        w = torch.zeros(x.shape[1], len(cats), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=iters, line_search_fn="strong_wolfe")

        def closure(opt=opt, w=w, xd=xd, yd=yd, pen=penalised):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xd @ w, yd) + l2 * ((w * pen) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            info["log_loss"][d] = float(torch.nn.functional.cross_entropy(xd @ w, yd))
            freq = torch.bincount(yd, minlength=len(cats)).double() / len(yd)
            info["marginal_log_loss"][d] = float(-(freq[yd].clamp_min(1e-12)).log().mean())
        weights[d] = w.detach().numpy()
    info["gain_nats_per_action"] = sum(info["marginal_log_loss"].values()) - sum(info["log_loss"].values())
    return LabelModel(weights, info, given)


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
