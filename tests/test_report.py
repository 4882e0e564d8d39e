"""report.html for a reader who is not a statistician: each event's source post and rumor label, n beside
every mean and no interval below n = 3, a glossary of the metrics; on a real run of the shipped model."""

from __future__ import annotations

import html
import json
import re
import shutil

import numpy as np
import pytest

from mfllm.data.load import load_events
from mfllm.evaluation import report as R
from mfllm.evaluation.evaluate import evaluate
from mfllm.evaluation.metrics import METRICS, summarize
from mfllm.evaluation.plots import write_plots
from mfllm.paths import SAMPLE_DATA
from mfllm.simulation.engine import SimConfig
from mfllm.simulation.runner import simulate

N_EVENTS = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run of mfllm-mini on 3 shipped events (4 warm-up + 8 rollout agents, 2 per step)."""
    out = tmp_path_factory.mktemp("report") / "run"
    simulate(str(SAMPLE_DATA), str(out), limit=N_EVENTS,
             config=SimConfig(step_size=2, warmup=4, max_rollout_agents=8, seed=3), progress=False)
    return out


@pytest.fixture(scope="module")
def evaluated(run_dir):
    result = evaluate(run_dir, cache="")
    plots = write_plots(result, run_dir / "plots")
    return result, plots, R.render_report(result, plots)


def _copy_with_data(run_dir, tmp_path, data):
    """A copy of the run whose config.json names another data path (None: events passed in memory)."""
    rd = tmp_path / "moved"
    shutil.copytree(run_dir, rd)
    cfg = json.loads((rd / "config.json").read_text(encoding="utf-8"))
    cfg["data"] = data
    (rd / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return rd


def test_report_shows_each_source_post_and_its_label(evaluated):
    result, _, page = evaluated
    events = {ev.event_id: ev for ev in load_events(SAMPLE_DATA, event_ids=list(result.metrics["events"])).events}
    assert len(events) == N_EVENTS
    for eid, ev in events.items():
        section = page.split(f"id='ev-{eid}'", 1)[1].split("<h3", 1)[0]
        assert html.escape(ev.source.text, quote=True) in section
        assert f'class="tag {ev.label}">{ev.label}<' in section, ev.label
        assert f"event {eid} · {ev.label}</h3>" in page
    # the events table at the top: id linked to the section, label, the source post's start
    top = page.split("<h2>Events</h2>", 1)[1].split("<h2>", 1)[0]
    for eid, ev in events.items():
        row = top.split(f"<a href='#ev-{eid}'>{eid}</a>", 1)[1].split("</tr>", 1)[0]
        assert f">{ev.label}</span>" in row and html.escape(ev.source.text[:20], quote=True) in row
    assert "source post not available" not in page and "not available" not in top


@pytest.mark.parametrize("data", ["/nonexistent/ced", None])
def test_report_says_when_the_source_is_not_available(evaluated, run_dir, tmp_path, data):
    _, plots, _ = evaluated
    rd = _copy_with_data(run_dir, tmp_path, data)
    result = evaluate(rd, cache="")
    page = R.render_report(result, plots)  # the plots of the original run: same event ids
    assert page.count("source post not available") == N_EVENTS
    assert ("not on this machine" if data else "names no data path") in page
    top = page.split("<h2>Events</h2>", 1)[1].split("<h2>", 1)[0]
    assert top.count('<span class="muted">not available</span>') == N_EVENTS
    assert '<span class="tag' not in page


def test_no_interval_below_three_events_and_never_outside_the_range():
    w1 = [0.5, 2.0]  # two events: the Student-t interval of metrics.json is [-8.3, 10.8]
    assert summarize(w1)["ci95"][0] < 0
    assert R.interval(w1, "wasserstein") == {"mean": 1.25, "n": 2, "ci95": None}
    skewed = [0.1, 0.2, 5.0]
    assert summarize(skewed)["ci95"][0] < 0
    got = R.interval(skewed, "wasserstein", "x")
    lo, hi = got["ci95"]
    assert got["n"] == 3 and 0.1 <= lo <= got["mean"] <= hi <= 5.0
    assert R.interval(skewed, "wasserstein", "x") == got  # seeded: the same report every time
    assert R.interval([0.9, 1.0, 1.0, 1.0], "micro_f1")["ci95"][1] <= 1.0
    assert R.interval([None, float("nan")], "kl") == {"mean": None, "n": 0, "ci95": None}


def test_summary_table_shows_n_beside_every_mean(evaluated):
    result, _, page = evaluated
    table = R.summary_table(result.metrics)
    cells = re.findall(r'<td class="num[^"]*">(.*?)</td>', table)
    means = [c for c in cells if c != "-"]
    assert means and all(re.match(r"-?\d+\.\d{4} <span class=\"n\">n=\d+</span>", c) for c in means)
    n = {int(x) for x in re.findall(r"n=(\d+)", table)}
    assert n == {N_EVENTS}
    intervals = [tuple(map(float, x)) for x in re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", table)]
    assert intervals and all(0 <= lo <= hi for lo, hi in intervals)
    # with 2 of the 3 events, no interval at all
    two = dict(result.metrics, events=dict(list(result.metrics["events"].items())[:2]))
    table2 = R.summary_table(two)
    assert "n=2" in table2 and "n=3" not in table2 and not re.search(r"\[-?[\d.]+, ", table2)
    assert "percentile bootstrap" in page and f"n ≥ {R.MIN_N_INTERVAL}" in page


def test_dimension_table_shows_n(evaluated):
    result, _, _ = evaluated
    table = R.dimension_table(result.metrics)
    assert "<th>n</th>" in table
    assert len(re.findall(rf"<td class='num n'>{N_EVENTS}</td>", table)) >= 8


def test_glossary_says_what_each_metric_and_baseline_means(evaluated):
    _, _, page = evaluated
    box = page.split('<div class="glossary">', 1)[1].split("</div>", 1)[0]
    for term, words in [("KL", "Kullback-Leibler"), ("JS", "Jensen-Shannon"), ("W1", "Wasserstein"),
                        ("TV", "Total variation"), ("DTW", "Dynamic time warping"), ("F1", "micro-F1"),
                        ("persistence", "predicts no change"), ("marginal", "training events"),
                        ("bin", "1 bin = 1 engine step of 2 agents")]:
        assert re.search(rf"<dt>{re.escape(term)}[^<]*</dt><dd>[^<]*{re.escape(words)}", box), term
    assert len(METRICS) == 6  # one line each: a new metric needs its line here


def test_report_has_no_raw_metric_names_in_event_tables(evaluated):
    result, _, page = evaluated
    e = next(iter(result.metrics["events"]))
    table = R._event_scores(result.metrics["events"][e], result.metrics["sources"])
    assert "<th>W1 ↓</th>" in table and "wasserstein" not in table
    assert np.isfinite([float(x) for x in re.findall(r'<td class="num">([\d.]+)</td>', table)]).all()


def test_keywords_note_says_what_to_install_without_a_chinese_font(monkeypatch):
    monkeypatch.setattr(R, "has_cjk_font", lambda: False)
    note = R._keywords_note(["城管", "刘翔"])
    assert "apt-get install fonts-noto-cjk" in note and "城管 刘翔" in note  # the words are still listed
    monkeypatch.setattr(R, "has_cjk_font", lambda: True)
    assert "apt-get" not in R._keywords_note(["城管"])
