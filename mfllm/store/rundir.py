"""Reading and checking a run directory (config.json, steps.jsonl, done.json; layout in docs/architecture.md).

The one place that knows what a run's files may hold:
- :func:`load_run`: the whole run for evaluation (lenient: an incomplete run, or lines after a torn one,
  become warnings);
- :func:`check_resumable`: config.json as a resume needs it (one clear error for a damaged or hand-edited
  file);
- :func:`config_diffs`: what differs between a stored run and the settings a caller would run with;
- :func:`public_options`: the backend options that may be written to a run's files (never a secret).
The writing side is :mod:`mfllm.store.run`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mfllm.errors import ConfigError, DataError, from_validation
from mfllm.store.run import CONFIG, DONE, STEPS, find_damage, read_steps

M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- secrets


def public_options(options: dict | None) -> dict:
    """Backend options that may be written to a run's files (never one that can hold a secret)."""
    return {k: v for k, v in (options or {}).items() if not _secret_option(k)}


def _secret_option(name: str) -> bool:
    """Options that may hold a secret are never written. `api_key_env` / `api_key_file` hold only the
    variable's name / the file's path (a resume needs them to find the key again)."""
    n = name.lower()
    if n.endswith(("_env", "_file")):
        return False
    return any(w in n for w in ("key", "token", "secret", "password"))


# --------------------------------------------------------------------------- resume / continue


def check_resumable(cfg: Any, path: str, sim_model: type[M]) -> M:
    """A run's config.json as resume needs it; returns its ``sim`` section as ``sim_model`` (the simulation's
    config class, passed in because the store sits below the simulation layer)."""
    if not isinstance(cfg, dict):
        raise ConfigError("expected a JSON object", path=path)
    if "data" in cfg and cfg["data"] is None:
        raise ConfigError("this run's events were passed in memory (no data path): it cannot be resumed",
                          path=path, field="data")
    for key, types, what in (("sim", dict, "an object"), ("events", list, "a list of event ids"),
                             ("data", str, "the data path")):
        if not isinstance(cfg.get(key), types):
            raise ConfigError(f"missing or not {what}", path=path, field=key)
    if not all(isinstance(e, str) for e in cfg["events"]):
        raise ConfigError("expected a list of event ids", path=path, field="events")
    for key, types in (("backend_options", dict), ("backend_name", str), ("model", str)):
        if cfg.get(key) is not None and not isinstance(cfg[key], types):
            raise ConfigError(f"expected {'an object' if types is dict else 'a string'}", path=path, field=key)
    try:
        return sim_model(**cfg["sim"])
    except ValidationError as e:
        raise from_validation(e, path=path, prefix="sim.") from None


def config_diffs(cfg: Mapping, expected_sim: Mapping, events: list[str], interventions: Any,
                 sim_model: type[BaseModel], ignored: Iterable[str] = ()) -> list[str]:
    """How a stored run's config differs from the settings a caller would continue it with (empty: same).
    ``ignored``: sim fields that do not change results."""
    # A setting added after the run was made is absent from its config: it ran with that setting's default.
    stored = {k: f.default for k, f in sim_model.model_fields.items()} | (cfg.get("sim") or {})
    ignored = set(ignored)
    got = {k: v for k, v in stored.items() if k not in ignored}
    want = {k: v for k, v in expected_sim.items() if k not in ignored}
    diffs = [f"{k}: {got.get(k)!r} (stored) vs {want.get(k)!r}" for k in sorted(set(got) | set(want))
             if got.get(k) != want.get(k)]
    if cfg.get("events") != events:
        diffs.append(f"events: {len(cfg.get('events') or [])} stored vs {len(events)} selected")
    if cfg.get("interventions") != interventions:
        diffs.append(f"interventions: {cfg.get('interventions')!r} vs {interventions!r}")
    return diffs


# --------------------------------------------------------------------------- a run config file (simulate --config)

# A run config file (YAML or JSON) has the fields of a run's config.json, so a run's own config.json re-runs it.
RUN_FILE_FIELDS = ("data", "events", "sim", "backend_name", "backend_options", "model", "interventions")
_WRITTEN_ONLY = ("backend", "dropped_actions")  # what a run records about itself: accepted and ignored
_RUN_FILE_TYPES = {"data": (str,), "events": (list,), "sim": (dict,), "backend_name": (str,),
                   "backend_options": (dict,), "model": (str,), "interventions": (dict, list)}


def read_run_file(path: str | os.PathLike | dict, sim_model: type[M]) -> dict:
    """A run config file (or the dict such a file holds) as a dict of its :data:`RUN_FILE_FIELDS` (absent
    ones left out); ``sim`` is checked against ``sim_model`` (the simulation's config class) but returned as
    given, so that options given on the command line can still override it field by field. One clear error
    names the file and the field."""
    if isinstance(path, dict):
        cfg, p = path, Path("config")
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror or e}", path=str(p)) from None
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML / JSON: {str(e).splitlines()[0]}", path=str(p)) from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError("expected a mapping of fields (those of a run's config.json)", path=str(p))
    for key, value in cfg.items():
        if key not in RUN_FILE_FIELDS + _WRITTEN_ONLY:
            raise ConfigError(f"unknown field; a run config has the fields of config.json: "
                              f"{', '.join(RUN_FILE_FIELDS)}", path=str(p), field=str(key))
        if key in _RUN_FILE_TYPES and value is not None and not isinstance(value, _RUN_FILE_TYPES[key]):
            kinds = " or ".join({"str": "a string", "list": "a list", "dict": "a mapping"}[t.__name__]
                                for t in _RUN_FILE_TYPES[key])
            raise ConfigError(f"expected {kinds} (got {value!r})", path=str(p), field=key)
    if cfg.get("events") is not None and not all(isinstance(e, str | int) for e in cfg["events"]):
        raise ConfigError("expected a list of event ids", path=str(p), field="events")
    sim = cfg.get("sim") or {}
    for key in sim:
        if key not in sim_model.model_fields:
            raise ConfigError(f"unknown field; choose from {', '.join(sim_model.model_fields)}", path=str(p),
                              field=f"sim.{key}")
    try:
        sim_model(**sim)
    except ValidationError as e:
        raise from_validation(e, path=str(p), prefix="sim.") from None
    out = {k: cfg[k] for k in RUN_FILE_FIELDS if cfg.get(k) is not None}
    if "events" in out:
        out["events"] = [str(e) for e in out["events"]]
    return out


# --------------------------------------------------------------------------- the whole run (evaluation)


def _read_steps(run_dir: Path, complete: bool) -> tuple[list[dict], int, str | None]:
    """(good step records via the store's reader, lines not used, warning or None).

    The store's reader verifies each line's sha and stops at the first bad line (nothing after a torn /
    corrupted line is trusted). Only a torn tail of an interrupted run (no done.json, no intact line after
    the bad one: a crash mid-write) is read with a warning; any other damage loses finished steps, so it is
    an error naming the line and the repair.
    """
    recs = read_steps(run_dir)
    damage = find_damage(run_dir)
    if damage is None:
        return recs, 0, None
    if complete or damage.intact_after:
        raise DataError(str(damage.path), damage.message())
    return recs, damage.after + 1, f"steps.jsonl {damage.message()}"


def method_of(config: dict, run_dir: Path) -> str:
    """The run's method name (config's sim.method; \"sim\" when none is recorded)."""
    nested = [
        (config.get(k) or {}).get("method") for k in ("sim", "simulation") if isinstance(config.get(k), dict)
    ]
    for cand in (config.get("method"), *nested):
        if isinstance(cand, dict):
            cand = cand.get("name")
        if isinstance(cand, str) and cand:
            return cand
    return "sim"


@dataclass(slots=True)
class RunData:
    run_dir: Path
    config: dict
    method: str
    complete: bool
    steps: dict[str, list[dict]]  # event_id -> step records, by step number
    dropped_lines: int = 0
    warnings: list[str] = field(default_factory=list)


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read a run directory (config.json, steps.jsonl, done.json). Raises DataError if unusable."""
    rd = Path(run_dir)
    if not rd.is_dir():
        raise DataError(str(rd), "run directory not found")
    if not (rd / STEPS).is_file():
        raise DataError(
            str(rd / STEPS), "no steps.jsonl: not a run directory (or nothing simulated yet)"
        )
    config: dict = {}
    if (rd / CONFIG).is_file():
        try:
            config = json.loads((rd / CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(str(rd / CONFIG), f"cannot read: {e}") from None
        if not isinstance(config, dict):
            raise DataError(str(rd / CONFIG), "expected a JSON object")
    complete = (rd / DONE).is_file()
    recs, bad, damaged = _read_steps(rd, complete)
    warnings: list[str] = [damaged] if damaged else []
    by_event: dict[str, dict[int, dict]] = {}
    dup = 0
    for i, r in enumerate(recs):
        for key in ("event_id", "step", "phase", "actions"):
            if key not in r:
                raise DataError(str(rd / STEPS), f"step record {i} has no {key!r}", field=key)
        steps = by_event.setdefault(str(r["event_id"]), {})
        if int(r["step"]) in steps:
            dup += 1
        steps[int(r["step"])] = r  # the last record of a step wins
    if dup:
        warnings.append(f"{dup} duplicate step record(s) in steps.jsonl; the last of each was used")
    if not by_event:
        raise DataError(str(rd / STEPS), "no valid step record")
    if not complete:
        warnings.append("run is incomplete (no done.json): metrics cover the steps written so far")
    return RunData(
        run_dir=rd,
        config=config,
        method=method_of(config, rd),
        complete=complete,
        steps={e: [s[k] for k in sorted(s)] for e, s in by_event.items()},
        dropped_lines=bad,
        warnings=warnings,
    )
