"""The typed step record (mfllm.store.records): the JSON on disk is exactly the run format, lines written by
the engine read back as the same records, and the dict view old readers use still works."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.echo_backend import Echo

from mfllm.paths import SAMPLE_DATA
from mfllm.simulation.engine import SimConfig
from mfllm.simulation.intervention_spec import build_interventions
from mfllm.simulation.runner import simulate
from mfllm.store.export import export_actions
from mfllm.store.records import ActionRecord, StepRecord
from mfllm.store.run import STEPS, RunStore, encode_record, iter_records, read_steps

# One line in the format every run directory holds (keys and order as the engine has always written them).
LINE = {"event_id": "e1", "step": 3, "phase": "rollout", "meanfield": "m", "meanfield_state": {"text": "m", "n": 2},
        "actions": [{"agent_id": "u1", "action_id": "a1", "time": 12.5, "state": "s", "real_text": "真",
                     "sim_text": "模拟", "parent": None, "followers": 7, "prompt_tokens": 30, "generated_tokens": 4},
                    {"agent_id": "inj", "action_id": "inj-3-1", "time": None, "state": "官方", "real_text": "辟谣",
                     "sim_text": "辟谣", "parent": None, "followers": None, "prompt_tokens": 0,
                     "generated_tokens": 0, "injected": True}],
        "seconds": 0.25}


def test_json_round_trip_is_exact():
    rec = StepRecord.from_json(LINE)
    assert isinstance(rec.actions[1], ActionRecord) and rec.actions[1].injected and not rec.actions[0].injected
    assert json.dumps(rec.to_json(), ensure_ascii=False) == json.dumps(LINE, ensure_ascii=False)
    assert encode_record(rec) == encode_record(LINE)  # same bytes, same sha
    assert "injected" not in rec.actions[0].to_json()  # only an injected post carries the key


def test_dict_view_for_old_readers():
    rec = StepRecord.from_json(LINE)
    assert rec["actions"][0]["sim_text"] == "模拟" and rec["actions"][0].get("injected") is None
    assert rec["actions"][1].get("injected") is True and "sha" not in rec and rec.get("sha") is None
    assert dict(rec)["step"] == 3 and list(rec) == list(LINE)
    assert rec == LINE and LINE == rec  # compares as its JSON
    bad = dict(LINE, step=4)
    assert rec != bad


def test_engine_records_write_and_read_back(tmp_path: Path):
    spec = {"interventions": [{"kind": "inject", "at_step": 3, "texts": ["官方辟谣"]}]}
    out = tmp_path / "run"
    simulate(str(SAMPLE_DATA), str(out), limit=1, config=SimConfig(step_size=2, warmup=2, max_rollout_agents=6),
             backend=Echo(), progress=False, interventions=build_interventions(spec), intervention_spec=spec)
    typed = list(iter_records(out))
    plain = read_steps(out)
    assert typed and all(isinstance(r, StepRecord) for r in typed)
    assert [r.to_json() for r in typed] == plain  # every line reads back as the record that wrote it
    assert any(a.injected for r in typed for a in r.actions)
    assert [r.step for r in RunStore(out).recover()] == [r.step for r in typed]
    lines = (out / STEPS).read_text(encoding="utf-8").splitlines(keepends=True)
    assert [encode_record(r) for r in typed] == lines  # byte-identical re-encoding
    n = export_actions(out, tmp_path / "actions.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "actions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) == sum(len(r.actions) for r in typed) and sum(r.get("injected", False) for r in rows) == 1
    assert not list(tmp_path.glob(".actions.jsonl.tmp*"))  # the atomic write left no temp file
