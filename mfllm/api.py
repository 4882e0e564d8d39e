"""The Python API: simulate, evaluate and read runs from a script or a notebook (``import mfllm``).

    import mfllm
    run = mfllm.simulate("runs/demo", limit=1, max_agents=16)   # the shipped sample events and mfllm-decide
    metrics = mfllm.evaluate(run, plots=False, report=False)
    df = mfllm.load_run(run)                                  # pandas: one row per action, with its labels

:func:`simulate` takes the options of ``mfllm simulate`` (same names, with ``-`` written ``_``, same defaults)
and a run config file (``config=``, the fields of a run's config.json); it returns a :class:`Run`, which is
also a path (``os.fspath(run)``). Errors are :class:`mfllm.errors.MfllmError` (its subclasses) with the CLI's one-line message.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfllm.cli.simulate import build_request, simulate_command
from mfllm.errors import ConfigError, from_validation
from mfllm.labels import make_labeler
from mfllm.labels.dimensions import ALL_DIMENSIONS
from mfllm.simulation.config import SimConfig
from mfllm.simulation.runner import check_out
from mfllm.simulation.runner import resume as _resume
from mfllm.simulation.runner import simulate as _simulate
from mfllm.store.export import action_rows
from mfllm.store.replicas import replica_dirs
from mfllm.store.run import CONFIG, DONE
from mfllm.store.rundir import read_run_file

__all__ = ["Run", "SimConfig", "evaluate", "load_run", "resume", "simulate"]

# The CLI's options and their defaults (one source: `mfllm simulate`'s signature).
_CLI_DEFAULTS = {n: p.default.default for n, p in inspect.signature(simulate_command).parameters.items()
                 if hasattr(p.default, "default")}
_NOT_HERE = {"out", "config", "resume", "force", "quiet"}  # arguments of their own below


@dataclass(frozen=True)
class Run(os.PathLike):
    """A run directory (usable wherever a path is): its config, its summary, its actions."""

    path: Path

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> dict:
        return json.loads((self.path / CONFIG).read_text(encoding="utf-8"))

    @property
    def summary(self) -> dict | None:
        """done.json (None while the run is unfinished)."""
        p = self.path / DONE
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None

    def actions(self, **options: Any):
        """:func:`load_run` of this run."""
        return load_run(self, **options)

    def evaluate(self, **options: Any) -> dict:
        """:func:`evaluate` of this run."""
        return evaluate(self, **options)


def simulate(out: str | os.PathLike, *, config: str | os.PathLike | SimConfig | dict | None = None,
             force: bool = False, progress: bool = False, **options: Any) -> Run:
    """Run a simulation into ``out`` and return it. ``options``: those of ``mfllm simulate`` (``data``,
    ``events`` (a list or comma-separated), ``limit``, ``method``, ``step_size``, ``max_agents``, ``seed``,
    ``backend``, ``model``, ``device``, ``dtype``, ``batch_size``, ...) and any :class:`SimConfig` field.
    ``config``: a run config file (YAML/JSON with the fields of a run's config.json), a dict of those fields,
    or a SimConfig; ``options`` override it. ``force``: replace a run already in ``out``."""
    sim_extra = {k: options.pop(k) for k in list(options) if k in SimConfig.model_fields and k not in _CLI_DEFAULTS}
    unknown = sorted(set(options) - (set(_CLI_DEFAULTS) - _NOT_HERE))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; the options are those of `mfllm simulate` "
                          f"and SimConfig's fields", field=unknown[0])
    if isinstance(options.get("events"), list | tuple):
        options["events"] = ",".join(map(str, options["events"]))
    file = _config_file(config)
    check_out(out, force)
    try:
        req = build_request({**_CLI_DEFAULTS, **options}, set(options), file)
        if sim_extra:
            req.sim = SimConfig(**{**req.sim.model_dump(), **sim_extra})
    except ValueError as e:  # SimConfig's checks
        raise from_validation(e) from None
    _simulate(req.data, str(out), events=req.events, split=options.get("split", "all"),
              limit=options.get("limit"), config=req.sim, backend_name=req.backend, model=req.model,
              backend_options=req.backend_options, interventions=req.interventions,
              intervention_spec=req.intervention_spec, progress=progress, replace=force)
    return Run(Path(out))


def resume(run: str | os.PathLike, *, progress: bool = False) -> Run:
    """Continue an interrupted run (or redo the damaged steps of a finished one)."""
    _resume(os.fspath(run), progress=progress)
    return Run(Path(run))


def evaluate(run: str | os.PathLike | list, *, labeler: str = "rules", label_cache: str | os.PathLike | bool | None = None,
             **options: Any) -> dict:
    """Score a run (or a folder of replica runs, or a list of replica runs of one method) like
    ``mfllm evaluate``; returns metrics.json as a dict. ``label_cache``: None = the shared default file,
    False = none, else that file. ``options``: ``bin_by``, ``bin_size``, ``keywords_top_n``, ``marginal``,
    ``plots``, ``report``, ``max_event_plots``."""
    from mfllm.evaluation.evaluate import evaluate_run  # scipy: loaded when evaluating

    target = [os.fspath(r) for r in run] if isinstance(run, list) else os.fspath(run)
    return evaluate_run(target, labeler=labeler, cache=_cache(label_cache), **options)


def load_run(run: str | os.PathLike | list, *, labels: bool = True, label_cache: str | os.PathLike | bool | None = None,
             partial: bool = False):
    """A pandas DataFrame with one row per action of the run(s): the columns of ``mfllm export`` (run,
    method, replica, event_id, step, phase, agent_id, time, time_iso, real_text, sim_text, ...) and, with
    ``labels``, the 9 labels of each real and simulated text (rules labeler, through the label cache).
    A list of runs, or a folder of replica runs (r0/, r1/, ...), stacks into one table. A damaged
    steps.jsonl raises (naming the line) unless ``partial``."""
    import pandas as pd  # heavy: only for a table

    runs = [Path(os.fspath(r)) for r in run] if isinstance(run, list) else _runs_of(Path(os.fspath(run)))
    labeler = make_labeler("rules", cache=_cache(label_cache)) if labels else None
    try:
        rows = [r for d in runs for r in action_rows(d, labeler, ALL_DIMENSIONS if labels else (), partial)]
    finally:
        if labeler is not None and hasattr(labeler, "close"):
            labeler.close()
    return pd.DataFrame(rows)


def _runs_of(path: Path) -> list[Path]:
    if not (path / CONFIG).exists() and (reps := replica_dirs(path)):
        return reps
    return [path]


def _cache(label_cache: str | os.PathLike | bool | None) -> str | os.PathLike | None:
    if label_cache is False or label_cache == "":
        return ""
    return None if label_cache in (None, True) else label_cache


def _config_file(config: str | os.PathLike | SimConfig | dict | None) -> dict | None:
    if config is None:
        return None
    return read_run_file({"sim": config.model_dump()} if isinstance(config, SimConfig) else config, SimConfig)
