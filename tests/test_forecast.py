"""Forecasting: the lazy population extension, replicas, scoring against the real future of a shipped
sample event (and the LLM-free baselines), new events from a small JSON file, the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_model import tiny_model_dir  # noqa: F401 - pytest fixture
from typer.testing import CliRunner

from mfllm.backends.base import BackendStats, Completion
from mfllm.data.load import load_events
from mfllm.data.new_event import load_new_event
from mfllm.errors import ConfigError, DataError
from mfllm.paths import SAMPLE_DATA
from mfllm.simulation.engine import SimConfig
from mfllm.simulation.population import PopulationActions, arrival_rate, extend_population, synthetic_event
from mfllm.simulation.steps import plan_steps
from mfllm.store.export import export_actions
from mfllm.whatif.common import replica_events
from mfllm.whatif.forecast import forecast, score_forecast
from mfllm.whatif.shares import CATS, block_shares, count_vector

RUMOR = "1552_zpfYz0Loc_2174847535"  # 206 real actions
TEXTS = ["[转发]", "这是谣言吗？", "太可怕了", "辟谣：假的", "支持！", "真的假的", "心疼", "求证"]


class Scripted:
    name = "scripted"

    def __init__(self):
        self.stats = BackendStats()
        self.n = 0

    def generate(self, requests):
        self.n += len(requests)
        return [Completion(TEXTS[r.seed % len(TEXTS)], 10, 3) for r in requests]

    def describe(self):
        return {"name": self.name}


@pytest.fixture(scope="module")
def event():
    return load_events(SAMPLE_DATA / "events.jsonl", event_ids=[RUMOR]).events[0]


# ------------------------------------------------------------------------------------------------ population


def test_population_keeps_the_real_agents_then_resamples(event):
    n_real = len(event.actions)
    pop = list(extend_population(event, n_real + 300, seed=1))
    assert pop[:n_real] == event.actions  # the real ones first, untouched (the same objects)
    syn = pop[n_real:]
    assert len(syn) == 300
    ids = [a.agent_id for a in syn]
    assert len(set(ids)) == 300 and not set(ids) & {a.agent_id for a in event.actions}
    assert len({a.action_id for a in pop}) == len(pop)
    times = [a.time for a in pop]
    assert times == sorted(times) and syn[0].time > event.actions[-1].time
    real_uids = {a.profile.uid for a in event.actions}
    for a in syn:
        assert a.profile.extra["synthetic"] is True and a.profile.extra["resampled_from"] in real_uids
        assert a.profile.extra["minutes_after_source"] == pytest.approx((a.time - event.source.time) / 60, abs=0.06)
        assert a.profile.uid == a.agent_id and a.parent is None
    # the arrival rate is the observed (recent) one: 300 arrivals span about 300 / rate seconds
    span = syn[-1].time - event.actions[-1].time
    assert 0.7 < span * arrival_rate(event.actions) / 300 < 1.4
    # fewer than the real ones: truncated
    assert list(extend_population(event, 10, seed=1)) == event.actions[:10]


def test_population_is_seeded_and_independent_of_consumption(event):
    def key(it):
        return [(a.agent_id, round(a.time, 6), a.profile.extra.get("resampled_from")) for a in it]

    a = key(extend_population(event, 600, seed=3))
    assert a == key(extend_population(event, 600, seed=3))
    assert a != key(extend_population(event, 600, seed=4))
    # consumed in steps (how the engine reads it) it is the same sequence
    steps = [x for s in plan_steps(extend_population(event, 600, seed=3), 16, 48) for x in s.actions]
    assert key(steps) == a
    # a replica (another event id) gets another population
    r1 = synthetic_event(event, 600, seed=3, event_id="x#r1")
    assert key(r1.actions) != a and key(r1.actions) == key(r1.actions)  # re-iterable, same each time


def test_population_is_lazy_and_bounded(event):
    pa = PopulationActions(event, 10**9, seed=0)
    assert len(pa) == 10**9  # known without generating anything
    head = list(itertools.islice(iter(pa), 5))
    assert head == event.actions[:5]
    tracemalloc.start()
    try:
        for i, _ in enumerate(extend_population(event, 10**6, seed=0)):
            if i == 2_000:
                base = tracemalloc.get_traced_memory()[0]
            if i >= 30_000:
                break
        cur, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cur - base < 200_000  # memory does not grow with the number of agents generated


def test_population_until_time_and_new_events(event):
    until = event.actions[-1].time + 20 / arrival_rate(event.actions)  # about 20 more arrivals
    pa = PopulationActions(event, None, seed=0, until_time=until)
    acts = list(pa)
    assert len(pa) == len(acts) and 5 < len(acts) - len(event.actions) < 50 and acts[-1].time <= until
    with pytest.raises(ValueError):
        PopulationActions(event, None, seed=0)
    # an event with no reaction yet: unknown profiles, about one arrival per minute
    from mfllm.data.schema import Event

    bare = Event("bare", event.source, [])
    new = list(extend_population(bare, 50, seed=0))
    assert len(new) == 50 and all(a.profile.extra["synthetic"] for a in new)
    assert 20 < (new[-1].time - event.source.time) / 60 < 100


# ------------------------------------------------------------------------------------------------ forecast


def test_replicas_share_the_real_prefix_and_differ_after(event):
    reps = replica_events(event, 3, observe=32, horizon=250, seed=0)
    assert [r.event_id for r in reps] == [f"{RUMOR}#r{i}" for i in range(3)]
    acts = [list(r.actions) for r in reps]
    assert all(len(a) == 282 for a in acts)
    assert acts[0][:206] == acts[1][:206] == event.actions  # the real agents (who arrived, when)
    assert [a.time for a in acts[0][206:]] != [a.time for a in acts[1][206:]]
    assert all(a.text is None for a in acts[0][206:])  # no real text: recorded as unknown, not as a repost
    blind = replica_events(event, 1, observe=32, horizon=40, seed=0, blind=True)[0]
    b = list(blind.actions)
    assert b[:32] == event.actions[:32] and all(a.profile.extra.get("synthetic") for a in b[32:])
    assert {a.profile.extra["resampled_from"] for a in b[32:]} <= {a.profile.uid for a in event.actions[:32]}
    with pytest.raises(ConfigError, match="observe"):
        replica_events(event, 2, observe=500, horizon=10)
    with pytest.raises(ConfigError, match="exactly one"):
        replica_events(event, 2, observe=10)


def test_forecast_on_a_sample_event_is_scored_against_the_real_future(event, tmp_path):
    be = Scripted()
    res = forecast(event, tmp_path / "fc", observe=32, horizon=48, runs=3, backend=be,
                   config=SimConfig(step_size=16), label_cache="", progress=False, plots=False)
    assert be.n == 3 * 48  # the replicas were simulated (together)
    assert res["bins"]["agents"] == [[1, 16], [17, 32], [33, 48]]
    assert res["bins"]["real_agents"] == [16, 16, 16]
    f = res["forecast"]["belief_degree"]["doubt"]
    for m, lo, hi in zip(f["mean"], f["p5"], f["p95"], strict=True):
        assert lo - 1e-9 <= m <= hi + 1e-9
    s = res["scores"]
    assert [b["agents"] for b in s["buckets"]] == [[1, 16], [17, 32], [33, 48]]
    for b in s["buckets"]:
        for src in ("forecast", "one_run", "persistence"):
            assert all(v is not None and v >= 0 for v in b[src].values()), (src, b)
        assert b["forecast"]["js"] <= b["one_run"]["js"] + 1e-9  # JS is convex: the mean forecast is no worse
    assert s["overall"]["forecast"]["js"] == pytest.approx(np.mean([b["forecast"]["js"] for b in s["buckets"]]))
    # outputs: JSON, CSV, markdown table by horizon, one run directory per replica
    out = tmp_path / "fc"
    assert json.loads((out / "forecast.json").read_text(encoding="utf-8"))["scores"]["buckets"]
    rows = list(csv.DictReader(open(out / "forecast.csv", encoding="utf-8")))
    assert len(rows) == 3 * len(CATS) and {"mean", "p5", "p95", "real"} <= set(rows[0])
    assert "| 1-16 | 16 |" in (out / "forecast.md").read_text(encoding="utf-8")
    texts = []
    for r in range(3):
        n = export_actions(out / "runs" / f"r{r}", tmp_path / f"r{r}.jsonl")
        assert n == 32 + 48
        texts.append([json.loads(x)["sim_text"] for x in open(tmp_path / f"r{r}.jsonl", encoding="utf-8")][32:])
    assert texts[0] != texts[1]  # the replicas' seeds differ


def test_score_forecast_perfect_and_persistence():
    real = np.zeros((2, len(CATS)))
    real[0] = count_vector([])
    from mfllm.labels.base import ActionLabels
    from mfllm.labels.dimensions import DIMENSIONS

    lab = ActionLabels({d: cs[0] for d, cs in DIMENSIONS.items()})
    real[0] = count_vector([lab, lab])
    real[1] = count_vector([lab])
    shares = np.stack([block_shares(real)] * 2)  # two runs, both exactly right
    warm = count_vector([ActionLabels({d: cs[-1] for d, cs in DIMENSIONS.items()})])
    res = score_forecast(real, shares, warm, None)
    assert all(res[b]["forecast"]["js"] == pytest.approx(0, abs=1e-9) for b in range(2))
    assert res[0]["persistence"]["js"] == pytest.approx(1.0)  # the opposite categories: JS (base 2) = 1
    assert res[0]["marginal"]["js"] is None


def test_forecast_past_the_end_of_the_data_and_by_time(event, tmp_path):
    res = forecast(event, tmp_path / "a", observe=160, horizon=80, runs=2, backend=Scripted(),
                   config=SimConfig(step_size=16), label_cache="", progress=False, plots=False)
    assert res["beyond_real_data"] == 34 and res["agents_simulated_per_run"] == [80, 80]
    assert res["bins"]["real_agents"] == [16, 16, 14, 0, 0]
    assert [b["bin"] for b in res["scores"]["buckets"]] == [0, 1, 2]  # scored where the data has the future
    # a time horizon: the agents arriving within 2 hours after the last observed action
    t_obs = event.actions[31].time
    res = forecast(event, tmp_path / "b", observe=32, horizon_time=7200, runs=2, backend=Scripted(),
                   config=SimConfig(step_size=16), label_cache="", progress=False, plots=False)
    n = sum(1 for a in event.actions[32:] if a.time <= t_obs + 7200)
    assert sum(res["bins"]["real_agents"]) == n
    assert all(h is None or h * 3600 + event.source.time <= t_obs + 7200 for h in res["bins"]["hours_after_source"])


def write_new_event(path: Path, **over):
    d = {"event_id": "new1",
         "source": {"text": "网传某市自来水被污染，请大家不要饮用！", "time": "2024-05-01T08:00:00+08:00"},
         "early": [{"text": "真的假的？", "time": "2024-05-01T08:05:00+08:00", "profile": {"followers": 120}},
                   {"text": "", "time": 1714522200, "profile": {"verified": True}},
                   {"text": "已转给家人", "time": "2024-05-01T08:20:00+08:00"}]}
    d.update(over)
    path.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
    return path


def test_new_event_from_json_and_its_forecast(tmp_path):
    ev = load_new_event(write_new_event(tmp_path / "new.json"))
    assert ev.event_id == "new1" and len(ev.actions) == 3
    assert [a.profile.extra["minutes_after_source"] for a in ev.actions] == [5.0, 10.0, 20.0]
    assert ev.actions[0].profile.followers == 120 and ev.actions[1].profile.verified is True
    res = forecast(ev, tmp_path / "fc", observe=3, horizon=32, runs=2, backend=Scripted(),
                   config=SimConfig(step_size=8), label_cache="", progress=False)
    assert res["scores"] is None and res["beyond_real_data"] == 32
    assert (tmp_path / "fc" / "forecast.png").is_file()
    assert "nothing to score" in (tmp_path / "fc" / "forecast.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("over, field", [
    ({"source": {"text": "x"}}, "source.time"),
    ({"source": {"text": "", "time": 1}}, "source.text"),
    ({"early": [{"text": "x", "time": "yesterday"}]}, "early[0].time"),
    ({"early": [{"text": "x", "time": 1714521900, "profile": {"followers": "many"}}]}, "early[0].profile.followers"),
    ({"early": [{"txt": "x", "time": 1714521900}]}, "early[0].txt"),
    ({"early": [{"text": "x", "time": 1}]}, "early[0].time"),
])
def test_bad_new_event_names_the_field(tmp_path, over, field):
    p = write_new_event(tmp_path / "bad.json", **over)
    with pytest.raises(DataError) as e:
        load_new_event(p)
    assert f"field '{field}'" in str(e.value) and "bad.json" in str(e.value)


def test_forecast_cli_errors_are_clear(tmp_path):
    from mfllm.cli import app

    r = CliRunner().invoke(app, ["forecast", "--event", RUMOR, "--horizon", "16", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--observe" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["forecast", "--event", "nope", "--observe", "8", "--horizon", "16",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not in" in r.output
    r = CliRunner().invoke(app, ["forecast", "--event", RUMOR, "--observe", "8", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--horizon" in r.output


def test_forecast_cli_new_event_with_a_real_model(tmp_path, tiny_model_dir):  # noqa: F811
    from mfllm.cli import app

    p = write_new_event(tmp_path / "new.json")
    out = tmp_path / "fc"
    r = CliRunner().invoke(app, ["forecast", "--new-event", str(p), "--horizon", "16", "--runs", "2",
                                 "--step-size", "8", "--max-new-tokens", "4", "--model", str(tiny_model_dir),
                                 "--no-label-cache", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "forecast.json").read_text(encoding="utf-8"))
    assert res["config"]["observe"] == 3 and res["agents_simulated_per_run"] == [16, 16]
    assert (out / "runs" / "r1" / "done.json").is_file() and (out / "forecast.png").is_file()


def test_bad_options_fail_before_anything_is_written(event, tmp_path):
    # A wrong name fails when SimConfig is built; one built unchecked (model_construct) is caught before a write.
    for cfg, field in ((SimConfig.model_construct(method="nope"), "method"), (SimConfig.model_construct(lang="fr"), "lang"),
                       (SimConfig(time_window=60), "time_window")):
        with pytest.raises(ConfigError, match=field):
            forecast(event, tmp_path / "o", observe=8, horizon=8, runs=1, config=cfg, backend=Scripted())
    assert not (tmp_path / "o").exists()


def test_whatif_modules_import_down_only_and_no_private_names():
    import ast

    import mfllm.whatif

    higher = ("mfllm.cli", "mfllm.bench")
    for f in sorted(Path(mfllm.whatif.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mfllm"):
                assert not node.module.startswith(higher), f"{f.name} imports {node.module}"
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{f.name} imports private {private} from {node.module}"
