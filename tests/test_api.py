"""The Python API (`mfllm.simulate / evaluate / load_run`), run config files (`mfllm simulate --config`) and
the example script examples/python_api.py (run here, so it runs in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_failure, cli_env, cli_inproc, load_records

import mfllm
from mfllm.errors import ConfigError
from mfllm.labels.dimensions import DIMENSIONS

SMALL = {"limit": 1, "step_size": 4, "warmup": 8, "max_agents": 8, "seed": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return mfllm.simulate(tmp_path_factory.mktemp("api") / "run", **SMALL)


def test_import_mfllm_is_light_and_exports_the_api():
    code = ("import sys, mfllm; assert 'torch' not in sys.modules and 'pandas' not in sys.modules, 'heavy'; "
            "from mfllm import simulate, evaluate, load_run, SimConfig, Run; print(sorted(mfllm.__all__))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert "load_run" in res.stdout and "simulate" in res.stdout
    with pytest.raises(AttributeError):
        mfllm.no_such_thing  # noqa: B018


def test_simulate_returns_a_run_with_the_cli_options(run):
    assert isinstance(run, mfllm.Run) and Path(run).is_dir()
    cfg = run.config
    assert cfg["sim"]["max_rollout_agents"] == 8 and cfg["sim"]["seed"] == 3 and cfg["backend_name"] == "hf"
    assert run.summary["agents_simulated"] == 8
    assert cfg["dropped_actions"] == {"total": {}, "events": {}}  # the loader dropped nothing here
    with pytest.raises(ConfigError, match="already holds a run"):  # refused before anything loads
        mfllm.simulate(run, **SMALL)
    with pytest.raises(ConfigError, match="unknown option 'stepsize'"):
        mfllm.simulate(Path(run).parent / "x", stepsize=3)
    with pytest.raises(ConfigError, match="unknown value 'bogus'"):
        mfllm.simulate(Path(run).parent / "x", method="bogus")
    with pytest.raises(ValueError):
        mfllm.SimConfig(method="bogus")
    assert not (Path(run).parent / "x").exists()


def test_load_run_is_a_dataframe_of_actions_with_labels(run, tmp_path):
    df = mfllm.load_run(run, label_cache=tmp_path / "labels.sqlite")
    assert len(df) == 16 and list(df.phase).count("rollout") == 8
    assert {"run", "method", "replica", "event_id", "time", "time_iso", "real_text", "sim_text"} <= set(df.columns)
    rollout = df[df.phase == "rollout"]
    for d, cats in DIMENSIONS.items():
        assert set(rollout[f"sim_{d}"]) <= set(cats) and set(df[f"real_{d}"]) <= set(cats)
    both = mfllm.load_run([run, run], labels=False)  # runs stack into one table
    assert len(both) == 32 and "real_stance" not in both.columns


def test_evaluate_returns_the_metrics(run, tmp_path):
    m = mfllm.evaluate(run, plots=False, report=False, label_cache=False)
    assert m["method"] == "mf" and m["n_events"] == 1
    assert json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))["method"] == "mf"
    assert run.evaluate(plots=False, report=False, label_cache=False)["summary"] == m["summary"]


def test_a_runs_config_json_is_a_config_file_that_reruns_it(run, tmp_path):
    """`--config RUN/config.json` makes the same run (the same seeds give the same steps); options given
    on the command line override the file, field by field."""
    again = tmp_path / "again"
    res = cli_inproc("simulate", "--config", Path(run) / "config.json", "--out", again, "--quiet")
    assert res.returncode == 0, res.stderr
    assert load_records(again) == load_records(run)

    yaml = tmp_path / "run.yaml"
    yaml.write_text("sim:\n  method: recent\n  step_size: 4\n  warmup: 8\n  max_rollout_agents: 4\n"
                    "  seed: 5\nevents: [" + run.config["events"][0] + "]\n", encoding="utf-8")
    res = cli_inproc("simulate", "--config", yaml, "--out", tmp_path / "over", "--seed", "9", "--quiet")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "over" / "config.json").read_text(encoding="utf-8"))
    assert (cfg["sim"]["method"], cfg["sim"]["seed"], cfg["sim"]["max_rollout_agents"]) == ("recent", 9, 4)
    assert cfg["events"] == run.config["events"]

    # the API reads the same files
    api = mfllm.simulate(tmp_path / "api", config=yaml, seed=9)
    assert load_records(api) == load_records(tmp_path / "over")


@pytest.mark.parametrize("text, words", [
    ("foo: 1\n", ("run.yaml", "field 'foo'", "unknown field", "sim, backend_name")),
    ("sim:\n  methd: mf\n", ("run.yaml", "field 'sim.methd'", "unknown field")),
    ("sim:\n  method: bogus\n", ("run.yaml", "field 'sim.method'", "unknown value 'bogus'")),
    ("events: 3\n", ("run.yaml", "field 'events'", "expected a list")),
    ("sim: [\n", ("run.yaml", "not valid YAML")),
])
def test_a_bad_config_file_is_one_clear_error_naming_file_and_field(tmp_path, text, words):
    (tmp_path / "run.yaml").write_text(text, encoding="utf-8")
    assert_clean_failure(cli_inproc("simulate", "--config", tmp_path / "run.yaml", "--out", tmp_path / "r"), *words)
    assert not (tmp_path / "r").exists()


def test_the_example_script_runs(tmp_path):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(REPO / "examples" / "python_api.py"), str(tmp_path)],
                         capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300)
    seconds = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert "16 agents simulated" in res.stdout and "real_stance" in res.stdout and "JS divergence" in res.stdout
    assert seconds < 120, seconds  # about 15 s on 2 busy CPU cores
