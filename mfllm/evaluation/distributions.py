"""Label sequences -> per-dimension distributions per time bin, horizons, and the LLM-free baselines.

Vocabulary (see docs/evaluation.md for the full definitions):

- *bin*: a group of consecutive rollout actions. ``Binning("steps", 1)`` (the default) = one bin per
  engine step; ``Binning("actions", 16)`` = 16 actions per bin; ``Binning("seconds", 3600)`` = one
  bin per hour of real action time (empty bins are kept so horizons stay fractions of *time*).
- *horizon*: ``short`` = the first third of the rollout bins (rounded up), ``mid`` = the first two
  thirds (rounded up), ``long`` = all of them. A one-bin rollout has all three horizons = that bin.
- *keywords*: the ninth dimension is a distribution over the event's keyword vocabulary = the
  union, over the rollout bins, of each bin's top-N *real* keywords, plus ``OTHER`` for every
  other keyword.
- baselines: ``persistence`` (the warm-up's real distribution, carried forward) and ``marginal``
  (the training split's distribution, from :func:`compute_marginal`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mfllm.errors import ConfigError, DataError
from mfllm.files import atomic_write_text
from mfllm.labels.base import ActionLabels, Labeler
from mfllm.labels.dimensions import ALL_DIMENSIONS, DIMENSIONS, KEYWORDS

OTHER = "<other>"  # the keywords' catch-all category (angle brackets: never a real keyword)
HORIZONS: tuple[str, ...] = ("short", "mid", "long")
HORIZON_FRACTIONS: dict[str, tuple[int, int]] = {"short": (1, 3), "mid": (2, 3), "long": (1, 1)}
BIN_KINDS: tuple[str, ...] = ("steps", "actions", "seconds")
DEFAULT_KEYWORDS_TOP_N = 10
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


# --------------------------------------------------------------------------- binning / horizons


@dataclass(frozen=True, slots=True)
class Binning:
    by: str = "steps"  # "steps" | "actions" | "seconds"
    size: float = 1  # steps per bin, actions per bin, or seconds per bin

    def __post_init__(self) -> None:
        if self.by not in BIN_KINDS:
            raise ConfigError(
                f"unknown binning {self.by!r}; choose one of {', '.join(BIN_KINDS)}", field="bin_by"
            )
        if not (self.size > 0) or not math.isfinite(self.size):
            raise ConfigError(f"bin size must be a positive number, got {self.size!r}", field="bin_size")
        if self.by != "seconds" and float(self.size) != int(self.size):
            raise ConfigError(
                f"bin size for {self.by!r} must be a whole number, got {self.size!r}", field="bin_size"
            )
        object.__setattr__(
            self, "size", int(self.size) if float(self.size).is_integer() else float(self.size)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "size": self.size}


def assign_bins(steps: Sequence[int], times: Sequence[float], binning: Binning) -> list[int]:
    """Bin index (from 0) of each action, in the given (time) order of one event's phase."""
    n = len(steps)
    if len(times) != n:
        raise ValueError("assign_bins: steps and times differ in length")
    if n == 0:
        return []
    if binning.by == "steps":
        rank = {s: i for i, s in enumerate(sorted(set(steps)))}
        return [rank[s] // int(binning.size) for s in steps]
    if binning.by == "actions":
        return [i // int(binning.size) for i in range(n)]
    t0 = min(times)
    return [int(math.floor((t - t0) / binning.size)) for t in times]


def horizon_bins(n_bins: int) -> dict[str, int]:
    """How many leading rollout bins each horizon covers (ceil of the fraction, at least 1 if any)."""
    if n_bins <= 0:
        return {h: 0 for h in HORIZONS}
    return {h: max(1, -(-n_bins * num // den)) for h, (num, den) in HORIZON_FRACTIONS.items()}


# --------------------------------------------------------------------------- categories and counts


def keyword_vocab(
    real: Sequence[ActionLabels | None], bins: Sequence[int], top_n: int = DEFAULT_KEYWORDS_TOP_N
) -> tuple[str, ...]:
    """Union over bins of each bin's top-``top_n`` real keywords, ordered by overall frequency
    (ties: first seen). Excludes ``OTHER``, which :func:`categories` appends."""
    per_bin: dict[int, Counter[str]] = {}
    total: Counter[str] = Counter()
    for al, b in zip(real, bins, strict=True):
        if al is None:
            continue
        for w in al.keywords:
            per_bin.setdefault(b, Counter())[w] += 1
            total[w] += 1
    chosen: set[str] = set()
    for c in per_bin.values():
        chosen.update(w for w, _ in c.most_common(top_n))
    return tuple(w for w, _ in total.most_common() if w in chosen)


def categories(dim: str, vocab: Sequence[str] = ()) -> tuple[str, ...]:
    if dim == KEYWORDS:
        return (*vocab, OTHER)
    try:
        return DIMENSIONS[dim]
    except KeyError:
        raise ValueError(f"unknown dimension {dim!r}") from None


def counts(labels: Iterable[ActionLabels | None], dim: str, cats: Sequence[str]) -> np.ndarray:
    """Category counts of ``dim`` over ``labels`` (None and unknown categories are not counted).
    For keywords every keyword of an action counts once, outside-vocabulary ones as ``OTHER``."""
    index = {c: i for i, c in enumerate(cats)}
    out = np.zeros(len(cats), dtype=float)
    for al in labels:
        if al is None:
            continue
        if dim == KEYWORDS:
            for w in al.keywords:
                out[index.get(w, index[OTHER])] += 1
        else:
            i = index.get(al.labels.get(dim, ""))
            if i is not None:
                out[i] += 1
    return out


def bin_counts(
    labels: Sequence[ActionLabels | None], bins: Sequence[int], n_bins: int, dim: str, cats: Sequence[str]
) -> np.ndarray:
    """(n_bins, K) counts; row b = counts of the actions in bin b."""
    out = np.zeros((n_bins, len(cats)), dtype=float)
    groups: dict[int, list[ActionLabels | None]] = {}
    for al, b in zip(labels, bins, strict=True):
        if 0 <= b < n_bins:
            groups.setdefault(b, []).append(al)
    for b, g in groups.items():
        out[b] = counts(g, dim, cats)
    return out


def shares(count_rows: np.ndarray) -> np.ndarray:
    """Normalise each row to sum 1; rows with no counts become NaN (no data in that bin)."""
    c = np.asarray(count_rows, dtype=float)
    s = c.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = c / s
    out[np.broadcast_to(s == 0, out.shape)] = np.nan
    return out


def agent_item(al: ActionLabels | None, dim: str) -> str | frozenset[str] | None:
    """One agent's label for micro-F1: its category, or its keyword set (raw words) for keywords."""
    if al is None:
        return None
    if dim == KEYWORDS:
        return frozenset(al.keywords)
    return al.labels.get(dim)


# --------------------------------------------------------------------------- one event


@dataclass(slots=True)
class EventLabels:
    """One event's labelled actions: the warm-up's real actions and the rollout's (real, sim) pairs.
    ``more_sims`` holds the simulated labels of further replica crowds of the same agents (replica 1,
    2, ...), each aligned with ``real``; ``sims`` is every crowd, replica 0 first."""

    event_id: str
    warmup: list[ActionLabels | None]
    warmup_bins: list[int]
    real: list[ActionLabels | None]
    sim: list[ActionLabels | None]
    bins: list[int]  # rollout bin of each (real, sim) pair
    more_sims: list[list[ActionLabels | None]] = field(default_factory=list)

    @property
    def sims(self) -> list[list[ActionLabels | None]]:
        return [self.sim, *self.more_sims]

    @property
    def n_bins(self) -> int:
        return max(self.bins) + 1 if self.bins else 0

    @property
    def n_warmup_bins(self) -> int:
        return max(self.warmup_bins) + 1 if self.warmup_bins else 0

    def vocab(self, top_n: int = DEFAULT_KEYWORDS_TOP_N) -> tuple[str, ...]:
        return keyword_vocab(self.real, self.bins, top_n)


@dataclass(slots=True)
class Prediction:
    """What a source (a simulated crowd, a sampled baseline or a smooth baseline) says about the rollout,
    for one dimension: (n_bins, K) label *counts* per bin (a smooth baseline: the counts its distribution
    was estimated from; NaN rows = no data) and, per crowd, one item per rollout agent (micro-F1)."""

    counts: np.ndarray
    items: list[list[str | frozenset[str] | None]]

    @property
    def dist(self) -> np.ndarray:
        return shares(self.counts)


def crowd_prediction(crowds: Sequence[Sequence[ActionLabels | None]], ev: EventLabels, dim: str,
                     cats: Sequence[str]) -> Prediction:
    """Crowds of the rollout's agents (each aligned with ``ev.real``): counts pooled over the crowds per
    bin, items per crowd. A bin where no crowd has a labelled action is NaN (no data)."""
    c = sum(bin_counts(s, ev.bins, ev.n_bins, dim, cats) for s in crowds)
    c = np.asarray(c, dtype=float)
    c[c.sum(1) == 0] = np.nan
    return Prediction(counts=c, items=[[agent_item(al, dim) for al in s] for s in crowds])


def sim_prediction(ev: EventLabels, dim: str, cats: Sequence[str], pooled: bool = True) -> Prediction:
    """The simulated crowd(s): every replica pooled, or replica 0 only."""
    return crowd_prediction(ev.sims if pooled else ev.sims[:1], ev, dim, cats)


def _constant(counts: np.ndarray | None, item, ev: EventLabels) -> Prediction | None:
    if counts is None:
        return None
    return Prediction(counts=np.tile(counts, (ev.n_bins, 1)), items=[[item] * len(ev.real)])


def persistence_prediction(ev: EventLabels, dim: str, cats: Sequence[str]) -> Prediction | None:
    """The warm-up's real distribution for every rollout bin (its counts: the warm-up's); per agent, the
    warm-up's majority category (keywords: the single most frequent warm-up keyword). None if the warm-up
    has no labels."""
    c = counts(ev.warmup, dim, cats)
    if c.sum() == 0:
        return None
    if dim == KEYWORDS:
        kw = Counter(w for al in ev.warmup if al is not None for w in al.keywords)
        item: str | frozenset[str] = frozenset([kw.most_common(1)[0][0]])
    else:
        item = cats[int(np.argmax(c))]
    return _constant(c, item, ev)


# A marginal file without its action count: its shares count as this many actions (smoothing ~ none).
_MARGINAL_WEIGHT = 1e6


def marginal_prediction(
    marginal: dict | None, ev: EventLabels, dim: str, cats: Sequence[str]
) -> Prediction | None:
    """The training split's distribution for every rollout bin (counts: the training actions'); per
    agent, its majority category (keywords: the most frequent training keyword). None if unavailable
    for this dimension."""
    if marginal is None:
        return None
    if dim == KEYWORDS:
        kw = marginal.get("keywords") or {}
        kc: dict[str, float] = kw.get("counts") or {}
        total = float(kw.get("total") or 0)
        if total <= 0 or not kc:
            return None
        row = np.array([float(kc.get(w, 0.0)) for w in cats[:-1]] + [0.0])
        row[-1] = max(total - row.sum(), 0.0)
        top = max(kc.items(), key=lambda x: x[1])[0]
        return _constant(row, frozenset([top]), ev)
    d = (marginal.get("distributions") or {}).get(dim)
    if not d:
        return None
    row = np.array([float(d.get(c, 0.0)) for c in cats])
    if row.sum() <= 0:
        return None
    n = float(marginal.get("n_labelled") or _MARGINAL_WEIGHT)
    return _constant(row / row.sum() * n, cats[int(np.argmax(row))], ev)


# --------------------------------------------------------------------------- the training marginal

MARGINAL_TOP_KEYWORDS = 2000


def compute_marginal(events: Iterable[Any], labeler: Labeler, batch_size: int = 512) -> dict:
    """Label every action of ``events`` (the training split: ``mfllm.data.schema.Event`` objects,
    or anything with ``.actions`` whose items have ``.text``) and return the label distribution per
    dimension + the keyword counts (the top 2000). Save it with :func:`save_marginal`."""
    dim_counts = {d: Counter() for d in DIMENSIONS}
    kw: Counter[str] = Counter()
    n_events = n_actions = n_labelled = 0
    buf: list[str] = []

    def flush() -> None:
        nonlocal n_labelled
        if not buf:
            return
        for al in labeler.label(list(buf)):
            if al is None:
                continue
            n_labelled += 1
            for d in DIMENSIONS:
                v = al.labels.get(d)
                if v in DIMENSIONS[d]:
                    dim_counts[d][v] += 1
            kw.update(al.keywords)
        buf.clear()

    for ev in events:
        n_events += 1
        for a in ev.actions:
            n_actions += 1
            buf.append(a.text)
            if len(buf) >= batch_size:
                flush()
    flush()
    if n_labelled == 0:
        raise DataError("<events>", "compute_marginal: no action could be labelled")
    dists = {}
    for d, c in dim_counts.items():
        tot = sum(c.values())
        dists[d] = {cat: (c[cat] / tot if tot else 0.0) for cat in DIMENSIONS[d]}
    return {
        "kind": "marginal",
        "labeler": getattr(labeler, "name", "?"),
        "labeler_version": str(getattr(labeler, "version", "?")),
        "n_events": n_events,
        "n_actions": n_actions,
        "n_labelled": n_labelled,
        "distributions": dists,
        "keywords": {"total": sum(kw.values()), "counts": dict(kw.most_common(MARGINAL_TOP_KEYWORDS))},
    }


def marginal_path(labeler_name: str, version: str) -> Path:
    """The cached marginal shipped with the package: mfllm/assets/marginal_<labeler>_v<version>.json."""
    return ASSETS_DIR / f"marginal_{labeler_name}_v{version}.json"


def save_marginal(marginal: dict, path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path else marginal_path(marginal["labeler"], marginal["labeler_version"])
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(marginal, ensure_ascii=False, indent=1, sort_keys=True))
    return p


def load_marginal(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(p), "marginal file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(str(p), f"cannot read marginal JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("distributions"), dict):
        raise DataError(str(p), "not a marginal file (no 'distributions' object)", field="distributions")
    return d


__all__ = [
    "ALL_DIMENSIONS",
    "Binning",
    "EventLabels",
    "HORIZONS",
    "OTHER",
    "Prediction",
    "agent_item",
    "assign_bins",
    "bin_counts",
    "categories",
    "compute_marginal",
    "counts",
    "crowd_prediction",
    "horizon_bins",
    "keyword_vocab",
    "load_marginal",
    "marginal_path",
    "marginal_prediction",
    "persistence_prediction",
    "save_marginal",
    "shares",
    "sim_prediction",
]
