"""End-to-end evaluate / compare on small run directories written here in the documented format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mfllm.cli.evaluate import compare_command, evaluate_command, marginal_command
from mfllm.errors import ConfigError, DataError
from mfllm.evaluation import distributions as D
from mfllm.evaluation.compare import compare_runs
from mfllm.evaluation.evaluate import evaluate_run, load_run, score
from mfllm.evaluation.metrics import METRICS, PAPER, Scoring
from mfllm.labels.base import ActionLabels
from mfllm.labels.dimensions import ALL_DIMENSIONS
from mfllm.labels.rules import RulesLabeler

# Weibo-style reactions to a rumour (real texts; "" = plain repost).
WARMUP = {
    "e1": [
        ["转发微博", "太可怕了，真的假的？", ""],
        ["这是真的吗？求证", "心疼，愿平安", "转发，大家注意安全"],
    ],
    "e2": [["谣言！大家别信，警方已经辟谣了", ""], ["呵呵，又是谣言", "假的，官方已经澄清"]],
}
ROLLOUT = {
    "e1": [
        ["支持！希望早日查明真相", "", "太吓人了，大家小心"],
        ["已辟谣，不要再传了//@小明:太吓人了", "假的，官方已经澄清", "转发微博"],
        ["[怒]太过分了！", "这是真的吗？", ""],
    ],
    "e2": [["谣言止于智者", "", "转发"], ["警方通报：系谣言", "心疼，愿平安", "哈哈哈"]],
}
SIM_OTHER = ["太可怕了！赶紧转发", "", "真的假的？求证", "支持辟谣", "希望是假的", "转发微博"]


def _sha(rec: dict) -> str:
    body = json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def write_run(
    root: Path,
    name: str,
    method: str,
    sim: str = "same",  # "same" = sim_text == real_text; "other" = SIM_OTHER; "repost" = ""
    events: tuple[str, ...] = ("e1", "e2"),
    extra_lines: tuple[str, ...] = (),
    done: bool = True,
) -> Path:
    rd = root / name
    rd.mkdir(parents=True)
    (rd / "config.json").write_text(json.dumps({"method": method, "lang": "zh"}), encoding="utf-8")
    lines = []
    t0 = 1347334462.0
    k = 0
    for e in events:
        step = 0
        warm = WARMUP.get(e, WARMUP["e1"])
        roll = ROLLOUT.get(e, ROLLOUT["e1"])
        for phase, block in (("warmup", warm), ("rollout", roll)):
            for texts in block:
                acts = []
                for i, real in enumerate(texts):
                    if phase == "warmup":
                        s = None
                    elif sim == "same":
                        s = real
                    elif sim == "repost":
                        s = ""
                    else:
                        s = SIM_OTHER[k % len(SIM_OTHER)]
                        k += 1
                    acts.append(
                        {
                            "agent_id": f"{e}-u{step}-{i}",
                            "action_id": f"{e}-a{step}-{i}",
                            "time": t0 + 60 * step + i,
                            "state": "用户，粉丝 120",
                            "real_text": real,
                            "sim_text": s,
                            "prompt_tokens": 0,
                            "generated_tokens": 0,
                        }
                    )
                rec = {
                    "event_id": e,
                    "step": step,
                    "phase": phase,
                    "meanfield": f"第{step}步：多数人质疑消息真假，部分人转发提醒",
                    "meanfield_state": {},
                    "actions": acts,
                    "seconds": 0.1,
                }
                rec["sha"] = _sha(rec)
                lines.append(json.dumps(rec, ensure_ascii=False))
                step += 1
    lines += list(extra_lines)
    (rd / "steps.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if done:
        (rd / "done.json").write_text("{}", encoding="utf-8")
    return rd


def _bad_sha_line() -> str:
    rec = {
        "event_id": "e1",
        "step": 99,
        "phase": "rollout",
        "meanfield": "",
        "meanfield_state": {},
        "actions": [
            {
                "agent_id": "x",
                "action_id": "x",
                "time": 0.0,
                "state": "",
                "real_text": "假",
                "sim_text": "真",
                "prompt_tokens": 0,
                "generated_tokens": 0,
            }
        ],
        "seconds": 0.0,
        "sha": "0" * 64,
    }
    return json.dumps(rec, ensure_ascii=False)


# ------------------------------------------------------------------ score() by hand


def _al(stance: str) -> ActionLabels:
    return ActionLabels(labels={"stance": stance}, keywords=[])


def test_score_hand_values():
    real = [_al("support"), _al("support"), _al("oppose"), _al("oppose")]
    sim = [_al("support"), _al("oppose"), _al("oppose"), _al("oppose")]
    ev = D.EventLabels("e", [_al("oppose"), _al("neutral")], [0, 0], real, sim, [0, 0, 1, 1])
    cats = D.categories("stance")
    rc = D.bin_counts(ev.real, ev.bins, 2, "stance", cats)
    items = [D.agent_item(a, "stance") for a in real]
    pred = D.sim_prediction(ev, "stance", cats)
    short = score(rc, pred, items, ev.bins, 1, PAPER)
    long = score(rc, pred, items, ev.bins, 2, PAPER)
    js0 = 0.311278124459  # JS([1,0,0], [.5,.5,0]) base 2
    assert short["tv"] == pytest.approx(0.5) and long["tv"] == pytest.approx(0.25)
    assert short["js"] == pytest.approx(js0) and long["js"] == pytest.approx(js0 / 2)
    assert short["wasserstein"] == pytest.approx(0.5) and long["wasserstein"] == pytest.approx(0.25)
    assert short["micro_f1"] == pytest.approx(0.5) and long["micro_f1"] == pytest.approx(0.75)
    assert long["dtw"] == pytest.approx(1 / 3)  # support: 0.5, oppose: 0.5, neutral: 0
    assert short["kl"] == pytest.approx(np.log(2), rel=1e-4) and long["kl"] == pytest.approx(
        np.log(2) / 2, rel=1e-4
    )
    # the fair rule: counts smoothed with alpha on both sides (bin 0: real [2, 0, 0], sim [1, 1, 0])
    fair = score(rc, pred, items, ev.bins, 1, Scoring(alpha=0.5))
    p, q = np.array([2.5, 0.5, 0.5]) / 3.5, np.array([1.5, 1.5, 0.5]) / 3.5
    assert fair["kl"] == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert fair["tv"] == short["tv"] and fair["wasserstein"] == short["wasserstein"]  # unsmoothed
    # a second crowd is pooled per bin: bin 0 sim [1, 1, 0] + [2, 0, 0]
    ev.more_sims.append([_al("support"), _al("support"), _al("oppose"), _al("oppose")])
    two = score(rc, D.sim_prediction(ev, "stance", cats), items, ev.bins, 1, Scoring(alpha=0.5))
    q2 = np.array([3.5, 1.5, 0.5]) / 5.5
    assert two["kl"] == pytest.approx(float(np.sum(p * np.log(p / q2))))
    assert two["micro_f1"] == pytest.approx(0.75)  # (1 + 2) of 4 agent-crowd pairs right
    # persistence: warm-up [oppose, neutral] -> [0, .5, .5] every bin, per agent "oppose" (first of the tie)
    per = D.persistence_prediction(ev, "stance", cats)
    s = score(rc, per, items, ev.bins, 2)
    assert s["tv"] == pytest.approx(np.mean([1.0, 0.5]))
    assert s["micro_f1"] == pytest.approx(0.5)


# ------------------------------------------------------------------ evaluate_run end to end


def test_evaluate_run_end_to_end(tmp_path):
    rd = write_run(  # interrupted (no done.json): a damaged tail is read with a warning (a finished run: an error)
        tmp_path, "run_mf", "mf", sim="other", done=False, extra_lines=(_bad_sha_line(), '{"event_id": "e1", "st')
    )
    # event e1 simulated perfectly, e2 differently: rewrite e1's sim texts = real
    recs = [json.loads(x) for x in (rd / "steps.jsonl").read_text(encoding="utf-8").splitlines()[:-2]]
    lines = []
    for r in recs:
        if r["event_id"] == "e1" and r["phase"] == "rollout":
            for a in r["actions"]:
                a["sim_text"] = a["real_text"]
            del r["sha"]
            r["sha"] = _sha(r)
        lines.append(json.dumps(r, ensure_ascii=False))
    lines += [_bad_sha_line(), '{"event_id": "e1", "st']
    (rd / "steps.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    m = evaluate_run(rd, max_event_plots=5, cache=tmp_path / "labels.sqlite")
    on_disk = json.loads((rd / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk["summary"] == json.loads(json.dumps(m["summary"]))
    assert m["method"] == "mf" and m["sources"] == ["mf", "persistence", "marginal"]
    assert m["n_events"] == 2 and set(m["events"]) == {"e1", "e2"}
    assert m["n_actions"] == {"warmup": 10, "rollout": 15}
    assert any("sha" in w for w in m["warnings"])  # the two bad lines were ignored
    assert m["labeler"] == {"name": "rules", "version": RulesLabeler.version}

    e1 = m["events"]["e1"]
    assert e1["n_bins"] == 3 and e1["horizon_bins"] == {"short": 1, "mid": 2, "long": 3}
    assert m["events"]["e2"]["horizon_bins"] == {"short": 1, "mid": 2, "long": 2}
    for h in D.HORIZONS:
        mac = e1["scores"]["mf"][h]["macro"]
        assert mac["kl"] == pytest.approx(0, abs=1e-12) and mac["js"] == pytest.approx(0, abs=1e-12)
        assert mac["tv"] == 0 and mac["wasserstein"] == 0 and mac["dtw"] == 0 and mac["micro_f1"] == 1
        assert set(e1["scores"]["mf"][h]["dimensions"]) == set(ALL_DIMENSIONS)
        p = e1["scores"]["persistence"][h]["macro"]
        assert all(p[x] is not None for x in METRICS)
    e2 = m["events"]["e2"]["scores"]["mf"]["long"]["macro"]
    assert e2["kl"] > 0 and e2["micro_f1"] < 1
    for s in m["sources"]:
        for h in D.HORIZONS:
            assert set(m["summary"][s][h]) == set(METRICS)
            assert set(m["dimensions"][s][h]) == set(ALL_DIMENSIONS)
    st = m["summary"]["mf"]["long"]["kl"]
    assert st["n"] == 2 and st["mean"] == pytest.approx(e2["kl"] / 2)
    assert st["ci95"] is None  # two events: no interval (issue 17: they went negative on W1)
    for h in D.HORIZONS:
        js = m["summary"]["mf"][h]["js"]["mean"]
        assert 0 <= js <= 1

    if not D.marginal_path("rules", RulesLabeler.version).exists():
        assert m["summary"]["marginal"]["long"]["kl"]["mean"] is None
        assert any("marginal" in w for w in m["warnings"])

    assert (rd / "plots" / "average.png").stat().st_size > 1000
    assert (rd / "plots" / "event_e1.png").is_file() and (rd / "plots" / "event_e2.png").is_file()
    html = (rd / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 3
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    assert "多数人质疑消息真假" in html  # the mean-field timeline
    assert "太吓人了，大家小心" in html  # a sample action
    assert "persistence" in html

    # labels now come from the SQLite cache: same numbers
    assert (tmp_path / "labels.sqlite").is_file()
    again = evaluate_run(rd, plots=False, report=False, cache=tmp_path / "labels.sqlite")
    assert again["summary"] == m["summary"]


def test_evaluate_plots_label_axes_say_what_a_bin_is_and_count_events(tmp_path, monkeypatch):
    from mfllm import plotting
    from mfllm.evaluation import plots
    from mfllm.evaluation.evaluate import evaluate

    rd = write_run(tmp_path, "run", "mf", sim="other")
    res = evaluate(rd, bin_by="actions", bin_size=2, cache="")
    figs = {}
    save = plotting.save

    def keep(fig, path, dpi=None):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        figs[path.name] = [(ax, ax.get_window_extent(r), ax.get_legend() and ax.get_legend().get_window_extent(r))
                           for ax in fig.axes if ax.get_visible()]
        return save(fig, path, dpi)

    monkeypatch.setattr(plotting, "save", keep)
    plots.write_plots(res, tmp_path / "plots")
    assert set(figs) == {"average.png", "event_e1.png", "event_e2.png"}
    for name, panels in figs.items():
        assert len(panels) == (len(ALL_DIMENSIONS) if name != "average.png" else 9)
        for ax, box, leg in panels:
            assert "1 bin = 2 rollout actions" in ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
            assert all(g.get_visible() for g in ax.get_ygridlines())
            assert leg is None or leg.x0 >= box.x1  # legends beside the panel, not over the data
    # the average: e1 has 6 warm-up and 9 rollout actions (3 + 5 bins of 2), e2 4 and 6 (2 + 3 bins)
    avg = figs["average.png"]
    counts = avg[-1][0]
    assert counts.get_title().startswith("events behind each bin")
    assert [p.get_height() for p in counts.patches] == [1, 2, 2, 2, 2, 2, 1, 1]
    stance = next(ax for ax, _, _ in avg if ax.get_title() == "stance")
    spans = [p.get_x() for p in stance.patches]  # the shaded bins backed by one event only
    assert spans == [-3.5, 2.5]
    assert plots.bin_description({"by": "seconds", "size": 3600}) == "1 bin = 1 h of real time"
    assert plots.bin_description({"by": "steps", "size": 1}, 16) == "1 bin = 1 engine step of 16 agents"


def test_evaluate_time_bins_and_no_outputs(tmp_path):
    rd = write_run(tmp_path, "r", "recent", sim="other")
    m = evaluate_run(rd, bin_by="actions", bin_size=2, plots=False, report=False, cache="")
    assert m["binning"] == {"by": "actions", "size": 2}
    assert m["events"]["e1"]["n_bins"] == 5  # 9 rollout actions, 2 per bin
    assert not (rd / "report.html").exists() and not (rd / "plots").exists()
    m2 = evaluate_run(rd, bin_by="seconds", bin_size=120, plots=False, report=False, cache="")
    assert m2["events"]["e1"]["n_bins"] == 2  # steps 2,3,4 at +120 s, +180 s, +240 s from t0 -> bins 0,0,1


def test_marginal_baseline(tmp_path):
    lab = RulesLabeler()
    train = [
        SimpleNamespace(actions=[SimpleNamespace(text=t) for blk in WARMUP[e] + ROLLOUT[e] for t in blk])
        for e in ("e1", "e2")
    ]
    marg = D.compute_marginal(train, lab)
    assert marg["n_actions"] == 25 and marg["labeler"] == "rules"
    for d, dist in marg["distributions"].items():
        assert sum(dist.values()) == pytest.approx(1.0), d
    path = D.save_marginal(marg, tmp_path / "marg.json")
    rd = write_run(tmp_path, "r", "mf", sim="other")
    m = evaluate_run(rd, marginal=path, plots=False, report=False, cache="")
    assert m["baselines"]["marginal"] == str(path)
    mm = m["summary"]["marginal"]["long"]
    assert all(mm[x]["mean"] is not None for x in METRICS)
    marg["labeler_version"] = "999"
    D.save_marginal(marg, tmp_path / "other.json")
    with pytest.raises(ConfigError):
        evaluate_run(rd, marginal=tmp_path / "other.json", plots=False, report=False, cache="")
    m3 = evaluate_run(
        rd, marginal=train, plots=False, report=False, cache=""
    )  # computed from training events
    assert m3["summary"]["marginal"]["long"]["kl"]["mean"] == pytest.approx(mm["kl"]["mean"])


def test_load_run_errors(tmp_path):
    with pytest.raises(DataError):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="steps.jsonl"):
        load_run(tmp_path / "empty")
    rd = tmp_path / "bad"
    rd.mkdir()
    (rd / "steps.jsonl").write_text(_bad_sha_line() + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no valid step"):
        load_run(rd)
    run = load_run(write_run(tmp_path, "inc", "mf", done=False))
    assert not run.complete and any("incomplete" in w for w in run.warnings)
    assert [r["step"] for r in run.steps["e1"]] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ compare


def test_compare_two_runs(tmp_path):
    a = write_run(tmp_path, "a", "mf", sim="same")
    b = write_run(tmp_path, "b", "state", sim="repost", events=("e1", "e2", "e3"))
    evaluate_run(b, plots=False, report=False, cache="")
    res = compare_runs([a, b], plots=False, report=False, cache="")  # a has no metrics.json: evaluated here
    assert (a / "metrics.json").is_file()
    assert res["rows"] == ["mf", "state", "persistence", "marginal"]
    assert res["n_events"] == 2 and res["events"] == ["e1", "e2"]
    assert any("left out" in w for w in res["warnings"])
    rel = res["relative_kl"]["mf"]["long"]
    assert rel["vs_best_non_mf"]["against"] == "state"
    assert rel["vs_best_non_mf"]["change"] == pytest.approx(-1.0)  # mf is perfect here
    assert rel["vs_persistence"]["change"] == pytest.approx(-1.0)
    assert res["summary"]["state"]["long"]["kl"]["mean"] > 0
    # the baselines come from real data only: same as in each run's own metrics
    ma = json.loads((a / "metrics.json").read_text(encoding="utf-8"))
    assert res["summary"]["persistence"]["mid"]["tv"]["mean"] == pytest.approx(
        ma["summary"]["persistence"]["mid"]["tv"]["mean"]
    )

    evaluate_run(b, bin_size=2, plots=False, report=False, cache="")
    with pytest.raises(ConfigError, match="binning"):
        compare_runs([a, b])


# ------------------------------------------------------------------ CLI


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.command("compare")(compare_command)
    app.command("marginal")(marginal_command)
    return app


def test_cli_evaluate_and_compare(tmp_path, app):
    runner = CliRunner()
    a = write_run(tmp_path, "a", "mf", sim="other")
    b = write_run(tmp_path, "b", "popular", sim="repost")
    r = runner.invoke(app, ["evaluate", str(a), "--no-report", "--no-plots", "--no-label-cache"])
    assert r.exit_code == 0, r.output
    assert "persistence" in r.output and "F1" in r.output
    out = tmp_path / "cmp.json"
    r = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "--no-label-cache"])
    assert r.exit_code == 0, r.output
    assert "relative KL" in r.output
    assert json.loads(out.read_text(encoding="utf-8"))["rows"][:2] == ["mf", "popular"]

    r = runner.invoke(app, ["evaluate", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert "error:" in r.output and "run directory not found" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", str(a), "--bin-by", "days", "--no-label-cache"])
    assert r.exit_code == 2 and "unknown binning" in r.output
    r = runner.invoke(app, ["evaluate", "--help"])
    assert r.exit_code == 0 and "--bin-by" in r.output


def test_cli_marginal(tmp_path, app):
    from mfllm.paths import SAMPLE_DATA

    out = tmp_path / "marginal.json"
    r = CliRunner().invoke(
        app, ["marginal", str(SAMPLE_DATA), "--split", "all", "--out", str(out), "--no-label-cache"]
    )
    assert r.exit_code == 0, r.output
    m = D.load_marginal(out)
    assert m["labeler"] == "rules" and m["n_events"] > 0 and m["keywords"]["total"] > 0
    rd = write_run(tmp_path, "r", "mf", sim="other")
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(rd),
            "--marginal",
            str(out),
            "--no-plots",
            "--no-report",
            "--no-label-cache",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["summary"]["marginal"]["long"]["kl"]["mean"] is not None
