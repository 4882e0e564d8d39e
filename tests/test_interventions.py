"""Interventions: the declarative spec (validation, clear errors), each kind's effect on what the engine
feeds the policy, time triggers, paired seeding (common random numbers) and `mfllm intervene` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.tiny_model import tiny_model_dir  # noqa: F401 - pytest fixture
from typer.testing import CliRunner

from mfllm.backends.base import BackendStats, Completion
from mfllm.data.load import load_events
from mfllm.data.schema import Action, Event, Profile, SourcePost
from mfllm.errors import ConfigError
from mfllm.paths import SAMPLE_DATA
from mfllm.simulation.engine import SimConfig, Simulator
from mfllm.simulation.intervention_spec import build_interventions, parse_spec
from mfllm.whatif.intervene import intervene

ROOT = Path(__file__).resolve().parent.parent
RUMOR = "1552_zpfYz0Loc_2174847535"  # a rumor event of the shipped sample
TEXTS = ["[转发]", "这是谣言吗？", "太可怕了", "辟谣：假的", "支持！", "真的假的", "心疼", "求证"]


class Recorder:
    """A stand-in backend: a deterministic text per request seed; records every request."""

    name = "recorder"

    def __init__(self):
        self.requests = []
        self.stats = BackendStats()

    def generate(self, requests):
        self.requests.extend(requests)
        return [Completion(TEXTS[r.seed % len(TEXTS)], 10, 3) for r in requests]

    def describe(self):
        return {"name": self.name}


def make_event(n=64, dt=60.0, activity=lambda i: 1 + i % 3):
    src = SourcePost("网传某地发生重大事故，求扩散！", 1_000_000.0, Profile("src"))
    acts = [Action(f"a{i}", f"u{i}", 1_000_000.0 + (i + 1) * dt, ["", "真的吗", "太可怕了", "转发"][i % 4], None,
                   Profile(f"u{i}", corpus_activity=activity(i), extra={"minutes_after_source": (i + 1) * dt / 60}))
            for i in range(n)]
    return Event("ev1", src, acts, label="rumor")


def simulate(spec=None, *, method="mf", event=None, backend=None, warmup=16, step=8):
    backend = backend or Recorder()
    cfg = SimConfig(method=method, step_size=step, warmup=warmup, max_new_tokens=8)
    ivs = build_interventions(spec) if spec is not None else None
    recs = []
    Simulator(backend, cfg, interventions=ivs).run([event or make_event()], recs.append)
    return recs, backend, ivs


def prompts_by_step(recs, backend):
    """step -> the prompts of that step's agents (requests are made in step order, one per rollout row)."""
    out, i = {}, 0
    for rec in recs:
        if rec["phase"] != "rollout":
            continue
        n = sum(1 for a in rec["actions"] if not a.get("injected"))
        out[rec["step"]] = [r.prompt for r in backend.requests[i:i + n]]
        i += n
    return out


# ------------------------------------------------------------------------------------------------ the spec


def test_example_spec_parses_and_builds():
    spec = parse_spec(ROOT / "examples" / "rebuttal.yaml")
    assert [i.kind for i in spec.interventions] == ["inject", "meanfield"]
    assert spec.interventions[0].at_step == 4
    assert len(build_interventions(spec)) == 2
    # a spec survives the run config's JSON round trip (runner.resume rebuilds interventions from it)
    assert parse_spec(json.loads(json.dumps(spec.dump()))).dump() == spec.dump()


@pytest.mark.parametrize("items, field, words", [
    ([{"kind": "inject", "at_step": "4", "texts": ["x"]}], "interventions[0].at_step", "valid integer"),
    ([{"kind": "rebut", "at_step": 4}], "interventions[0]", "unknown kind 'rebut'"),
    ([{"at_step": 4, "signal": "x"}], "interventions[0]", "missing 'kind'"),
    ([{"kind": "meanfield", "signal": "x"}], "interventions[0]", "exactly one of at_step"),
    ([{"kind": "meanfield", "at_step": 2, "at_time": 60, "signal": "x"}], "interventions[0]", "exactly one"),
    ([{"kind": "inject", "at_step": 4, "texts": "等待真相"}], "interventions[0].texts", "valid list"),
    ([{"kind": "inject", "at_step": 4, "texts": []}], "interventions[0].texts", "at least 1"),
    ([{"kind": "meanfield", "at_step": 4, "singal": "x"}], "interventions[0].singal", "unknown field"),
    ([{"kind": "arrivals", "at_step": 4, "remove": 1.5}], "interventions[0].remove", "less than or equal to 1"),
    ([{"kind": "arrivals", "at_step": 4}], "interventions[0]", "exactly one of weight"),
    ([{"kind": "arrivals", "at_step": 4, "weight": 2, "match": {"verifed": True}}],
     "interventions[0].match.verifed", "unknown field"),
    ([{"kind": "instruction", "at_step": 5, "until_step": 3, "text": "x"}], "interventions[0]", "before at_step"),
    ([{"kind": "instruction", "at_step": 1, "text": "x", "share": 0}], "interventions[0].share", "greater than 0"),
    ([{"kind": "meanfield", "at_step": 1, "signal": "x"}, {"kind": "inject", "at_step": 1, "texts": [3]}],
     "interventions[1].texts[0]", "valid string"),
])
def test_bad_specs_name_the_file_and_the_field(tmp_path, items, field, words):
    import yaml

    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({"interventions": items}, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        parse_spec(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: field '{field}': "), msg
    assert words in msg, msg


def test_bad_yaml_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("interventions:\n  - kind: inject\n    texts: [a, b\n    at_step: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+"):
        parse_spec(bad)
    bj = tmp_path / "bad.json"
    bj.write_text('{"interventions": [', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1"):
        parse_spec(bj)
    with pytest.raises(ConfigError, match="spec file not found"):
        parse_spec(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        parse_spec(empty)
    good = tmp_path / "one.json"  # a single item, in JSON
    good.write_text(json.dumps({"kind": "meanfield", "at_time": 3600, "signal": "x"}), encoding="utf-8")
    assert parse_spec(good).interventions[0].at_time == 3600.0


def test_cli_bad_spec_is_one_clear_line(tmp_path):
    from mfllm.cli import app

    p = tmp_path / "spec.yaml"
    p.write_text("- kind: inject\n  at_step: four\n  texts: [x]\n", encoding="utf-8")
    r = CliRunner().invoke(app, ["intervene", "--spec", str(p), "--event", RUMOR, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    out = r.output
    assert "Traceback" not in out and "interventions[0].at_step" in out and str(p.name) in out
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ each kind


def test_meanfield_signal_is_in_the_prompt_only_while_active():
    recs, be, _ = simulate([{"kind": "meanfield", "at_step": 3, "until_step": 4, "signal": "警方已证实此为谣言"}])
    by_step = prompts_by_step(recs, be)
    assert set(by_step) == set(range(2, 8))
    for s, ps in by_step.items():
        assert all(("警方已证实此为谣言" in p) == (s in (3, 4)) for p in ps), s
    # the signal is placed in the mean field the policy reads (before m_t); the stored m_t is unchanged
    p = by_step[3][0]
    assert "警方已证实此为谣言；" + recs[2]["meanfield"] in p
    assert all("警方" not in r["meanfield"] for r in recs)


def test_inject_adds_posts_seen_by_the_population():
    spec = [{"kind": "inject", "at_step": 3, "texts": ["等待真相，不信谣不传谣"], "count": 2, "state": "用户：官方"}]
    recs, be, _ = simulate(spec, method="recent")
    inj = [(r["step"], a) for r in recs for a in r["actions"] if a.get("injected")]
    assert [s for s, _ in inj] == [3, 3]  # one-shot by default, count posts
    assert all(a["real_text"] == a["sim_text"] == "等待真相，不信谣不传谣" and a["state"] == "用户：官方"
               for _, a in inj)
    by_step = prompts_by_step(recs, be)
    assert all("等待真相" in p for p in by_step[3])  # recent: the same step's agents see the posts
    assert not any("等待真相" in p for p in by_step[2])
    # mf: the injected posts feed the mean field (the next step's m_t counts them)
    recs_mf, _, _ = simulate(spec)
    base_mf, _, _ = simulate(None)
    assert recs_mf[3]["meanfield"] != base_mf[3]["meanfield"]
    assert recs_mf[2]["meanfield"] == base_mf[2]["meanfield"]


def test_inject_by_sampled_agents_uses_their_state():
    recs, _, _ = simulate([{"kind": "inject", "at_step": 4, "until_step": 5, "texts": ["a", "b"], "count": 3}])
    for r in recs:
        inj = [a for a in r["actions"] if a.get("injected")]
        assert len(inj) == (3 if r["step"] in (4, 5) else 0)
        states = {a["state"] for a in r["actions"] if not a.get("injected")}
        agents = {a["agent_id"] for a in r["actions"] if not a.get("injected")}
        for a in inj:
            assert a["state"] in states and a["agent_id"] in agents
        assert [a["sim_text"] for a in inj] == (["a", "b", "a"] if inj else [])


def test_instruction_reaches_a_seeded_share_of_agents():
    spec = [{"kind": "instruction", "at_step": 2, "text": "转发前请先核实信息来源", "share": 0.5}]
    ev = make_event(n=16 + 160)
    recs, be, _ = simulate(spec, event=ev)
    ps = [p for s, pp in prompts_by_step(recs, be).items() for p in pp]
    got = sum("（转发前请先核实信息来源）" in p for p in ps)
    assert 50 <= got <= 110, got  # 160 agents, share 0.5
    # the instruction sits in the agent's own part of the prompt (after the shared prefix)
    p = next(p for p in ps if "核实信息来源" in p)
    assert p.index("核实信息来源") > p.index("【你】")
    _, be2, _ = simulate(spec, event=ev)  # seeded per agent: the same agents again
    assert [("核实" in r.prompt) for r in be.requests] == [("核实" in r.prompt) for r in be2.requests]


def test_arrivals_remove_a_share_of_agents():
    spec = [{"kind": "arrivals", "at_step": 4, "remove": 0.5}]
    ev = make_event(n=16 + 160)
    recs, be, _ = simulate(spec, event=ev)
    base, _, _ = simulate(None, event=ev)
    for r, b in zip(recs, base, strict=True):
        ids, bids = [a["action_id"] for a in r["actions"]], [a["action_id"] for a in b["actions"]]
        if r["step"] < 4:
            assert ids == bids
        else:
            assert set(ids) <= set(bids)
    after = sum(len(r["actions"]) for r in recs if r["step"] >= 4)
    total = sum(len(b["actions"]) for b in base if b["step"] >= 4)
    assert 0.3 * total < after < 0.7 * total
    assert len(be.requests) == sum(len(r["actions"]) for r in recs if r["phase"] == "rollout")  # gone = no prompt


def test_arrivals_reweight_changes_who_arrives():
    ev = make_event(n=16 + 96)  # activity 1, 2, 3, 1, 2, 3...
    spec = [{"kind": "arrivals", "at_step": 2, "match": {"min_activity": 3}, "weight": 2}]
    recs, _, _ = simulate(spec, event=ev)
    acts = [a for r in recs if r["step"] >= 2 for a in r["actions"]]
    dups = [a for a in acts if "+d1" in a["action_id"]]
    active3 = {a.action_id for a in ev.actions[16:] if a.profile.corpus_activity == 3}
    assert {a["action_id"].split("+")[0] for a in dups} == active3  # every matching agent twice, others once
    assert len(acts) == 96 + len(active3)
    # keep_size: the steps keep their size, but matching agents are over-represented
    spec = [{"kind": "arrivals", "at_step": 2, "match": {"min_activity": 3}, "weight": 4, "keep_size": True}]
    recs, _, _ = simulate(spec, event=ev)
    acts = [a for r in recs if r["step"] >= 2 for a in r["actions"]]
    assert len(acts) == 96
    share3 = sum(a["action_id"].split("+")[0] in active3 for a in acts) / len(acts)
    assert share3 > 0.5  # 1/3 of the real agents; weight 4 -> about 2/3
    # a condition on a field the data lacks (CED reposters have no followers) matches nobody
    recs, _, _ = simulate([{"kind": "arrivals", "at_step": 2, "match": {"min_followers": 10}, "weight": 0}], event=ev)
    assert sum(len(r["actions"]) for r in recs) == len(ev.actions)


def test_time_trigger_starts_at_the_first_step_after_it():
    ev = make_event(n=64, dt=60.0)  # agent i arrives (i+1) minutes after the source
    spec = [{"kind": "meanfield", "at_time": 40 * 60, "signal": "SIGNAL"},
            {"kind": "inject", "at_time": 40 * 60, "texts": ["once"]}]
    recs, be, ivs = simulate(spec, event=ev)
    by_step = prompts_by_step(recs, be)
    # steps of 8: step s starts with agent 8s, at (8s+1) minutes; the first at or after 40 min is step 5
    assert [s for s, ps in by_step.items() if "SIGNAL" in ps[0]] == [5, 6, 7]
    assert [r["step"] for r in recs for a in r["actions"] if a.get("injected")] == [5]
    assert ivs[0].first_step == {"ev1": 5} and ivs[1].steps_in == {"ev1": [5, 5]}


# ------------------------------------------------------------------------------------------------ pairing


@pytest.fixture(scope="module")
def hf(tiny_model_dir):  # noqa: F811
    from mfllm.backends.hf import HFBackend

    return HFBackend(tiny_model_dir, device="cpu", min_prefix_tokens=8, num_threads=1)


def test_paired_seeds_noop_is_identical_and_arms_agree_before_the_intervention(hf):
    ev = load_events(SAMPLE_DATA / "events.jsonl", event_ids=[RUMOR]).events[0]
    ev.actions = ev.actions[:40]

    def run(spec):
        recs = []
        cfg = SimConfig(step_size=8, warmup=16, max_new_tokens=6, temperature=1.0)
        Simulator(hf, cfg, interventions=build_interventions(spec) if spec else None).run([ev], recs.append)
        return [[a["sim_text"] for a in r["actions"]] for r in recs]

    base = run(None)
    assert any(t for step in base[2:] for t in step)
    noop = run([{"kind": "arrivals", "at_step": 0, "weight": 1.0},
                {"kind": "instruction", "at_step": 99, "text": "never"}])
    assert noop == base
    sig = run([{"kind": "meanfield", "at_step": 3, "signal": "警方已证实此为谣言"}])
    assert sig[:3] == base[:3]  # common random numbers: identical before the intervention
    assert sig[3:] != base[3:]


def test_intervene_reports_paired_effects(tmp_path):
    ev = load_events(SAMPLE_DATA / "events.jsonl", event_ids=[RUMOR]).events[0]
    res = intervene(ev, ROOT / "examples" / "rebuttal.yaml", tmp_path / "iv", observe=48, horizon=48, runs=3,
                    backend=Recorder(), label_cache="", window=32, progress=False, plots=False)
    assert res["paired_identical_before"] and res["intervention"]["start_step"] == 4
    assert res["intervention"]["first_rollout_step"] == 3
    w = res["windows"]["the first 32 agents"]
    e = w["effect"]["rumor"]["counter"]
    assert e["n"] == 3 and e["ci95"][0] <= e["mean"] <= e["ci95"][1]
    # the effect is the paired difference of the shares
    assert e["mean"] == pytest.approx(w["intervened_share"]["rumor"]["counter"] - w["baseline_share"]["rumor"]["counter"])
    # before the intervention (bin 0 = step 3) nothing differs
    assert res["effect_by_bin"]["rumor"]["counter"]["mean"][0] == 0
    assert res["meanfield"][0]["intervened"].startswith("警方已证实此为谣言；")
    assert res["meanfield"][0]["baseline"] == res["meanfield"][0]["intervened"][len("警方已证实此为谣言；"):]
    for f in ("effects.json", "effects.md"):
        assert (tmp_path / "iv" / f).is_file()
    md = (tmp_path / "iv" / "effects.md").read_text(encoding="utf-8")
    assert "95% interval" in md and "## Headline" in md
    inj = [a for rec in map(json.loads, open(tmp_path / "iv" / "intervened" / "r0" / "steps.jsonl", encoding="utf-8"))
           for a in rec["actions"] if a.get("injected")]
    assert [a["agent_id"] for a in inj] == ["official", "official"]


def test_intervene_cli_end_to_end_with_a_real_model(tmp_path, tiny_model_dir):  # noqa: F811
    from mfllm.cli import app
    from mfllm.store.export import export_actions

    out = tmp_path / "iv"
    args = ["intervene", "--event", RUMOR, "--spec", str(ROOT / "examples" / "rebuttal.yaml"), "--runs", "2",
            "--observe", "48", "--horizon", "32", "--step-size", "16", "--max-new-tokens", "4",
            "--model", str(tiny_model_dir), "--no-label-cache", "--quiet", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "effects.json").read_text(encoding="utf-8"))
    assert res["paired_identical_before"] is True
    assert res["config"]["runs"] == 2 and len(res["runs"]["baseline"]) == 2
    for f in ("effects.md", "trajectories.png", "effects.png"):
        assert (out / f).is_file()
    n = export_actions(out / "intervened" / "r1", tmp_path / "x.jsonl")
    assert n == 48 + 32 + 2  # warm-up, simulated, injected
    r = CliRunner().invoke(app, args)  # an existing output is not overwritten silently
    assert r.exit_code == 2 and "--force" in r.output


def test_cli_defaults_are_the_engines():
    from mfllm.cli.whatif import DEFAULTS

    assert DEFAULTS == {k: SimConfig.model_fields[k].default for k in DEFAULTS}


def test_resumed_run_with_a_time_triggered_inject_equals_the_uninterrupted_one():
    ev = make_event(n=64, dt=60.0)
    spec = [{"kind": "inject", "at_time": 40 * 60, "texts": ["once"]},
            {"kind": "meanfield", "at_time": 40 * 60, "signal": "SIGNAL"}]
    full, _, _ = simulate(spec, event=ev)
    cfg = SimConfig(step_size=8, warmup=16, max_new_tokens=8)
    rest = []
    Simulator(Recorder(), cfg, interventions=build_interventions(spec)).run(
        [ev], rest.append, resume={"ev1": full[:6]})  # stopped after step 5, where the inject fired
    assert [r["step"] for r in rest] == [6, 7]
    def strip(recs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]

    assert strip(rest) == strip(full[6:])  # no second inject; the signal still applies
    assert "SIGNAL" not in rest[0]["meanfield"] and not any(a.get("injected") for r in rest for a in r["actions"])
