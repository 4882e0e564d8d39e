"""`mfllm data stats` / `events` / `convert` through typer's CliRunner."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from mfllm.cli.data import data_app
from mfllm.data.load import load_events
from mfllm.evaluation.domains import DOMAINS

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


def test_help_lists_events():
    r = runner.invoke(data_app, ["events", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--split" in r.output and "json" in r.output


def test_stats_keeps_an_event_with_an_impossible_timestamp():
    """The issue's case, through the command: a real event with a repost dated 42.3 hours before its
    source post is kept (20 of its 21 actions), the row is counted and named once, and the exit code is 0."""
    r = runner.invoke(data_app, ["stats", str(FIX / "ced_clock")])
    assert r.exit_code == 0, r.output
    all_row = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("all"))
    assert all_row.split()[1:3] == ["1", "20"] and all_row.split()[-1] == "1"  # events, actions, dropped
    assert "dropped  time_before_source 1" in r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if "3102_8MEuzn_1700757973.json" in ln]
    assert len(warnings) == 1 and "42.3 hours before the source post (post 2, mid 9spkMP)" in warnings[0]
    assert "1 faulty action row(s) dropped in 1 file(s)" in r.stderr and "skipped" not in r.stderr


def test_stats_dropped_rows_and_an_unreadable_file(tmp_path):
    """Dropped rows alone exit 0; a file that cannot be read is still skipped, named, and exits 1."""
    root = tmp_path / "ced"
    shutil.copytree(FIX / "ced", root)
    shutil.copytree(FIX / "ced_clock", root, dirs_exist_ok=True)
    bad = root / "rumor-repost" / "998_ADyGmCvG0_2373589030.json"
    bad.write_text('[{"mid": ', "utf-8")
    r = runner.invoke(data_app, ["stats", str(root), "--quiet"])
    assert r.exit_code == 1
    assert "1 file(s) skipped" in r.stderr and str(bad) in r.stderr and "truncated" in r.stderr
    assert "dropped in 1 file(s)" in r.stderr and "Traceback" not in r.output
    all_row = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("all"))
    assert all_row.split()[1] == "3"  # 4 events in the folder, 1 unreadable


def _events(*args):
    r = runner.invoke(data_app, ["events", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r


def test_events_table_json_csv(tmp_path):
    r = _events(FIX / "ced")
    for eid in ("4232_z3eqPvYtc_2123247457", "4794_AuLitvtRd_1677875323", "998_ADyGmCvG0_2373589030"):
        assert eid in r.stdout
    assert "3 events" in r.stdout and "non-rumor" in r.stdout
    rows = json.loads(_events(FIX / "ced", "--format", "json").stdout)
    by_id = {x["event_id"]: x for x in rows}
    assert [x["event_id"] for x in rows] == sorted(by_id)  # the loader's order: by event id
    e = by_id["998_ADyGmCvG0_2373589030"]
    ev = next(x for x in load_events(FIX / "ced").events if x.event_id == e["event_id"])
    assert e["label"] == "rumor" and e["actions"] == len(ev.actions) == 94 and e["split"] == "train"
    assert e["span_hours"] == round((ev.actions[-1].time - ev.actions[0].time) / 3600, 1) == 72.1
    assert e["domain"] in DOMAINS and e["dropped"] == 0 and e["source_text"] == ev.source.text
    text = _events(FIX / "ced", "--format", "csv").stdout
    got = list(csv.DictReader(io.StringIO(text)))
    assert [x["event_id"] for x in got] == [x["event_id"] for x in rows]
    assert list(got[0]) == ["event_id", "label", "split", "actions", "span_hours", "domain", "dropped", "source_text"]
    assert got[2]["actions"] == "94" and got[2]["span_hours"] == "72.1"


def test_events_out_file_split_and_dropped(tmp_path):
    out = tmp_path / "sub" / "events.csv"
    r = _events(FIX / "ced_clock", "--out", out)  # the format from the suffix
    assert r.stdout == "" and f"wrote 1 events to {out}" in r.stderr
    (row,) = list(csv.DictReader(out.open(encoding="utf-8")))
    assert row["event_id"] == "3102_8MEuzn_1700757973" and row["actions"] == "20" and row["dropped"] == "1"
    assert row["source_text"] == "《国家形象》8"
    r = _events(FIX / "ced", "--split", "test", "--format", "json")
    assert json.loads(r.stdout) == []


def test_events_user_mistakes(tmp_path):
    for args, words in [
        (["--format", "xml"], "unknown output format"),
        (["--out", str(tmp_path / "x.txt")], "--out writes json or csv"),
        (["--out", str(tmp_path), "--format", "csv"], "is a folder"),
        (["--split", "dev"], "unknown split"),
    ]:
        r = runner.invoke(data_app, ["events", str(FIX / "ced"), *args])
        assert r.exit_code == 2 and words in r.stderr and r.stderr.startswith("error:"), r.output
    r = runner.invoke(data_app, ["events", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such file" in r.stderr


def test_progress_callback_counts_files():
    calls = []
    res = load_events(FIX / "ced", progress=lambda done, total: calls.append((done, total)))
    assert len(res.events) == 3
    assert calls[0] == (0, 3) and calls[-1] == (3, 3) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    load_events(FIX / "ced", limit=1, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 1), (1, 1)]


def test_progress_bar_on_a_terminal_and_quiet(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat the captured stderr as a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.delenv("TERM", raising=False)
    r = runner.invoke(data_app, ["stats", str(FIX / "ced")])
    assert r.exit_code == 0 and "loading events" in r.stderr and "3/3" in r.stderr
    r = runner.invoke(data_app, ["stats", str(FIX / "ced"), "--quiet"])
    assert r.exit_code == 0 and "loading events" not in r.stderr
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    r = runner.invoke(data_app, ["events", str(FIX / "ced"), "--format", "json"])
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)


def test_stats_impossible_timestamp_as_a_real_process(cli):
    """The same through a real `mfllm` process (the issue's done-when): exit 0, the event kept."""
    res = cli.run("data", "stats", FIX / "ced_clock", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "error:" not in res.stderr
    assert "dropped  time_before_source 1" in res.stdout and "42.3 hours before the source post" in res.stderr


def test_convert_keeps_the_event_without_the_bad_row(tmp_path):
    out = tmp_path / "clock.jsonl"
    r = runner.invoke(data_app, ["convert", str(FIX / "ced_clock"), "--to", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote 1 events (20 actions)" in r.stdout and "dropped in 1 file(s)" in r.stderr
    (ev,) = load_events(out).events
    assert len(ev.actions) == 20 and ev.dropped is None  # the file holds only the kept rows
    assert "9spkMP" not in {a.action_id for a in ev.actions}
