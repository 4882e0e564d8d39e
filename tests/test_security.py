"""Security: API keys only from the environment (or a file the user names) and never written anywhere;
`mfllm serve` on 127.0.0.1 by default with request size limits; safe YAML only; safetensors only."""

from __future__ import annotations

import http.client
import json
import pickle
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import SERVE_KEY, assert_clean_failure, cli_env, cli_inproc, grep_tree
from helpers.fake_openai import FakeOpenAI, ok_payload

from mfllm.errors import ConfigError
from mfllm.paths import DEFAULT_MODEL
from mfllm.simulation.intervention_spec import parse_spec

JUDGE_KEY = "sk-judge-PLANTED-0d9e8f7a6b"
_ITEM_RE = re.compile(r'^(t\d+): (".*")$', re.MULTILINE)


def _judge(n, body, headers):
    """A fake LLM judge: requires JUDGE_KEY, answers valid labels for every item it is asked."""
    if headers.get("Authorization") != f"Bearer {JUDGE_KEY}":
        return 401, {"error": {"message": f"bad key {headers.get('Authorization')}"}}, {}
    from mfllm.labels.dimensions import DIMENSIONS

    item = {dim: cats[0] for dim, cats in DIMENSIONS.items()} | {"keywords": ["词"]}
    return 200, ok_payload(json.dumps({i: item for i, _ in _ITEM_RE.findall(body["prompt"])})), {}


def test_planted_keys_never_reach_the_run_directory_or_output(cli, mini_server, tmp_path):
    """simulate (openai backend, key from the variable --api-key-env names) + evaluate with an LLM judge
    (key from OPENAI_API_KEY): both keys are used (the servers require them) and written nowhere."""
    run = tmp_path / "run"
    env = cli_env(MY_LLM_KEY=SERVE_KEY, OPENAI_API_KEY=JUDGE_KEY, HOME=str(tmp_path / "home"))
    sim = cli.run("simulate", "--limit", "1", "--step-size", "2", "--warmup", "2", "--max-agents", "4",
                  "--backend", "openai", "--base-url", mini_server, "--model", DEFAULT_MODEL.name,
                  "--api-key-env", "MY_LLM_KEY", "--out", run, env=env, timeout=300)
    assert sim.returncode == 0, sim.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["backend_options"]["api_key_env"] == "MY_LLM_KEY"  # the variable's name, so resume finds it
    with FakeOpenAI(_judge) as judge:
        ev = cli.run("evaluate", run, "--labeler", "llm", "--labeler-backend", "openai", "--labeler-model", "judge",
                     "--labeler-base-url", judge.url, "--label-cache", tmp_path / "labels.sqlite", env=env,
                     timeout=300)
        assert ev.returncode == 0, ev.stderr
        assert judge.count > 0 and judge.headers[0]["Authorization"] == f"Bearer {JUDGE_KEY}"
    assert (run / "metrics.json").is_file()
    exp = cli.run("export", run, "--to", tmp_path / "actions.jsonl", env=env)
    assert exp.returncode == 0
    assert not grep_tree(tmp_path, [SERVE_KEY, JUDGE_KEY])  # run dir, report, plots, label cache, export
    for res in (sim, ev, exp):
        assert SERVE_KEY not in res.stdout + res.stderr and JUDGE_KEY not in res.stdout + res.stderr


def test_a_hostile_server_echoing_the_key_does_not_leak_it(cli, tmp_path):
    def script(n, body, headers):
        return 401, {"error": {"message": f"invalid key: {headers.get('Authorization')}"}}, {}

    with FakeOpenAI(script) as srv:
        res = cli.run("simulate", "--limit", "1", "--backend", "openai", "--base-url", srv.url, "--model", "m",
                      "--warmup", "2", "--step-size", "2", "--out", tmp_path / "run", "--quiet",
                      env=cli_env(OPENAI_API_KEY=SERVE_KEY), timeout=300)
        assert srv.headers[0]["Authorization"] == f"Bearer {SERVE_KEY}"
    line = assert_clean_failure(res, "LLM backend error (auth)", code=3)
    assert "invalid key: Bearer ***" in line
    assert SERVE_KEY not in res.stdout + res.stderr
    assert not grep_tree(tmp_path, [SERVE_KEY])


def test_keys_are_not_options():
    """There is no option that takes a key itself: only the variable's name (or a key file's path)."""
    from typer.testing import CliRunner

    from mfllm.cli import app

    for cmd in (["simulate"], ["evaluate"], ["serve"], ["intervene"], ["forecast"]):
        text = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"}, terminal_width=200).output
        opts = set(re.findall(r"--[a-z][a-z-]+", text))
        secret = re.compile(r"(^|-)(key|api-key|token|secret|password)(-|$)")
        assert not {o for o in opts if secret.search(o[2:]) and not o.endswith(("-env", "-file"))}, (cmd, opts)


# ------------------------------------------------------------------------------------------ mfllm serve


def _post(url: str, path: str, body: bytes, key: str | None = SERVE_KEY) -> tuple[int, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request("POST", u.path + path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _non_loopback_ip() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


def test_serve_binds_loopback_by_default_and_checks_requests(mini_server):
    u = urlparse(mini_server)
    assert u.hostname == "127.0.0.1"
    ip = _non_loopback_ip()
    if ip:  # not reachable from another interface
        with pytest.raises(OSError):
            socket.create_connection((ip, u.port), timeout=2).close()
    ok = json.dumps({"prompt": "你好", "max_tokens": 2, "seed": 1}).encode()
    assert _post(mini_server, "/completions", ok, key=None)[0] == 401
    assert _post(mini_server, "/completions", ok, key="sk-wrong")[0] == 401
    assert _post(mini_server, "/completions", ok)[0] == 200
    status, data = _post(mini_server, "/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert status == 413 and "over" in data["error"]["message"]
    for bad in (b"{not json", b"[1, 2]", json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(),
                json.dumps({"prompt": "x", "n": 0}).encode(), json.dumps({"prompt": 5}).encode()):
        assert _post(mini_server, "/completions", bad)[0] == 400, bad


def test_serve_cli_defaults_and_errors():
    from mfllm.cli.serve import serve_command

    defaults = {p.name: p.default for p in __import__("inspect").signature(serve_command).parameters.values()}
    assert defaults["host"].default == "127.0.0.1"
    assert_clean_failure(cli_inproc("serve", "--model", "/nonexistent", "--port", "0"), "not a model directory")
    assert_clean_failure(cli_inproc("serve", "--model", "x", "--adapter", "no-equals-sign"), "ROLE=PATH")


# ------------------------------------------------------------------------------------------ YAML / pickle


class _Boom:
    """Unpickling this creates a marker file: it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled!"))


EVIL_YAML = [
    "!!python/object/apply:os.system ['touch {marker}']\n",
    "interventions:\n  - !!python/object/apply:pathlib.Path.write_text [!!python/object/apply:pathlib.Path ['{marker}'], x]\n",
    "- kind: inject\n  at_step: 1\n  texts: !!python/object/new:list [['{marker}']]\n",
    "- kind: inject\n  at_step: 1\n  texts: [!!python/name:os.system x]\n",
]


@pytest.mark.parametrize("text", EVIL_YAML)
def test_yaml_with_python_tags_is_refused(tmp_path, text):
    marker = tmp_path / "PWNED"
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_spec(spec)
    assert not marker.exists()


def test_pickle_weights_are_refused(tmp_path):
    """A model folder holding only pytorch_model.bin (a real pickle with a payload) and a LoRA adapter
    folder holding only adapter_model.bin: refused with one line, the pickle never opened."""
    from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA

    marker = tmp_path / "UNPICKLED"
    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (model / f).write_bytes((DEFAULT_MODEL / f).read_bytes())
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    res = cli_inproc("simulate", "--limit", "1", "--model", model, "--out", tmp_path / "run", "--quiet")
    assert_clean_failure(res, "safetensors", code=2)
    assert not marker.exists() and not (tmp_path / "run").exists()

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    res = cli_inproc("serve", "--model", DEFAULT_MODEL, "--port", "0", "--adapter", f"policy={adapter}")
    assert_clean_failure(res, "adapter_model.safetensors", code=2)
    res = cli_inproc("simulate", "--limit", "1", "--policy-adapter", adapter, "--out", tmp_path / "run", "--quiet")
    assert_clean_failure(res, "adapter_model.safetensors", code=2)
    assert not (tmp_path / "run").exists()
    res = cli_inproc("train", "policy", "--data", SAMPLE_DATA, "--split", "all", "--val-split", "all",
                     "--meanfield-adapter", adapter, "--max-events", "1", "--val-events", "1", "--steps", "1",
                     "--out", tmp_path / "pol", "--quiet")
    assert_clean_failure(res, "adapter_model.safetensors", code=2)
    assert not marker.exists()
