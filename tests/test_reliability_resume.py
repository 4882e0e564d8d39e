"""Crash safety: kill a real `mfllm simulate` / `mfllm train mini` / `mfllm bench fidelity` (SIGKILL, torn
writes, Ctrl-C) and resume it; the finished run equals an uninterrupted one, nothing lost or duplicated.

Default: one chain with 3 interruptions (SIGKILL mid-run, a torn last line, Ctrl-C) + the trainer.
``--runslow``: a loop over random kill points (MFLLM_KILL_POINTS, default 25; MFLLM_KILL_SEED) and the
bench (its in-process resume is covered by tests/test_bench_fidelity.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import SIM_ARGS, assert_clean_failure, assert_same_run, load_records

from mfllm.errors import DataError
from mfllm.paths import SAMPLE_DATA
from mfllm.simulation.engine import SimConfig
from mfllm.store.export import export_actions
from mfllm.store.run import read_steps

STEPS = "steps.jsonl"


def n_lines(run: Path) -> int:
    p = run / STEPS
    return p.read_bytes().count(b"\n") if p.exists() else 0


def wait_lines(proc: subprocess.Popen, run: Path, n: int, timeout: float = 300) -> bool:
    """Poll until the run has >= n finished step lines; False if the process ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if n_lines(run) >= n:
            return True
        if proc.poll() is not None:
            return n_lines(run) >= n
        time.sleep(0.003)
    raise AssertionError(f"no progress in {timeout}s: {run}")


def sigkill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate(timeout=60)


def tear_last_line(run: Path, rng: random.Random) -> int:
    """A crash mid-write: cut the last line at a random byte (its newline included). Returns whole lines."""
    p = run / STEPS
    raw = p.read_bytes()
    lines = raw.splitlines(keepends=True)
    start = len(raw) - len(lines[-1])
    p.write_bytes(raw[: rng.randrange(start + 1, len(raw) - 1)])  # at least "}\n" is lost
    return len(lines) - 1


def append_garbage(run: Path, rng: random.Random) -> int:
    """A crash while a new line was being written: part of a record, no newline."""
    p = run / STEPS
    whole = n_lines(run)
    rec = '{"event_id": "x", "step": 99, "actions": [{"sim_text": "TORN-WRITE'
    with open(p, "ab") as f:
        f.write(rec.encode()[: rng.randrange(1, len(rec))])
    return whole


def flip_byte(run: Path, rng: random.Random) -> int:
    """A corrupted line in the middle (e.g. a bad sector): it and everything after it is redone."""
    p = run / STEPS
    raw = bytearray(p.read_bytes())
    lines = bytes(raw).splitlines(keepends=True)
    k = rng.randrange(len(lines))
    start = sum(len(x) for x in lines[:k])
    pos = start + rng.randrange(len(lines[k]) - 1)  # never the newline
    raw[pos] = ord("#") if raw[pos] != ord("#") else ord("%")
    p.write_bytes(bytes(raw))
    return k


def leading_good(run: Path) -> int:
    """Whole, valid lines at the start of steps.jsonl (what a reader may trust)."""
    from mfllm.store.run import decode_line

    n = 0
    for raw in (run / STEPS).read_bytes().splitlines(keepends=True):
        if not raw.endswith(b"\n") or decode_line(raw.decode("utf-8", "replace")) is None:
            break
        n += 1
    return n


def check_torn_is_not_data(run: Path, whole: int, tmp_path: Path) -> None:
    """`whole`: lines before the damage (fewer are readable if an earlier line is still corrupt, e.g. the
    last resume was killed before it repaired the file)."""
    assert len(read_steps(run)) == min(whole, leading_good(run))  # readers stop at the damage
    with pytest.raises(DataError, match="--resume"):  # never a silent partial export
        export_actions(run, tmp_path / "export.jsonl")
    n = export_actions(run, tmp_path / "export.jsonl", partial=True)
    assert n == sum(len(r["actions"]) for r in read_steps(run))
    assert "TORN-WRITE" not in (tmp_path / "export.jsonl").read_text(encoding="utf-8")


def test_kill_torn_write_and_ctrl_c_then_resume_equals_uninterrupted(cli, mini_reference, tmp_path):
    rng = random.Random(11)
    run = tmp_path / "run"

    # 1. SIGKILL in the middle of the run (after the 3rd step line: a round holds 2 events' steps, so this
    #    also leaves a half-written round)
    p = cli.start("simulate", *SIM_ARGS, "--out", run, "--quiet")
    assert wait_lines(p, run, 3)
    sigkill(p)
    assert not (run / "done.json").exists()
    killed_at = n_lines(run)
    assert 3 <= killed_at < 16

    # 2. a torn write: the last line cut at a random byte; it is never read as data
    whole = tear_last_line(run, rng)
    check_torn_is_not_data(run, whole, tmp_path)

    # 3. resume, then Ctrl-C: it stops at a step boundary, says how to resume, exit code 130
    p = cli.start("simulate", "--resume", run, "--quiet")
    assert wait_lines(p, run, whole + 1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert f"mfllm simulate --resume {run}" in " ".join(err.split())
    assert not (run / "done.json").exists()
    raw = (run / STEPS).read_bytes()
    assert raw.endswith(b"\n") and len(read_steps(run)) == raw.count(b"\n") < 16  # whole steps only

    # 4. resume to the end: equal to the uninterrupted run, step by step
    res = cli.run("simulate", "--resume", run, "--quiet")
    assert res.returncode == 0, res.stderr
    assert_same_run(run, mini_reference)

    # a finished run is not resumed again
    assert_clean_failure(cli.run("simulate", "--resume", run, "--quiet"), "already complete")


def test_kill_before_the_first_step_restarts_cleanly(cli, tmp_path):
    """Killed while loading the model: no run directory (or one with only config.json), never done.json;
    `--resume` of a folder that is no run says so in one line."""
    run = tmp_path / "run"
    p = cli.start("simulate", *SIM_ARGS, "--out", run, "--quiet")
    time.sleep(0.5)
    sigkill(p)
    assert not (run / "done.json").exists()
    if not (run / "config.json").exists():
        assert_clean_failure(cli.run("simulate", "--resume", run, "--quiet"), "not a run directory")


@pytest.mark.slow
def test_random_kill_points_loop(cli, mini_reference, tmp_path):
    """Many random interruptions (SIGKILL at a random step or time, Ctrl-C, torn / garbage / corrupted
    lines); every chain is resumed to the end and must equal the uninterrupted run."""
    rng = random.Random(int(os.environ.get("MFLLM_KILL_SEED", "2024")))
    target = int(os.environ.get("MFLLM_KILL_POINTS", "25"))
    stats: Counter = Counter()
    chain = 0
    while stats["interruptions"] < target:
        run = tmp_path / f"run{chain}"
        chain += 1
        stats["runs"] += 1
        while not (run / "done.json").exists():
            fresh = not (run / "config.json").exists()
            args = ("simulate", *SIM_ARGS, "--out", run, "--quiet") if fresh else ("simulate", "--resume", run,
                                                                                   "--quiet")
            if fresh and run.exists():
                shutil.rmtree(run)  # killed before config.json: start again
            before = n_lines(run)
            action = rng.choice(["kill_step", "kill_step", "kill_time", "sigint", "finish"])
            if stats["interruptions"] >= target:
                action = "finish"
            p = cli.start(*args)
            if action == "finish":
                _, err = p.communicate(timeout=600)
                assert p.returncode == 0, err
                stats["resumes_to_end"] += 0 if fresh else 1
                break
            if action == "kill_time":
                deadline = time.monotonic() + rng.uniform(0.5, 30)
                while time.monotonic() < deadline and p.poll() is None:
                    time.sleep(0.01)
                sigkill(p)
            elif action == "kill_step":
                wait_lines(p, run, before + rng.randint(0, 5))
                sigkill(p)
            else:
                wait_lines(p, run, before + rng.randint(1, 4))
                p.send_signal(signal.SIGINT)
                _, err = p.communicate(timeout=300)
                assert p.returncode in (130, 0), err
                assert "Traceback" not in err
                if p.returncode == 0:
                    stats["finished_before_signal"] += 1
                    break
                assert "--resume" in err
            if (run / "done.json").exists():
                stats["finished_before_signal"] += 1
                break
            stats["interruptions"] += 1
            stats[action] += 1
            if n_lines(run) and action != "sigint":
                tear = rng.choice(["none", "torn", "garbage", "corrupt"])
                stats[f"tear_{tear}"] += 1
                if tear == "torn":
                    check_torn_is_not_data(run, tear_last_line(run, rng), tmp_path)
                elif tear == "garbage":
                    check_torn_is_not_data(run, append_garbage(run, rng), tmp_path)
                elif tear == "corrupt":
                    check_torn_is_not_data(run, flip_byte(run, rng), tmp_path)
        assert_same_run(run, mini_reference)
    print(f"\nkill/resume loop: {dict(stats)}")
    (Path(os.environ.get("MFLLM_KILL_REPORT", tmp_path / "kill_report.json"))).write_text(json.dumps(stats))


def test_resume_with_interventions_replays_triggers(tmp_path):
    """A one-shot `inject` triggered by time fired before the crash must not fire again after resume."""
    from mfllm.backends.base import BackendStats, Completion
    from mfllm.simulation.intervention_spec import build_interventions
    from mfllm.simulation.runner import resume, simulate

    class Echo:  # deterministic: the seed names the answer
        name = "echo"

        def __init__(self):
            self.stats = BackendStats()

        def generate(self, reqs):
            return [Completion(f"回复{r.seed % 997}", 1, 1) for r in reqs]

        def score(self, prompts, continuations):
            return [0.0] * len(prompts)

        def describe(self):
            return {"backend": "echo"}

    spec = {"interventions": [{"kind": "inject", "at_time": 600, "texts": ["官方辟谣"]},
                              {"kind": "meanfield", "at_step": 3, "signal": "警方通报"}]}
    cfg = SimConfig(step_size=2, warmup=2, max_rollout_agents=10)
    ref = tmp_path / "ref"
    simulate(str(SAMPLE_DATA), str(ref), limit=2, config=cfg, backend=Echo(), progress=False,
             interventions=build_interventions(spec), intervention_spec=spec)
    want = load_records(ref)
    injected = [k for k, r in want.items() if any(a.get("injected") for a in r["actions"])]
    assert injected
    for cut in range(1, len(want)):
        run = tmp_path / f"cut{cut}"
        shutil.copytree(ref, run)
        (run / "done.json").unlink()
        lines = (run / STEPS).read_bytes().splitlines(keepends=True)
        (run / STEPS).write_bytes(b"".join(lines[:cut]))
        resume(str(run), backend=Echo(), progress=False)  # interventions rebuilt from config.json
        assert load_records(run) == want, cut


# ------------------------------------------------------------------------------------------ training


def _train_data(path: Path) -> Path:
    """8 shipped events under new ids that fall in the train (6) and val (2) splits."""
    from mfllm.data.split import split_of

    need = {"train": 6, "val": 2}
    out, i = [], 0
    for line in (SAMPLE_DATA / "events.jsonl").read_text(encoding="utf-8").splitlines():
        if not any(need.values()):
            break
        ev = json.loads(line)
        while True:
            eid, i = f"{ev['event_id']}-r{i}", i + 1
            if need.get(split_of(eid), 0) > 0:
                need[split_of(eid)] -= 1
                ev["event_id"] = eid
                out.append(json.dumps(ev, ensure_ascii=False))
                break
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


TRAIN_ARGS = ["--steps", "260", "--hidden", "32", "--layers", "1", "--batch-size", "4",
              "--agents-per-event", "6", "--threads", "1", "--device", "cpu", "--seed", "5"]


def _train_in_process(data: Path, out: Path) -> Path:
    """`mfllm train mini --data DATA --out OUT TRAIN_ARGS`, in this process (the config the CLI builds)."""
    import torch

    from mfllm.training.mini import MiniConfig, train_mini

    cfg = MiniConfig(data=str(data), out=str(out), steps=260, seed=5, hidden=32, layers=1, heads=1,
                     intermediate=int(32 * 2.75) // 8 * 8, agents_per_event=6, threads=1, device="cpu",
                     batch_size=4)
    n = torch.get_num_threads()
    try:
        train_mini(cfg, progress=False)
    finally:
        torch.set_num_threads(n)
    return out


def _tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_train_mini_killed_then_rerun_continues_to_the_same_model(cli, tmp_path, monkeypatch):
    data = _train_data(tmp_path / "train.jsonl")
    out = tmp_path / "model"
    ckpt = out / "_work" / "checkpoint"
    p = cli.start("train", "mini", "--data", data, "--out", out, *TRAIN_ARGS)
    t0 = time.monotonic()
    while not (ckpt / "progress.json").exists():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 600
        time.sleep(0.01)
    sigkill(p)
    assert not (out / "training_info.json").exists()
    prog = json.loads((ckpt / "progress.json").read_text())
    assert 0 < prog["step"] < 260
    # mark the checkpoint's history (it only feeds the loss curve) to see that the rerun continues from it,
    # and put it where a kill between save_checkpoint's two renames leaves it
    prog["history"][0]["train_loss"] = 12345.0
    (ckpt / "progress.json").write_text(json.dumps(prog))
    os.replace(ckpt, ckpt.with_name("checkpoint.old"))

    _train_in_process(data, out)  # the rerun (the CLI's code path; in-process to spare a torch import)
    assert (out / "training_info.json").is_file() and not (out / "_work").exists()
    assert "12345.0" in (out / "loss_curve.csv").read_text().splitlines()[1]  # continued, not restarted

    from mfllm.training import mini

    evals = []
    real_evaluate = mini.evaluate
    monkeypatch.setattr(mini, "evaluate", lambda *a, **k: evals.append(1) or real_evaluate(*a, **k))
    ref = _train_in_process(data, tmp_path / "ref")  # uninterrupted
    assert len(evals) == 3  # steps 100, 200, 260: the last one is the final validation, not run a second time
    got, want = _tensors(out), _tensors(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].equal(want[k]), k
    curve = [ln.split(",")[1:] for ln in (out / "loss_curve.csv").read_text().splitlines()[2:]]
    assert curve == [ln.split(",")[1:] for ln in (ref / "loss_curve.csv").read_text().splitlines()[2:]]


# ------------------------------------------------------------------------------------------ bench fidelity


@pytest.mark.slow
@pytest.mark.skipif(not Path(__file__).with_name("test_bench_fidelity.py").exists(), reason="no bench yet")
def test_bench_fidelity_killed_then_rerun_equals_one_session(cli, tmp_path):
    """`mfllm bench fidelity` SIGKILLed mid-way and run again: the same runs and results as one session."""
    args = ["bench", "fidelity", "--limit", "1", "--methods", "mf,state", "--step-size", "2",
            "--warmup", "4", "--max-agents", "6", "--seed", "3", "--no-label-cache", "--quiet"]
    help_text = cli.run("bench", "fidelity", "--help").stdout
    if any(opt not in help_text for opt in ("--methods", "--max-agents", "--no-label-cache")):
        pytest.skip("bench fidelity options changed")
    a = tmp_path / "a"
    p = cli.start(*args, "--out", a)
    mf_steps = a / "runs" / "mf" / "r0" / STEPS
    t0 = time.monotonic()
    while not (mf_steps.exists() and mf_steps.read_bytes().count(b"\n") >= 2):
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 600
        time.sleep(0.005)
    sigkill(p)
    res = cli.run(*args, "--out", a)
    assert res.returncode == 0, res.stderr[-3000:]
    b = tmp_path / "b"
    res = cli.run(*args, "--out", b)
    assert res.returncode == 0, res.stderr[-3000:]
    for row in ("mf", "state"):
        for k in ("r0", "r1", "r2", "r3"):  # the default 4 replicas
            assert load_records(a / "runs" / row / k) == load_records(b / "runs" / row / k), (row, k)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["methods"] == rb["methods"]

