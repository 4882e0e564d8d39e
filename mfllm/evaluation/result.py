"""What an evaluation computed (metrics and the labelled events), handed to the plots and the report.

Its own module so that plots.py and report.py, which evaluate.py calls, need not import evaluate.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from mfllm.evaluation import distributions as D
from mfllm.labels.base import ActionLabels
from mfllm.store.rundir import RunData


@dataclass(slots=True)
class Evaluation:
    """Everything evaluate_run computed, for plots and the report."""

    run: RunData
    metrics: dict
    events: dict[str, D.EventLabels]
    labels: dict[str, ActionLabels | None]
