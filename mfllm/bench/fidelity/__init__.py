"""Fidelity benchmark: every method on the same events, model, seeds and warm-up, R replica crowds each,
scored beside the LLM-free rows under one fair rule (and the paper's); one table.

``run_fidelity(FidelitySettings(...))`` (CLI: ``mfllm bench fidelity``); docs/results.md. Modules:
:mod:`.rows` (the row mini-language), :mod:`.settings` (the settings model and its command),
:mod:`.run` (simulating the replicas, resumable), :mod:`.controls` (the mean-field diagnostics'
interventions), :mod:`.label_rows` (the LLM-free rows; ``mf-oracle`` runs :mod:`mfllm.labels.reader`),
:mod:`.aggregate` and :mod:`.stats` (tables, relative KL, paired bootstrap), :mod:`.cost`, :mod:`.report` (results.md),
:mod:`.bench` (the whole bench).

The names below are loaded on first use, so that the CLI can read the settings model's defaults
without importing the simulator.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "KIND": "bench", "SCHEMA": "bench", "run_fidelity": "bench", "select_events": "bench",
    "TABLE_METRICS": "report", "render_markdown": "report",
    "BASELINES": "rows", "BUILTIN": "rows", "SAMPLED_ROWS": "rows", "MethodSpec": "rows",
    "parse_methods": "rows", "parse_variant": "rows",
    "check_run_config": "run", "sim_config": "run",
    "FidelitySettings": "settings",
    "compare_pair": "stats", "relative_kl": "stats",
}
HORIZONS = ("short", "mid", "long")

__all__ = ["HORIZONS", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"mfllm.bench.fidelity.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
