"""Label shares of the simulated agents: count vectors over every (dimension, category), shares within
each dimension, and one arm's trajectories per replica and rollout step.

Shares: per dimension, the share of each category among the simulated agents of a bin whose text could
be labelled (injected posts are not agents and are never counted). Bins are groups of ``bin_steps``
rollout steps (``step_size`` planned agents per step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfllm.evaluation.evaluate import label_texts
from mfllm.labels.base import ActionLabels, Labeler
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.whatif.common import ArmRun

CATS: tuple[tuple[str, str], ...] = tuple((d, c) for d, cs in DIMENSIONS.items() for c in cs)
BLOCKS: dict[str, slice] = {}
_i = 0
for _d, _cs in DIMENSIONS.items():
    BLOCKS[_d] = slice(_i, _i + len(_cs))
    _i += len(_cs)
del _i, _d, _cs


def label_records(arms: Sequence[ArmRun], labeler: Labeler, extra_texts: Sequence[str] = ()) -> dict:
    """Label every distinct text the arms need (warm-up real texts, rollout simulated texts) once."""
    texts = list(extra_texts)
    for arm in arms:
        for recs in arm.records:
            for rec in recs:
                for a in rec["actions"]:
                    if a.get("injected"):
                        continue
                    t = a.get("real_text") if rec["phase"] == "warmup" else a.get("sim_text")
                    if t is not None:
                        texts.append(t)
    return label_texts(labeler, texts)


def count_vector(labels: Sequence[ActionLabels | None]) -> np.ndarray:
    """Counts of every (dimension, category) of CATS over the labelled items (None skipped)."""
    out = np.zeros(len(CATS))
    index = {dc: i for i, dc in enumerate(CATS)}
    for al in labels:
        if al is None:
            continue
        for d in DIMENSIONS:
            i = index.get((d, al.labels.get(d)))
            if i is not None:
                out[i] += 1
    return out


def block_shares(counts: np.ndarray) -> np.ndarray:
    """Shares within each dimension's block of CATS, along the last axis; NaN where a block has no count."""
    c = np.asarray(counts, dtype=float)
    out = np.full(c.shape, np.nan)
    for sl in BLOCKS.values():
        s = c[..., sl].sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[..., sl] = np.where(s > 0, c[..., sl] / np.where(s > 0, s, 1), np.nan)
    return out


@dataclass
class Trajectories:
    """One arm's label counts per replica and rollout step (aligned across replicas and arms by step)."""

    first_step: int  # the first rollout step (all replicas share the warm-up, so it is the same)
    step_size: int
    steps: np.ndarray  # (R, S, K) counts of the simulated agents' labels per rollout step
    agents: np.ndarray  # (R, S) simulated agents per step (labelled or not)
    hours: np.ndarray  # (R, S) mean arrival time of the step's agents, hours after the source; NaN if none
    warm: np.ndarray  # (K,) counts of the warm-up's real actions (replica 0)
    meanfield: list[dict[int, str]]  # per replica: step -> m_t after that step

    @property
    def n_steps(self) -> int:
        return self.steps.shape[1]

    def bins(self, bin_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(R, B, K) counts, (R, B) agents, (R, B) mean hours per bin of `bin_steps` rollout steps."""
        b = max(1, int(bin_steps))
        nb = math.ceil(self.n_steps / b) if self.n_steps else 0
        r = self.steps.shape[0]
        counts = np.zeros((r, nb, len(CATS)))
        agents = np.zeros((r, nb))
        hours = np.full((r, nb), np.nan)
        for i in range(nb):
            sl = slice(i * b, (i + 1) * b)
            counts[:, i] = self.steps[:, sl].sum(1)
            agents[:, i] = self.agents[:, sl].sum(1)
            w = self.agents[:, sl]
            h = np.nan_to_num(self.hours[:, sl]) * w
            with np.errstate(invalid="ignore", divide="ignore"):
                hours[:, i] = np.where(w.sum(1) > 0, h.sum(1) / np.where(w.sum(1) > 0, w.sum(1), 1), np.nan)
        return counts, agents, hours

    def window(self, starts: Sequence[int], n_steps: int | None) -> np.ndarray:
        """(R, K) counts pooled over the rollout steps [start_r, start_r + n_steps) of each replica
        (start given as an event step index; n_steps None = to the end)."""
        out = np.zeros((self.steps.shape[0], len(CATS)))
        for r, s in enumerate(starts):
            lo = max(0, s - self.first_step)
            hi = self.n_steps if n_steps is None else min(self.n_steps, lo + n_steps)
            out[r] = self.steps[r, lo:hi].sum(0)
        return out


def trajectories(arm: ArmRun, labels: dict, source_time: float, step_size: int,
                 first_step: int | None = None, n_steps: int | None = None) -> Trajectories:
    recs = arm.records
    roll = [r["step"] for rr in recs for r in rr if r["phase"] == "rollout"]
    if first_step is None:
        first_step = min(roll) if roll else 0
    if n_steps is None:
        n_steps = (max(roll) - first_step + 1) if roll else 0
    R = len(recs)
    steps = np.zeros((R, n_steps, len(CATS)))
    agents = np.zeros((R, n_steps))
    hours = np.full((R, n_steps), np.nan)
    warm_labels: list = []
    mfs: list[dict[int, str]] = []
    for r, rr in enumerate(recs):
        mf: dict[int, str] = {}
        for rec in rr:
            mf[rec["step"]] = rec.get("meanfield", "")
            acts = [a for a in rec["actions"] if not a.get("injected")]
            if rec["phase"] == "warmup":
                if r == 0:
                    warm_labels.extend(labels.get(a.get("real_text")) for a in acts if a.get("real_text") is not None)
                continue
            i = rec["step"] - first_step
            if not 0 <= i < n_steps:
                continue
            steps[r, i] = count_vector([labels.get(a["sim_text"]) for a in acts if a.get("sim_text") is not None])
            agents[r, i] = len(acts)
            ts = [a["time"] for a in acts if a.get("time") is not None]
            if ts:
                hours[r, i] = (float(np.mean(ts)) - source_time) / 3600.0
        mfs.append(mf)
    return Trajectories(first_step, step_size, steps, agents, hours, count_vector(warm_labels), mfs)


def per_dim(vec: np.ndarray, fmt=lambda x: x) -> dict[str, dict[str, Any]]:
    """A (..., K) array as {dimension: {category: fmt(values)}}."""
    return {d: {c: fmt(vec[..., BLOCKS[d]][..., j]) for j, c in enumerate(cs)} for d, cs in DIMENSIONS.items()}


def bin_ranges(n_bins: int, bin_steps: int, step_size: int, total: int | None = None) -> list[list[int]]:
    """[first, last] planned agent (1-based, after the warm-up) of each bin (total: the last agent)."""
    k = bin_steps * step_size
    return [[i * k + 1, (i + 1) * k if total is None else min((i + 1) * k, total)] for i in range(n_bins)]
