"""Feedback on long work: what `simulate` counts and says, --quiet, early refusals, the hf options, the
loaders' progress, dropped actions in the run's metadata, and the `bench model` / `train mini` phases."""

from __future__ import annotations

import json
from contextlib import contextmanager

from conftest import REPO, assert_clean_failure, cli_inproc

from mfllm.paths import SAMPLE_DATA
from mfllm.simulation import runner
from mfllm.simulation.engine import SimConfig
from mfllm.store.run import STEPS, read_steps

CLOCK = REPO / "tests" / "fixtures" / "data" / "ced_clock"  # one real event with a repost dated before its source
ARGS = ["--limit", "1", "--step-size", "4", "--warmup", "8", "--max-agents", "8", "--seed", "3"]


def test_bar_and_summary_count_the_simulated_agents_of_the_whole_run(cli, tmp_path):
    """8 warm-up + 8 simulated actions: the bar and the summary both say 8 (simulated agents), also after
    a resume; without --quiet the model-loading bar shows, with --quiet nothing does."""
    run = tmp_path / "run"
    res = cli.run("simulate", *ARGS, "--out", run)
    assert res.returncode == 0, res.stderr
    assert "8/8 simulated agents" in res.stdout and "8 agents simulated (rollout" in res.stderr
    assert "Loading weights" in res.stderr

    # resume after the first rollout step: the bar starts at 4/8, and the summary counts all 8
    keep = [r for r in read_steps(run)][:3]  # 2 warm-up steps + 1 rollout step
    lines = (run / STEPS).read_text(encoding="utf-8").splitlines(keepends=True)
    (run / STEPS).write_text("".join(lines[:len(keep)]), encoding="utf-8")
    (run / "done.json").unlink()
    res = cli.run("simulate", "--resume", run)
    assert res.returncode == 0, res.stderr
    assert "8/8 simulated agents" in res.stdout and "8 agents simulated" in res.stderr
    assert json.loads((run / "done.json").read_text(encoding="utf-8"))["agents_simulated"] == 8

    res = cli.run("simulate", *ARGS, "--out", tmp_path / "quiet", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "Loading weights" not in res.stderr and "simulated agents" not in res.stdout + res.stderr
    assert res.stderr.strip().startswith("done")


def test_an_existing_out_is_refused_before_data_or_model_load(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}", encoding="utf-8")

    def boom(*a, **k):
        raise AssertionError("loaded before the --out check")

    monkeypatch.setattr(runner, "make_backend", boom)
    monkeypatch.setattr(runner, "load_events", boom)
    assert_clean_failure(cli_inproc("simulate", *ARGS, "--out", run), "already holds a run", "--resume", "--force")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    assert_clean_failure(cli_inproc("simulate", *ARGS, "--out", tmp_path / "file"), "is a file")


def test_device_dtype_and_batch_size_reach_the_hf_backend(tmp_path):
    run = tmp_path / "run"
    res = cli_inproc("simulate", *ARGS, "--max-agents", "4", "--out", run, "--quiet",
                     "--device", "cpu", "--dtype", "float32", "--batch-size", "3")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert cfg["backend_options"] == {"device": "cpu", "dtype": "float32", "batch_size": 3}
    assert (cfg["backend"]["device"], cfg["backend"]["dtype"], cfg["backend"]["batch_size"]) == ("cpu", "float32", 3)
    assert_clean_failure(cli_inproc("simulate", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                                    "--device", "cpu", "--out", tmp_path / "x"), "--backend hf")


def test_loading_progress_and_dropped_actions_go_into_the_run(tmp_path):
    """The loaders' progress reaches the caller's bar; the actions the loader dropped (a repost dated 42 h
    before its source post) are counted in config.json, overall and per event."""
    calls: list[tuple[int, int]] = []

    @contextmanager
    def loading():
        yield lambda done, total: calls.append((done, total))

    out = tmp_path / "run"
    runner.simulate(str(CLOCK), str(out), config=SimConfig(step_size=4, warmup=8, max_rollout_agents=4),
                    progress=False, loading=loading)
    assert calls and calls[-1][0] == calls[-1][1] > 0
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert cfg["dropped_actions"] == {"total": {"time_before_source": 1},
                                      "events": {"3102_8MEuzn_1700757973": {"time_before_source": 1}}}


def test_bench_model_shows_each_phase(monkeypatch):
    from mfllm.bench import model_quality as mq

    seen: list[str] = []
    ends: list[tuple[float, float]] = []

    class Recording(mq._Phases):
        def phase(self, text):
            seen.append(text)
            super().phase(text)

        def close(self):
            super().close()
            t = self.bar.tasks[0]
            ends.append((t.completed, t.total))

    monkeypatch.setattr(mq, "_Phases", Recording)
    r = mq.model_report(str(REPO / "mfllm" / "assets" / "models" / "mfllm-mini"), str(SAMPLE_DATA), limit=2,
                        agents_per_event=3, progress=True)
    assert r["actions"] == 6
    assert seen[0] == "loading events" and seen[-1] == "generating 6 actions"
    assert sum("scoring 6 real actions" in s for s in seen) == 6 and sum("repost decision" in s for s in seen) == 3
    assert ends == [(len(seen) + 1, len(seen) + 1)]  # every phase (the model's load first) counted, ends full


def test_train_mini_ends_with_a_short_summary_not_raw_json():
    from mfllm.cli.train import mini_summary

    info = {"parameters": 5_300_000, "tokens_seen": 123456, "train_seconds": 61.2,
            "val": {"policy": {"nll_per_token": 3.0}}, "unigram_baseline": {"nll_per_token": 4.0}}
    text = mini_summary(info, "out/mini")
    assert "5.3M parameters" in text and "123,456 tokens" in text and "25% lower" in text
    assert "{" not in text and "training_info.json" in text


def test_simulate_help_lists_the_new_options():
    res = cli_inproc("simulate", "--help")
    for opt in ("--config", "--device", "--dtype", "--batch-size", "--quiet"):
        assert opt in res.stdout
    res = cli_inproc("export", "--help")
    for opt in ("--format", "--partial", "--no-labels"):
        assert opt in res.stdout


def test_intervene_bar_counts_simulated_agents_not_injected_posts(tmp_path, capsys):
    """`intervene` showed 976/960: its bar counted warm-up actions and injected posts against all actions."""
    from helpers.echo_backend import Echo

    from mfllm.data.load import load_events
    from mfllm.simulation.intervention_spec import build_interventions
    from mfllm.whatif.common import run_arm

    ev = load_events(str(SAMPLE_DATA), limit=1).events[0]
    ev.actions = ev.actions[:40]
    spec = [{"kind": "inject", "at_step": 3, "texts": ["等待真相"], "count": 5, "state": "用户：官方"}]
    cfg = SimConfig(step_size=4, warmup=8)
    arm = run_arm("intervene", [ev], cfg, Echo(), tmp_path / "arm", {}, build_interventions(spec), None, True)
    shown = capsys.readouterr().out
    assert "32/32 simulated agents" in shown, shown  # 40 actions - 8 warm-up; the 5 injected posts not counted
    assert arm.agents_simulated == 32


def test_quiet_hides_the_model_bar_for_that_command_only(tmp_path):
    """In one process (a notebook, these tests) --quiet must not switch the bars off for what runs next."""
    import os

    from transformers.utils import logging as tlog

    env, on = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"), tlog.is_progress_bar_enabled()
    res = cli_inproc("simulate", *ARGS, "--max-agents", "4", "--out", tmp_path / "r", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "Loading weights" not in res.stderr and "simulated agents" not in res.stdout
    assert (os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"), tlog.is_progress_bar_enabled()) == (env, on)
