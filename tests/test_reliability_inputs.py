"""Bad input, fuzzed: loaders (JSONL, CED, Rumdect), the intervention spec, the simulation config and a run's
config.json. Every bad input is a DataError / ConfigError naming the file and the field (or, in a folder,
is skipped and reported), never a traceback, and never leaves a run directory that looks complete.

The specific messages per loader are tested in tests/test_data_errors.py; this file throws many
generated inputs at them (hypothesis) and runs the CLI as a subprocess on the classic cases. A folder of
300 files (some bad) runs by default, 10,000 with --runslow.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import SERVE_KEY, assert_clean_failure, cli_env, cli_inproc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfllm.data.load import load_events
from mfllm.errors import ConfigError, DataError, from_validation
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.simulation.engine import SimConfig
from mfllm.simulation.intervention_spec import parse_spec

FIX = Path(__file__).parent / "fixtures" / "data"
SAMPLE_LINES = (SAMPLE_DATA / "events.jsonl").read_text(encoding="utf-8").splitlines()
EVENT = json.loads(SAMPLE_LINES[0])
EVENT["actions"] = EVENT["actions"][:8]
FUZZ = settings(max_examples=int(os.environ.get("MFLLM_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


def _check_loaded(res, origin: str) -> None:
    """What a loader returns is usable: every text can be written as UTF-8; skipped errors name the file."""
    for ev in res.events:
        json.dumps([ev.event_id, ev.source.text, [a.text for a in ev.actions], [a.profile.to_dict()
                    for a in ev.actions]], ensure_ascii=False).encode("utf-8")
        assert all(a.time >= ev.source.time - 86400 for a in ev.actions)
    for err in res.skipped:
        assert isinstance(err, DataError) and origin in err.path


def _load(path: Path):
    """load_events: DataError / ConfigError or a result; nothing else may escape. Strict mode agrees."""
    try:
        res = load_events(path)
    except (DataError, ConfigError) as e:
        assert str(path) in str(e) or isinstance(e, ConfigError)
        return None
    _check_loaded(res, str(path))
    try:
        strict = load_events(path, strict=True)
    except DataError as e:
        assert res.skipped and str(e) == str(res.skipped[0])
    else:
        assert not res.skipped and [e.event_id for e in strict.events] == [e.event_id for e in res.events]
    return res


# ------------------------------------------------------------------------------------------ JSONL fuzz

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
_PATHS = [("event_id",), ("source",), ("source", "text"), ("source", "time"), ("source", "author"),
          ("actions",), ("actions", 0), ("actions", 0, "time"), ("actions", 0, "text"), ("actions", 0, "agent_id"),
          ("actions", 1, "action_id"), ("actions", 1, "parent"), ("actions", 1, "depth"), ("actions", 2, "profile"),
          ("actions", 2, "profile", "followers"), ("actions", 2, "profile", "uid"), ("label",), ("platform",)]
_SPECIAL = st.sampled_from([
    "", "\x00\x01\x1b[31m\u202e", "\ud800", "a\udfffb", "\ud83d\ude00", "转" * 5000, "é" * 100_000,
    -1, 0, 1e300, float("inf"), float("nan"), 631152000 - 1, 4102444800 + 1, 1347944360.5, "2012-09-18T08:00:00",
    "2012-09-18 08:00:00", "yesterday", True, [], {}, [None], {"uid": 1}, None,
])


def _mutate(ev: dict, path: tuple, value) -> dict:
    ev = json.loads(json.dumps(ev))
    cur = ev
    for k in path[:-1]:
        if isinstance(cur, dict) and k in cur:
            cur = cur[k]
        elif isinstance(cur, list) and isinstance(k, int) and k < len(cur):
            cur = cur[k]
        else:
            return ev
    k = path[-1]
    if value == "<delete>":
        if isinstance(cur, dict):
            cur.pop(k, None)
        elif isinstance(cur, list) and isinstance(k, int) and k < len(cur):
            cur.pop(k)
    elif isinstance(cur, dict) or (isinstance(cur, list) and isinstance(k, int) and k < len(cur)):
        cur[k] = value
    return ev


@FUZZ
@given(muts=st.lists(st.tuples(st.sampled_from(_PATHS), st.just("<delete>") | _SPECIAL | _JSON_VALUES),
                     min_size=1, max_size=4),
       damage=st.sampled_from(["none", "truncate", "bad-utf8", "control", "dup-id", "reorder"]),
       cut=st.floats(0, 1))
def test_jsonl_fuzz(tmp_path_factory, muts, damage, cut):
    ev = EVENT
    for path, value in muts:
        ev = _mutate(ev, path, value)
    line = json.dumps(ev, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
    if damage == "truncate":
        line = line[: int(len(line) * cut)]
    elif damage == "bad-utf8":
        i = int(len(line) * cut)
        line = line[:i] + b"\xff\xc3(" + line[i:]
    elif damage == "control":
        line = line.replace(b'"', b'"\x01', 1)
    elif damage == "reorder" and isinstance(ev.get("actions"), list):
        ev["actions"] = list(reversed(ev["actions"]))  # out of order: loaders sort by time
        line = json.dumps(ev, ensure_ascii=False).encode("utf-8", "surrogatepass")
    d = tmp_path_factory.mktemp("fuzz")
    good = SAMPLE_LINES[1].encode()
    lines = [good, line] + ([good] if damage == "dup-id" else [])
    (d / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    res = _load(d / "events.jsonl")
    assert res is not None and json.loads(good)["event_id"] in [e.event_id for e in res.events]
    if damage == "dup-id":
        assert any("duplicate event id" in str(e) for e in res.skipped)
    for e in res.skipped:  # a bad line is named by file:line
        assert f"{d / 'events.jsonl'}:" in e.path


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
       name=st.sampled_from(["x.jsonl", "x.json", "x.txt"]))
def test_any_bytes_as_a_data_file(tmp_path_factory, data, name):
    p = tmp_path_factory.mktemp("bytes") / name
    p.write_bytes(data)
    _load(p)


# ------------------------------------------------------------------------------------------ CED / Rumdect fuzz


def _ced_files():
    return sorted(p.relative_to(FIX / "ced") for p in (FIX / "ced").rglob("*.json"))


@FUZZ
@given(which=st.integers(0, 100), how=st.sampled_from(["truncate", "flip", "bad-utf8", "empty", "field"]),
       pos=st.floats(0, 1), value=_SPECIAL | _JSON_VALUES, field=st.sampled_from(
           ["mid", "uid", "date", "text", "parent", "user", "followers", "t", "created_at", "reposts_count"]))
def test_ced_and_rumdect_fuzz(tmp_path_factory, which, how, pos, value, field):
    root = tmp_path_factory.mktemp("fz")
    shutil.copytree(FIX / "ced", root / "ced")
    shutil.copytree(FIX / "rumdect", root / "rumdect")
    files = [root / "ced" / f for f in _ced_files()] + sorted((root / "rumdect").rglob("*.json"))
    f = files[which % len(files)]
    raw = f.read_bytes()
    i = int(len(raw) * pos) % max(1, len(raw))
    if how == "truncate":
        f.write_bytes(raw[:i])
    elif how == "flip":
        f.write_bytes(raw[:i] + bytes([raw[i] ^ 0x5A]) + raw[i + 1:])
    elif how == "bad-utf8":
        f.write_bytes(raw[:i] + b"\xe4\xb8" + raw[i:])
    elif how == "empty":
        f.write_bytes(b"")
    else:
        obj = json.loads(raw)
        recs = obj if isinstance(obj, list) else [obj]
        rec = recs[i % len(recs)]
        if isinstance(rec, dict):
            if field in rec:
                rec[field] = value
            elif "user" in rec and isinstance(rec["user"], dict):
                rec["user"][field] = value
        f.write_text(json.dumps(obj, ensure_ascii=False, allow_nan=True), encoding="utf-8", errors="surrogatepass")
    _load(root / "ced")
    _load(root / "rumdect")


# ------------------------------------------------------------------------------------------ specs / configs


_SPEC_ITEM = st.fixed_dictionaries(
    {"kind": st.sampled_from(["inject", "meanfield", "arrivals", "instruction", "bogus"]) | _JSON_VALUES},
    optional={k: _SPECIAL | _JSON_VALUES for k in
              ("at_step", "until_step", "at_time", "until_time", "texts", "count", "state", "signal", "match",
               "weight", "remove", "share", "text", "keep_size", "position", "agent_id", "extra_field")})


@FUZZ
@given(obj=st.lists(_SPEC_ITEM, max_size=3) | _SPEC_ITEM | _JSON_VALUES
       | st.fixed_dictionaries({"interventions": st.lists(_SPEC_ITEM, max_size=2) | _JSON_VALUES}))
def test_intervention_spec_fuzz(tmp_path_factory, obj):
    p = tmp_path_factory.mktemp("spec") / "spec.json"
    p.write_text(json.dumps(obj, ensure_ascii=False, allow_nan=True), encoding="utf-8", errors="surrogatepass")
    for src in (obj, p):
        try:
            spec = parse_spec(src)
        except ConfigError as e:
            assert isinstance(src, dict | list | str | int | float | bool | type(None)) or str(p) in str(e)
            continue
        assert spec.interventions


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from([
    "interventions: [", "- kind: inject\n  at_step: [1", "!!python/object/apply:os.system ['true']",
    "a: &a [*a, *a]", "\t- kind: meanfield", "%YAML 9.9\n---\n", "--- !!binary AAAA", "x: !!float abc"]))
def test_intervention_spec_yaml_text_fuzz(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("spec") / "spec.yaml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        parse_spec(p)
    except ConfigError as e:
        assert str(p) in str(e)


@FUZZ
@given(cfg=st.dictionaries(st.sampled_from(list(SimConfig.model_fields) + ["bogus"]), _SPECIAL | _JSON_VALUES,
                           max_size=4))
def test_sim_config_fuzz(cfg):
    from mfllm.simulation.runner import check_config

    try:
        c = SimConfig(**cfg)
    except ValueError as e:  # pydantic: the CLI prints its first problem as one line naming the field
        msg = str(from_validation(e))
        assert "\n" not in msg and msg.startswith("field '"), msg
        return
    check_config(c)  # the model's own checks passed: nothing else is checked twice


# ------------------------------------------------------------------------------------------ the CLI


def _event(eid: str, k: int = 0) -> dict:
    ev = json.loads(SAMPLE_LINES[k % len(SAMPLE_LINES)])
    ev["event_id"] = eid
    return ev


BAD_LINES = {  # name -> (line for an event id, the field named, words of the message)
    "truncated": (lambda i: json.dumps(_event(i))[:300], None, "not valid JSON"),
    "invalid-utf8": (lambda i: json.dumps(_event(i), ensure_ascii=False).replace('"text": "', '"text": "\udcff', 1),
                     None, "not valid UTF-8"),
    "wrong-type": (lambda i: json.dumps({**_event(i), "actions": "many"}), "actions", "expected a list"),
    "missing": (lambda i: json.dumps({k: v for k, v in _event(i).items() if k != "source"}), "source", "missing"),
    "empty-event": (lambda i: json.dumps({**_event(i), "actions": []}), "actions", "no actions"),
    "impossible-time": (lambda i: json.dumps({**_event(i), "source": {**_event(i)["source"], "time": 1e12}}),
                        "source.time", "impossible timestamp"),
    "before-source": (lambda i: json.dumps(_set(_event(i), "time", 900000000.0)), "actions[0].time",
                      "before the source post"),
    "lone-surrogate": (lambda i: json.dumps(_set(_event(i), "text", "\ud800")), "actions[0].text",
                       "lone UTF-16 surrogate"),
    "not-an-object": (lambda i: "[1, 2, 3]", None, "expected a JSON object"),
}


def _set(ev: dict, key: str, value) -> dict:
    for a in ev["actions"]:  # every action: one bad action is dropped, only an event with none left is skipped
        a[key] = value
    return ev


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_cli_bad_file_one_line_naming_file_and_field(tmp_path, case):
    make, field, words = BAD_LINES[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_bytes(make(case).encode("utf-8", "surrogateescape"))
    out = tmp_path / "run"
    res = cli_inproc("simulate", "--data", data, "--out", out, "--quiet")
    assert_clean_failure(res, "no events selected", code=2)
    assert f"{data}:1" in res.stderr and words in res.stderr  # the skipped line, named
    if field:
        assert f"field '{field}'" in res.stderr
    assert not out.exists()
    res = cli_inproc("data", "stats", data, "--strict")
    assert res.returncode != 0 and "Traceback" not in res.stderr and words in res.stderr


@pytest.mark.parametrize("bad", [
    ("--method", "foo", "field 'method': unknown value 'foo'; choose one of mf, state, recent, popular"),
    ("--lang", "fr", "field 'lang': unknown value 'fr'; choose one of zh, en"),
    ("--meanfield", "xx", "field 'meanfield': unknown value"), ("--step-size", "0", "step_size"),
    ("--temperature", "nan", "temperature"), ("--limit", "-1", "limit"), ("--split", "bogus", "split"),
    ("--data", "/nonexistent/x.jsonl", "no such file"), ("--events", "nope,nada", "no events selected"),
    ("--model", "/nonexistent-model", "model"), ("--backend", "grpc", "unknown backend"),
    ("--policy-adapter", "/nonexistent-adapter", "not a directory"),
    ("--meanfield-adapter", ".", "needs --meanfield llm"), ("--meanfield-max-new-tokens", "0", "meanfield_max_new"),
])
def test_cli_bad_options_leave_no_run_directory(tmp_path, bad):
    opt, value, words = bad
    out = tmp_path / "run"
    res = cli_inproc("simulate", "--limit", "1", opt, value, "--out", out, "--quiet")
    assert_clean_failure(res, words, code=2)
    assert not out.exists()


@pytest.mark.parametrize("cfg,field", [
    ("{}", "sim"), ("[1, 2]", None), ('{"sim": {"step_size": "x"}, "data": "d", "events": []}', "sim.step_size"),
    ('{"sim": {}, "data": "d", "events": "abc"}', "events"), ("{torn", None),
    (json.dumps({"sim": {}, "data": str(SAMPLE_DATA), "events": ["1321_yCqMnbo3H_2545387252"], "backend_name": 5}),
     "backend_name"),
])
def test_cli_resume_of_a_damaged_run_config(tmp_path, cfg, field):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg)
    res = cli_inproc("simulate", "--resume", run, "--quiet")
    line = assert_clean_failure(res, "config.json", code=2)
    if field:
        assert f"field '{field}'" in line
    assert not (run / "done.json").exists()


SPECS = {
    "invalid-yaml": ("interventions: [\n  - kind: inject", None, "invalid YAML"),
    "unknown-kind": ("- kind: teleport\n  at_step: 1\n", "interventions[0]", "unknown kind"),
    "wrong-type": ("- kind: inject\n  at_step: soon\n  texts: [a]\n", "interventions[0].at_step", ""),
    "missing": ("- kind: meanfield\n  at_step: 2\n", "interventions[0].signal", "missing"),
    "typo": ("- kind: meanfield\n  at_stp: 2\n  signal: x\n", "interventions[0].at_stp", "unknown field"),
    "python-tag": ("!!python/object/apply:os.system ['touch PWNED']\n", None, "invalid YAML"),
    "empty": ("", None, "empty"),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_cli_bad_intervention_spec(tmp_path, case):
    text, field, words = SPECS[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    res = cli_inproc("intervene", "--spec", spec, "--event", "x", "--out", tmp_path / "out", "--quiet")
    line = assert_clean_failure(res, str(spec), words)
    if field:
        assert f"field '{field}'" in line
    assert not (tmp_path / "out").exists() and not (Path.cwd() / "PWNED").exists()


def test_cli_bad_inputs_as_real_processes(cli, tmp_path):
    """The same failures from a real `mfllm` process: stderr holds one error line and no traceback."""
    data = tmp_path / "bad.jsonl"
    data.write_text(BAD_LINES["lone-surrogate"][0]("s") + "\n" + BAD_LINES["truncated"][0]("t") + "\n")
    res = cli.run("simulate", "--data", data, "--out", tmp_path / "run", "--quiet", timeout=120)
    assert_clean_failure(res, "no events selected", code=2)
    assert "field 'actions[0].text'" in res.stderr and f"{data}:2: not valid JSON" in res.stderr
    res = cli.run("simulate", "--limit", "1", "--step-size", "0", "--out", tmp_path / "run", "--quiet", timeout=120)
    assert_clean_failure(res, "step_size", code=2)
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "config.json").write_text('{"sim": {}}')
    assert_clean_failure(cli.run("simulate", "--resume", run, "--quiet", timeout=120), "config.json", code=2)
    assert not (tmp_path / "run").exists() and not (run / "done.json").exists()


# ------------------------------------------------------------------------------------------ a folder of files


def _make_folder(root: Path, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n one-event .jsonl files; every 10th is bad in a rotating way. Returns (good ids, bad file names)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    kinds = list(BAD_LINES)
    good, bad = [], []
    for i in range(n):
        name = f"e{i:05d}.jsonl"
        if i % 10 == 3:
            make, _, _ = BAD_LINES[kinds[(i // 10) % len(kinds)]]
            (root / name).write_bytes(make(f"e{i:05d}").encode("utf-8", "surrogateescape"))
            bad.append(name)
        else:
            ev = _event(f"e{i:05d}", rng.randrange(len(SAMPLE_LINES)))
            (root / name).write_text(json.dumps(ev, ensure_ascii=False) + "\n", encoding="utf-8")
            good.append(ev["event_id"])
    return good, bad


def _check_folder(cli, root: Path, good: list[str], bad: list[str]) -> None:
    res = cli.run("data", "stats", root, timeout=1200)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{len(bad)} file(s) skipped" in res.stderr
    for name in bad:
        assert name in res.stderr
    assert f"{len(good):,}" in res.stdout or str(len(good)) in res.stdout


def test_folder_of_300_files_some_bad(cli, mini_server, tmp_path):
    root = tmp_path / "events"
    good, bad = _make_folder(root, 300)
    _check_folder(cli, root, good, bad)
    # a simulation over the folder: the bad files met are skipped and reported; the run completes
    out = tmp_path / "run"
    res = cli.run("simulate", "--data", root, "--limit", "4", "--warmup", "2", "--step-size", "2",
                  "--max-agents", "2", "--backend", "openai", "--base-url", mini_server, "--model", DEFAULT_MODEL.name,
                  "--api-key-env", "MFLLM_SERVE_KEY", "--out", out, "--quiet",
                  env=cli_env(MFLLM_SERVE_KEY=SERVE_KEY), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 bad input file(s) / line(s) skipped" in res.stderr and "e00003.jsonl" in res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["events"] == good[:4] and (out / "done.json").is_file()


@pytest.mark.slow
def test_folder_of_10000_files_some_bad(cli, tmp_path):
    root = tmp_path / "events"
    good, bad = _make_folder(root, 10_000)
    _check_folder(cli, root, good, bad)


def test_force_replaces_a_run_only_once_everything_has_loaded(tmp_path):
    """--force with a mistake (an option, the data, the model) leaves the previous run as it was."""
    out = tmp_path / "run"
    res = cli_inproc("simulate", "--limit", "1", "--max-agents", "4", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for bad in (("--step-size", "0"), ("--data", "/nonexistent/x.jsonl"), ("--model", "/nonexistent-model"),
                ("--timeout", "5")):  # --timeout without --backend openai
        res = cli_inproc("simulate", "--limit", "1", *bad, "--out", out, "--force", "--quiet")
        assert_clean_failure(res, code=2)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, bad
    res = cli_inproc("simulate", "--limit", "1", "--max-agents", "8", "--out", out, "--force", "--quiet")
    assert res.returncode == 0 and json.loads((out / "config.json").read_text())["sim"]["max_rollout_agents"] == 8


def test_resume_may_change_only_the_endpoint_of_an_openai_run(tmp_path):
    out = tmp_path / "run"
    res = cli_inproc("simulate", "--limit", "1", "--max-agents", "4", "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr
    (out / "done.json").unlink()
    res = cli_inproc("simulate", "--resume", out, "--base-url", "http://127.0.0.1:9/v1", "--quiet")
    assert_clean_failure(res, "apply to an openai run", code=2)
    from mfllm.errors import ConfigError
    from mfllm.simulation.runner import resume

    with pytest.raises(ConfigError, match="cannot change model"):
        resume(str(out), backend_options={"model": "other"}, progress=False)
    res = cli_inproc("simulate", "--resume", out, "--quiet")
    assert res.returncode == 0 and (out / "done.json").exists()
