"""The decide policy in a real run: `mfllm simulate --model mfllm-decide` reads the folder's mfllm_policy.json
(compact mean field, header split off every action and kept as its `decision`); mfllm-mini runs are unchanged."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from mfllm.cli import app
from mfllm.errors import ConfigError
from mfllm.paths import ASSETS, DEFAULT_MODEL, MINI_MODEL
from mfllm.simulation.decision import FULL_HEADER_DIMS, header_format

DECIDE = ASSETS / "models" / "mfllm-decide"
ARGS = ["simulate", "--limit", "1", "--step-size", "4", "--warmup", "8", "--max-agents", "8", "--seed", "3", "--quiet"]


def _actions(run):
    recs = [json.loads(line) for line in (run / "steps.jsonl").read_text(encoding="utf-8").splitlines()]
    return recs, [a for r in recs if r["phase"] == "rollout" for a in r["actions"]]


def _contrast_dims(output: str) -> list[str]:
    """The dimensions `train decide` logs for its contrast copies (the console wraps long lines)."""
    return re.search(r"copies change one of ((?:\w+, )*\w+)", " ".join(output.split())).group(1).split(", ")


def test_decide_model_run_splits_the_header(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*ARGS, "--model", str(DECIDE), "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    sim = cfg.get("sim", cfg)
    assert sim["decision_header"] is True and sim["meanfield"] == "stats-compact8"
    recs, acts = _actions(out)
    assert len(acts) == 8
    assert "转" in recs[-1]["meanfield"] and "|支" in recs[-1]["meanfield"] and "|正" in recs[-1]["meanfield"]
    cats = {d: set(c) for d, c in header_format("zh")["labels"].items()}
    for a in acts:
        assert isinstance(a["decision"], dict)
        assert not a["decision"] or (set(a["decision"]) == set(FULL_HEADER_DIMS)  # the shipped model's header: 8
                                     and all(a["decision"][d] in cats[d] for d in FULL_HEADER_DIMS))
        assert not (a["sim_text"] or "").startswith("【") or a["decision"] == {}
    assert sum(bool(a["decision"]) for a in acts) >= 6  # the model writes its header


def test_mini_run_has_no_decision(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*ARGS, "--model", str(MINI_MODEL), "--out", str(out)])
    assert res.exit_code == 0, res.output
    _, acts = _actions(out)
    assert acts and all("decision" not in a for a in acts)


def test_train_decide_cli_writes_a_model_that_simulate_runs(tmp_path):
    """`mfllm train decide` end to end on the CED fixtures (2 steps from mfllm-mini): the folder it writes is a
    decide policy (mfllm_policy.json) that `mfllm simulate --model` runs with the header split off."""
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures" / "data" / "ced"
    cfg = tmp_path / "decide.json"
    cfg.write_text(json.dumps({"probe_every": 1000, "ckpt_every": 1000, "rows_per_step": 1, "warmup_steps": 1,
                               "meanfield_decay": 1.0}))
    model = tmp_path / "model"
    res = CliRunner().invoke(app, ["train", "decide", "--data", str(fixtures), "--out", str(model), "--steps", "2",
                                   "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    info = json.loads((model / "training_info.json").read_text(encoding="utf-8"))
    assert info["steps_done"] == 2 and info["examples_seen"] > 0
    policy = json.loads((model / "mfllm_policy.json").read_text(encoding="utf-8"))
    assert policy["decision_header"] is True and policy["meanfield_decay"] == 1.0  # what it was trained to read
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*ARGS, "--model", str(model), "--out", str(out)])
    assert res.exit_code == 0, res.output
    _, acts = _actions(out)
    assert len(acts) == 8 and all("decision" in a for a in acts)
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["sim"]["meanfield_decay"] == 1.0
    bad = CliRunner().invoke(app, ["train", "decide", "--data", str(fixtures), "--out", str(tmp_path / "x"),
                                   "--steps", "0"])
    assert bad.exit_code == 2 and "steps" in bad.output


@pytest.mark.parametrize("conditional", [False, True])
def test_train_decide_with_the_reader_term_fits_a_label_reader_on_the_training_split(tmp_path, conditional):
    """`reader_weight` > 0: the label reader (mfllm.labels.reader, the bench's mf-oracle) is fitted on the training events, the `mf`
    steps carry its targets and the step log shows the term; `reader_conditional`: a reader whose slots read
    the header's earlier slots."""
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures" / "data" / "ced"
    cfg = tmp_path / "decide.json"
    cfg.write_text(json.dumps({"probe_every": 1000, "ckpt_every": 1000, "rows_per_step": 2, "warmup_steps": 1,
                               "meanfield_decay": 1.0, "reader_weight": 40.0, "mix": {"mf": 1.0},
                               "reader_conditional": conditional, "init": str(DECIDE)}))
    res = CliRunner().invoke(app, ["train", "decide", "--data", str(fixtures), "--out", str(tmp_path / "model"),
                                   "--steps", "10", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert ("reader (conditional on the earlier header slots): fitted on" in res.output) == conditional
    assert ("reader: fitted on" in res.output) != conditional
    terms = [float(x) for x in re.findall(r'"reader": ([0-9.]+)', res.output)]
    assert len(terms) == 1 and terms[0] > 0  # the step log: every 10th step
    info = json.loads((tmp_path / "model" / "training_info.json").read_text(encoding="utf-8"))
    assert info["config"]["reader_weight"] == 40.0


def test_train_decide_with_the_contrast_term_logs_it_and_refuses_unknown_dimensions(tmp_path):
    """`contrast_weight` > 0: each step also scores every text after a changed header and logs the term; a
    `contrast_dims` entry that is not a header dimension is refused before any training, naming the field."""
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures" / "data" / "ced"
    base = {"probe_every": 1000, "ckpt_every": 1000, "rows_per_step": 2, "warmup_steps": 1, "meanfield_decay": 1.0,
            "contrast_weight": 5.0, "init": str(DECIDE), "header_dims": 4}  # the first layout still trains
    cfg = tmp_path / "decide.json"
    cfg.write_text(json.dumps(base))
    res = CliRunner().invoke(app, ["train", "decide", "--data", str(fixtures), "--out", str(tmp_path / "model"),
                                   "--steps", "10", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    terms = [float(x) for x in re.findall(r'"contrast": ([0-9.]+)', res.output)]
    assert len(terms) == 1 and terms[0] > 0
    assert _contrast_dims(res.output) == ["stance", "belief_degree", "sentiment_state"]  # behaviour: never
    cfg.write_text(json.dumps(base | {"contrast_dims": ["stance", "mood"]}))
    bad = CliRunner().invoke(app, ["train", "decide", "--data", str(fixtures), "--out", str(tmp_path / "bad"),
                                   "--steps", "10", "--config", str(cfg)])
    assert bad.exit_code != 0 and "contrast_dims" in bad.output and "mood" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad" / "model.safetensors").exists()
    # intent is a dimension of the 8-dimension header only
    cfg.write_text(json.dumps(base | {"contrast_dims": ["intent"]}))
    bad = CliRunner().invoke(app, ["train", "decide", "--data", str(fixtures), "--out", str(tmp_path / "bad"),
                                   "--steps", "10", "--config", str(cfg)])
    assert bad.exit_code != 0 and "intent" in bad.output and "header_dims 4" in bad.output


def test_an_eight_dimension_decide_model_trains_and_runs_with_its_own_header_and_mean_field(tmp_path):
    """`header_dims` 8 (the default): the header names every label dimension, the model reads stats-compact8
    (sentiment and subjectivity shares too), its policy file says both, and `mfllm simulate` runs it with them."""
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures" / "data" / "ced"
    cfg = tmp_path / "decide.json"
    cfg.write_text(json.dumps({"probe_every": 1000, "ckpt_every": 1000, "rows_per_step": 2, "warmup_steps": 1,
                               "meanfield_decay": 1.0, "contrast_weight": 5.0, "init": str(DECIDE)}))
    model = tmp_path / "model"
    res = CliRunner().invoke(app, ["train", "decide", "--data", str(fixtures), "--out", str(model), "--steps", "10",
                                   "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert _contrast_dims(res.output) == ["stance", "belief_degree", "sentiment_state", "sentiment_tendency",
                                          "subjectivity", "intent", "rumor"]
    policy = json.loads((model / "mfllm_policy.json").read_text(encoding="utf-8"))
    assert policy["header_dims"] == 8 and policy["meanfield"] == "stats-compact8"
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*ARGS, "--model", str(model), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["sim"]["meanfield"] == "stats-compact8"
    recs, acts = _actions(out)
    assert "|正" in recs[-1]["meanfield"] and "|主" in recs[-1]["meanfield"]
    assert len(acts) == 8 and all("decision" in a for a in acts)


def test_every_entry_point_runs_a_decide_model_the_same_way():
    """bench fidelity and forecast/intervene build the same SimConfig from a decide model folder as simulate:
    header on, the compact mean field unless another one (llm) was chosen; mfllm-mini changes nothing."""
    from mfllm.bench.fidelity import FidelitySettings, parse_variant, sim_config
    from mfllm.cli.whatif import _config

    decide, mini = FidelitySettings(out="x", model=str(DECIDE)), FidelitySettings(out="x", model=str(MINI_MODEL))
    for row in ("mf", "state"):
        cfg = sim_config(decide, parse_variant(f"r={row}"), 48)
        assert cfg.decision_header is True and cfg.meanfield == "stats-compact8"
        assert sim_config(mini, parse_variant(f"r={row}"), 48).decision_header is False
    assert sim_config(decide, parse_variant("r=mf-llm"), 48).meanfield == "llm"
    cfg = _config("mf", "stats", 16, "zh", 0, 1.0, 1.0, 48, str(DECIDE))
    assert cfg.decision_header is True and cfg.meanfield == "stats-compact8"
    assert _config("mf", "stats", 16, "zh", 0, 1.0, 1.0, 48, str(MINI_MODEL)).decision_header is False


def test_no_model_option_follows_the_model_that_runs():
    """Given no --model, a local backend runs the shipped default (a decide model), so its policy applies; a
    server's model known by a shipped folder's name (mfllm serve) is run as that folder; any other name is not."""
    from mfllm.bench.fidelity import FidelitySettings, parse_variant, sim_config
    from mfllm.cli.simulate import build_request
    from mfllm.cli.whatif import _config

    assert DEFAULT_MODEL == DECIDE
    opts = {"backend": "hf", "model": None, "meanfield": "stats", "data": "d", "events": None}
    assert build_request(opts, set()).sim.decision_header is True
    # the mean field's memory: the policy file's (1) unless --meanfield-decay is given; mini's stays the default
    assert build_request({**opts, "meanfield_decay": None}, set()).sim.meanfield_decay == 1.0
    assert build_request({**opts, "meanfield_decay": 0.9}, {"meanfield_decay"}).sim.meanfield_decay == 0.9
    assert build_request({**opts, "model": str(MINI_MODEL)}, {"model"}).sim.meanfield_decay is None
    assert build_request({**opts, "model": str(MINI_MODEL)}, {"model"}).sim.decision_header is False
    served = {**opts, "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}  # named: nothing is asked
    cfg = build_request({**served, "model": DEFAULT_MODEL.name}, {"model"}).sim
    assert cfg.decision_header is True and cfg.meanfield == "stats-compact8"
    assert build_request({**served, "model": "gpt-4o"}, {"model"}).sim.decision_header is False
    assert _config("mf", "stats", 16, "zh", 0, 1.0, 1.0, 48, None).decision_header is True
    assert _config("mf", "stats", 16, "zh", 0, 1.0, 1.0, 48, "gpt-4o", "openai").decision_header is False
    assert sim_config(FidelitySettings(out="x"), parse_variant("r=mf"), 48).decision_header is True
    remote = FidelitySettings(out="x", backend="openai", model=DEFAULT_MODEL.name)
    assert sim_config(remote, parse_variant("r=mf"), 48).meanfield == "stats-compact8"


def test_meanfield_header_counts_the_simulated_headers(tmp_path):
    """SimConfig.meanfield_header (bench key mfheader): the rollout's mean field counts each action's header labels."""
    from mfllm.backends.hf import HFBackend
    from mfllm.data.load import load_events
    from mfllm.labels.rules import RulesLabeler
    from mfllm.paths import SAMPLE_DATA
    from mfllm.simulation.config import SimConfig
    from mfllm.simulation.decision import apply_policy
    from mfllm.simulation.engine import Simulator

    ev = load_events(SAMPLE_DATA).events[0]
    backend = HFBackend(str(DECIDE), device="cpu")
    recs = {}
    for flag in (False, True):
        sim = apply_policy(DECIDE, {"step_size": 4, "warmup": 8, "max_rollout_agents": 8, "seed": 3,
                                    "meanfield_header": flag})
        out = []
        Simulator(backend, SimConfig(**sim)).run([ev], out.append)
        recs[flag] = out
    # same seeds, same first rollout step (it reads the warm-up only); the counts after it differ as the labels do
    first = [r for r in recs[True] if r.phase == "rollout"][0]
    assert [a.sim_text for a in first.actions] == [a.sim_text for a in [r for r in recs[False] if r.phase == "rollout"][0].actions]
    before = [r for r in recs[True] if r.phase == "warmup"][-1].meanfield_state["data"]["counts"]
    after = first.meanfield_state["data"]["counts"]
    text_labels = RulesLabeler().label([a.sim_text or "" for a in first.actions])
    differ = 0
    for d in FULL_HEADER_DIMS:
        want = dict(before[d])
        for a, lab in zip(first.actions, text_labels, strict=True):
            cat = (a.decision or {}).get(d) or lab.labels[d]
            differ += cat != lab.labels[d]
            want[cat] += 1.0
        assert after[d] == want, d
    assert differ > 0  # some header disagrees with its text, so the counts above tell the two apart
    plain = [r for r in recs[False] if r.phase == "rollout"][0].meanfield_state["data"]["counts"]
    assert any(plain[d] != after[d] for d in FULL_HEADER_DIMS)
    # refused, not silently ignored: no decision header (mfllm-mini), or teacher forcing
    for bad in ({"meanfield_header": True}, {**sim, "teacher_forcing": True}):
        with pytest.raises(ConfigError, match="meanfield_header"):
            Simulator(backend, SimConfig(**bad))
