"""`mfllm export`: one row per action as JSONL, CSV or Parquet (or JSONL on stdout), with the 9 labels of each
text, run / method / replica columns and ISO times; clear errors for bad targets; a damaged steps.jsonl is
never exported (or evaluated) silently, and `--resume` repairs it even when the run had finished."""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from conftest import assert_clean_failure, cli_inproc, load_records

from mfllm.labels.dimensions import ALL_DIMENSIONS, DIMENSIONS
from mfllm.paths import SAMPLE_DATA
from mfllm.simulation.engine import SimConfig
from mfllm.simulation.runner import simulate
from mfllm.store.export import export_actions
from mfllm.store.run import STEPS, encode_record, find_damage, read_steps

CFG = SimConfig(step_size=4, warmup=8, max_rollout_agents=8, seed=3)
N = 16  # 8 warm-up + 8 simulated actions


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run of the shipped mfllm-mini on one sample event (4 steps)."""
    out = tmp_path_factory.mktemp("export") / "run"
    simulate(str(SAMPLE_DATA), str(out), limit=1, config=CFG, progress=False)
    return out


def _export(run: Path, to, *extra) -> subprocess.CompletedProcess:  # noqa: F821
    return cli_inproc("export", run, "--to", to, "--no-label-cache", *extra)


def test_each_format_holds_the_same_rows_with_labels_and_times(run, tmp_path):
    pd = pytest.importorskip("pandas")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        res = _export(run, tmp_path / name)
        assert res.returncode == 0, res.stderr
        assert f"wrote {N} actions" in res.stderr
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    stdout = _export(run, "-")
    assert stdout.returncode == 0 and [json.loads(x) for x in stdout.stdout.splitlines()] == rows

    assert len(rows) == N
    r = rows[-1]
    assert (r["run"], r["method"], r["replica"], r["phase"]) == (str(run), "mf", 0, "rollout")
    assert datetime.fromisoformat(r["time_iso"]).timestamp() == r["time"]
    for side in ("real", "sim"):  # 9 labels per text: 8 categories + the keyword list
        assert all(r[f"{side}_{d}"] in cats for d, cats in DIMENSIONS.items())
        assert isinstance(r[f"{side}_keywords"], list)
    assert rows[0]["phase"] == "warmup" and rows[0]["sim_text"] is None and rows[0]["sim_stance"] is None

    table = list(csv.DictReader(io.StringIO((tmp_path / "a.csv").read_text(encoding="utf-8"))))
    assert [t["action_id"] for t in table] == [x["action_id"] for x in rows]
    assert [t["real_stance"] for t in table] == [x["real_stance"] for x in rows]
    assert table[-1]["real_keywords"] == "|".join(rows[-1]["real_keywords"])

    df = pd.read_parquet(tmp_path / "a.parquet")
    assert len(df) == N and list(df["action_id"]) == [x["action_id"] for x in rows]
    assert list(df["sim_intent"].iloc[8:]) == [x["sim_intent"] for x in rows[8:]]
    assert list(df["real_keywords"].iloc[-1]) == rows[-1]["real_keywords"]
    assert {f"{s}_{d}" for s in ("real", "sim") for d in ALL_DIMENSIONS} <= set(df.columns)

    # --format wins over the suffix; --no-labels leaves the label columns out
    assert _export(run, tmp_path / "b.txt", "--format", "csv", "--no-labels").returncode == 0
    head = (tmp_path / "b.txt").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert "time_iso" in head and not any(c.startswith("real_") and c != "real_text" for c in head)


def test_labels_go_through_the_label_cache(run, tmp_path):
    cache = tmp_path / "labels.sqlite"
    res = cli_inproc("export", run, "--to", tmp_path / "a.jsonl", "--label-cache", cache)
    assert res.returncode == 0, res.stderr
    assert cache.is_file() and cache.stat().st_size > 0


def test_replicas_stack_with_their_run_method_and_replica(run, tmp_path):
    """A replica run (events E#rK) exports event_id E and replica K, so runs stack into one table."""
    rep = tmp_path / "r2"
    shutil.copytree(run, rep)
    recs = read_steps(rep)
    for rec in recs:
        rec["event_id"] += "#r2"
    (rep / STEPS).write_text("".join(encode_record(r) for r in recs), encoding="utf-8")
    n = export_actions(rep, tmp_path / "r2.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "r2.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == N and {(r["replica"], r["event_id"], r["run"]) for r in rows} == {
        (2, recs[0]["event_id"][:-3], str(rep))}


@pytest.mark.parametrize("target, words", [
    ("DIR", ("is a folder", "give a file name")),
    ("missing/sub/x.csv", ("does not exist",)),
    ("x.txt", ("cannot tell the format", "--format")),
])
def test_bad_targets_are_one_clear_error_and_leave_nothing(run, tmp_path, target, words):
    to = tmp_path if target == "DIR" else tmp_path / target
    before = sorted(tmp_path.rglob("*"))
    assert_clean_failure(_export(run, to), *words)
    assert sorted(tmp_path.rglob("*")) == before  # no temp file, no partial output
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp*"))
    assert_clean_failure(_export(run, tmp_path / "x.jsonl", "--format", "xml"), "unknown format")


# ------------------------------------------------------------------ a damaged steps.jsonl


def _damage_line(run: Path, k: int) -> None:
    """Flip one byte in the middle of line k (1-based): a bad sector, not a crash."""
    lines = (run / STEPS).read_bytes().splitlines(keepends=True)
    line = bytearray(lines[k - 1])
    line[len(line) // 2] = ord("#") if line[len(line) // 2] != ord("#") else ord("%")
    lines[k - 1] = bytes(line)
    (run / STEPS).write_bytes(b"".join(lines))


def test_damaged_steps_are_named_never_exported_silently_and_resume_redoes_them(run, tmp_path):
    reference = load_records(run)
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    _damage_line(bad, 2)
    assert (d := find_damage(bad)) is not None and (d.line, d.after, d.intact_after) == (2, 2, 2)

    # export: refused (exit 2), naming the line, what is ignored and the repair; nothing written
    line = assert_clean_failure(_export(bad, tmp_path / "a.jsonl"), "line 2", "2 step line(s) after it",
                                f"mfllm simulate --resume {bad}", "--partial")
    assert "nothing exported" in line and not (tmp_path / "a.jsonl").exists()
    # --partial: the intact part, with the same warning
    res = _export(bad, tmp_path / "a.jsonl", "--partial")
    assert res.returncode == 0 and "warning:" in res.stderr and "line 2" in res.stderr
    assert res.stderr.count("\n") >= 2 and "wrote 4 actions" in res.stderr

    # evaluate: the same error, not "nothing to evaluate"
    assert_clean_failure(cli_inproc("evaluate", bad, "--no-label-cache", "--no-plots", "--no-report"),
                         "line 2", "--resume")

    # resume, although done.json exists: the damaged line and all after it are redone, equal to the original
    assert (bad / "done.json").exists()
    res = cli_inproc("simulate", "--resume", bad, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "line 2" in res.stderr and "redo" in res.stderr
    assert find_damage(bad) is None and (bad / "done.json").exists()
    assert load_records(bad) == reference
    assert_clean_failure(cli_inproc("simulate", "--resume", bad, "--quiet"), "already complete")


def test_a_torn_tail_of_an_interrupted_run_is_read_with_a_warning(run, tmp_path):
    """A crash mid-write (no done.json, nothing intact after the torn line) is what --resume exists for:
    evaluate reads the finished steps and warns; export still needs --partial."""
    from mfllm.store.rundir import load_run

    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut / "done.json").unlink()
    raw = (cut / STEPS).read_bytes()
    (cut / STEPS).write_bytes(raw[:-20])
    rd = load_run(cut)
    assert rd.dropped_lines == 1 and any("line 4" in w and "--resume" in w for w in rd.warnings)
    assert_clean_failure(_export(cut, tmp_path / "a.csv"), "line 4", "0 step line(s) after it")
    assert _export(cut, tmp_path / "a.csv", "--partial").returncode == 0
