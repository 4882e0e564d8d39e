"""The mean-field diagnostics' interventions: the policy reads the empty mean field (``mf-empty``) or
another event's (``mf-shuffled``): is m_t used at all, and is it used as information about this event?"""

from __future__ import annotations

from pathlib import Path

from mfllm.prompts.templates import strings
from mfllm.simulation.interventions import Intervention
from mfllm.store.run import iter_steps


class EmptyMeanField(Intervention):
    """The policy reads the empty mean field at every step."""

    def __init__(self, lang: str = "zh"):
        self.text = strings(lang)["empty_meanfield"]

    def meanfield_text(self, event_id: str, step: int, text: str) -> str:
        return self.text


class DonorMeanField(Intervention):
    """The policy reads another event's mean field at the same step. ``reads[event][s]`` is the text the
    donor's policy read at step s (the donor's record of step s-1)."""

    def __init__(self, donor_of: dict[str, str], reads: dict[str, list[str]]):
        self.donor_of, self.reads = donor_of, reads

    def meanfield_text(self, event_id: str, step: int, text: str) -> str:
        seq = self.reads.get(self.donor_of.get(event_id, ""), [])
        return seq[min(step, len(seq) - 1)] if seq else text


def donor_reads(mf_run: Path, lang: str) -> dict[str, list[str]]:
    """Per event of a finished mf run: the mean-field text its policy read at each step."""
    per: dict[str, dict[int, str]] = {}
    for rec in iter_steps(mf_run):
        per.setdefault(rec["event_id"], {})[int(rec["step"])] = rec["meanfield"]
    empty = strings(lang)["empty_meanfield"]
    out = {}
    for e, steps in per.items():
        n = max(steps) + 2
        seq, last = [], empty
        for s in range(n):
            seq.append(last)
            last = steps.get(s, last)
        out[e] = seq
    return out
