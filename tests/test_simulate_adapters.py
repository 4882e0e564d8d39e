"""`mfllm simulate` with IB-Tune adapters: the roles reach the backend, are stored for --resume, and change
what agents write."""

from __future__ import annotations

import json

from conftest import cli_inproc
from helpers.tiny_model import make_tiny_lora, tiny_model_dir  # noqa: F401 - pytest fixture

from mfllm.store.run import read_steps


def _sim_texts(run) -> list[str]:
    return [a["sim_text"] for r in read_steps(run) for a in r["actions"] if a["sim_text"] is not None]


def _mf_texts(run) -> list[str]:
    return [r["meanfield"] for r in read_steps(run)]


def test_simulate_with_adapters_stores_them_and_changes_outputs(tmp_path, tiny_model_dir):  # noqa: F811
    pol = make_tiny_lora(tiny_model_dir, tmp_path / "policy", seed=1)
    mfa = make_tiny_lora(tiny_model_dir, tmp_path / "meanfield", seed=2)
    common = ("simulate", "--limit", "1", "--max-agents", "8", "--step-size", "8", "--warmup", "8",
              "--meanfield", "llm", "--meanfield-max-new-tokens", "12", "--max-new-tokens", "8",
              "--model", tiny_model_dir, "--quiet")
    base = cli_inproc(*common, "--out", tmp_path / "base")
    assert base.returncode == 0, base.stderr
    tuned = cli_inproc(*common, "--policy-adapter", pol, "--meanfield-adapter", mfa, "--out", tmp_path / "tuned")
    assert tuned.returncode == 0, tuned.stderr

    cfg = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert cfg["sim"]["policy_adapter"] == "policy" and cfg["sim"]["meanfield_adapter"] == "meanfield"
    assert cfg["sim"]["meanfield_max_new_tokens"] == 12
    assert cfg["backend_options"]["adapters"] == {"policy": str(pol.resolve()), "meanfield": str(mfa.resolve())}
    assert _sim_texts(tmp_path / "base") != _sim_texts(tmp_path / "tuned")
    assert _mf_texts(tmp_path / "base") != _mf_texts(tmp_path / "tuned")


def test_meanfield_budget_bounds_the_summary(tmp_path, tiny_model_dir):  # noqa: F811
    first = {}
    for n in (3, 40):
        res = cli_inproc("simulate", "--limit", "1", "--max-agents", "8", "--step-size", "8", "--warmup", "8",
                         "--meanfield", "llm", "--meanfield-max-new-tokens", n, "--model", tiny_model_dir,
                         "--out", tmp_path / f"run{n}", "--quiet")
        assert res.returncode == 0, res.stderr
        first[n] = _mf_texts(tmp_path / f"run{n}")[0]
    # same prompt and seed at step 0: per-token seeds make the short summary the long one's first tokens
    assert first[40].startswith(first[3]) and len(first[3]) < len(first[40])


def test_a_run_that_outgrows_minis_context_finishes_and_says_so(tmp_path):
    """mfllm-mini (320 tokens) with the llm mean field at the default step size and summary budget: the
    budgets are cut to fit and the summariser's prompts shortened instead of the run failing mid-way."""
    res = cli_inproc("simulate", "--limit", "1", "--max-agents", "16", "--meanfield", "llm",
                     "--out", tmp_path / "run", "--quiet")
    assert res.returncode == 0, res.stderr
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["backend_stats"]["budget_capped"] > 0
    assert "the model's context was too short" in res.stderr
    res = cli_inproc("simulate", "--limit", "1", "--max-agents", "16", "--out", tmp_path / "stats", "--quiet")
    assert res.returncode == 0 and "context was too short" not in res.stderr
