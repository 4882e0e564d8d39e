"""`mfllm data stats` / `convert` through typer's CliRunner."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from mfllm.cli.data import data_app
from mfllm.data.load import load_events

FIX = Path(__file__).parent / "fixtures" / "data"
runner = CliRunner()


def test_help_teaches():
    r = runner.invoke(data_app, ["--help"])
    assert r.exit_code == 0 and "stats" in r.output and "convert" in r.output
    for cmd in ("stats", "convert"):
        r = runner.invoke(data_app, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output and "--split" in r.output


def test_stats_fixture():
    r = runner.invoke(data_app, ["stats", str(FIX / "ced")])
    assert r.exit_code == 0, r.output
    assert "233" in r.output and "all" in r.output and "train" in r.output
    assert "rumor 1" in r.output and "non-rumor 2" in r.output
    r = runner.invoke(data_app, ["stats", str(FIX / "ced"), "--split", "test"])
    assert r.exit_code == 0 and "train" not in r.output


def test_stats_reports_skipped_files(tmp_path):
    root = tmp_path / "ced"
    shutil.copytree(FIX / "ced", root)
    bad = root / "non-rumor-repost" / "4232_z3eqPvYtc_2123247457.json"
    bad.write_text("[{", "utf-8")
    r = runner.invoke(data_app, ["stats", str(root)])
    assert r.exit_code == 1
    assert "1 file(s) skipped" in r.output and str(bad) in r.output
    assert "Traceback" not in r.output


def test_user_mistakes_one_line_no_traceback(tmp_path):
    r = runner.invoke(data_app, ["stats", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such file" in r.output and "Traceback" not in r.output
    r = runner.invoke(data_app, ["stats", str(FIX / "ced"), "--split", "dev"])
    assert r.exit_code == 2 and "unknown split" in r.output
    r = runner.invoke(data_app, ["convert", str(FIX / "ced"), "--to", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and ".jsonl" in r.output


def test_convert_then_stats(tmp_path):
    out = tmp_path / "out.jsonl"
    r = runner.invoke(data_app, ["convert", str(FIX / "ced"), "--to", str(out), "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert "wrote 2 events" in r.output
    res = load_events(out)
    assert len(res.events) == 2 and res.skipped == []
    r = runner.invoke(data_app, ["stats", str(out)])
    assert r.exit_code == 0 and "2" in r.output
