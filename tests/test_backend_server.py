"""`mfllm serve` (stdlib OpenAI-compatible server over HFBackend), driven by OpenAIBackend over real loopback HTTP."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.tiny_model import tiny_model_dir  # noqa: F401 - pytest fixture

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.backends.hf import HFBackend
from mfllm.backends.openai_api import OpenAIBackend
from mfllm.backends.server import make_server
from mfllm.cli.serve import serve_command
from mfllm.errors import BackendError

PREFIX = "系统：你是一名微博用户。事件：地震后网友转发消息，官方回应辟谣。平均场：大家都很关注。你的状态："
STATES = ["支持", "反对官方的通报", "心疼孩子们啊！", "不信", "怎么回事？"]


@pytest.fixture(scope="module")
def served(tiny_model_dir):  # noqa: F811
    be = HFBackend(tiny_model_dir, device="cpu", min_prefix_tokens=8)
    srv = make_server(be, "127.0.0.1", 0, model_name="tiny", max_body_bytes=64 * 1024)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield be, srv
    srv.shutdown()
    srv.server_close()


def _client(srv, **kw):
    return OpenAIBackend(srv.url, "tiny", retries=0, timeout_s=30, empty_is_error=False, **kw)


def _reqs(params):
    return [GenerationRequest(PREFIX + s, seed=40 + i, params=params) for i, s in enumerate(STATES)]


def _raw(srv, method, path, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, data


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_new_tokens=8),
        SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8),
    ],
    ids=["greedy", "sampled"],
)
def test_openai_backend_through_mfllm_serve_equals_hf(served, api, params):
    be, srv = served
    reqs = _reqs(params)
    direct = be.generate(reqs)
    client = _client(srv, api=api, max_concurrency=4)
    remote = client.generate(reqs)
    key = [(c.text, c.generated_tokens, c.prompt_tokens, c.finish_reason) for c in direct]
    assert [(c.text, c.generated_tokens, c.prompt_tokens, c.finish_reason) for c in remote] == key
    assert client.stats.prompt_tokens == sum(c.prompt_tokens for c in direct)


def test_cache_hit_on_rerun_does_not_call_the_server(served, tmp_path):
    _, srv = served
    reqs = _reqs(SamplingParams(temperature=1.0, max_new_tokens=6))
    first = _client(srv, cache_dir=tmp_path).generate(reqs)
    before = srv.requests_served
    again = _client(srv, cache_dir=tmp_path).generate(reqs)
    assert srv.requests_served == before
    assert [c.text for c in again] == [c.text for c in first]


def test_score_through_echo_logprobs(served):
    be, srv = served
    client = _client(srv)
    prompts = [PREFIX + "支持", "今天", PREFIX]
    conts = ["，大家加油！", "。微博热搜", "？真的假的"]
    remote = client.score_tokens(prompts, conts)
    local = be.score_tokens(prompts, conts)
    tok = be.tokenizer
    checked = 0
    for (rs, rn), (ls, ln), p, c in zip(remote, local, prompts, conts, strict=True):
        assert rs < 0 and rn > 0
        joint = tok(p + c)["input_ids"]
        if (
            joint == tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"]
        ):  # same split both ways
            assert rn == ln and rs == pytest.approx(ls, abs=1e-3)
            checked += 1
    assert checked >= 1


def test_usage_models_and_http_errors(served):
    _, srv = served
    status, data = _raw(
        srv,
        "POST",
        "/v1/completions",
        json.dumps(
            {"model": "tiny", "prompt": ["今天", "微博"], "max_tokens": 3, "temperature": 0, "seed": 1}
        ).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and len(data["choices"]) == 2
    assert data["usage"]["completion_tokens"] == 6 and data["usage"]["total_tokens"] > 6
    status, data = _raw(srv, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in data["data"]] == ["tiny"]
    status, data = _raw(srv, "POST", "/v1/completions", b"{not json", {"Content-Length": "9"})
    assert status == 400 and "malformed" in data["error"]["message"]
    status, data = _raw(srv, "POST", "/v1/completions", b"x" * (65 * 1024))
    assert status == 413 and "error" in data
    status, data = _raw(srv, "POST", "/v1/completions", json.dumps({"prompt": "a", "n": 0}).encode())
    assert status == 400 and data["error"]["param"] == "n"
    status, data = _raw(
        srv, "POST", "/v1/completions", json.dumps({"prompt": "a", "model": "other"}).encode()
    )
    assert status == 404 and data["error"]["code"] == "model_not_found"
    status, data = _raw(
        srv, "POST", "/v1/completions", json.dumps({"prompt": "a", "temperature": "hot"}).encode()
    )
    assert status == 400
    # OpenAI's error object: every field present, the code a string or null (never the HTTP status)
    assert data["error"] == {
        "message": "'temperature' must be a number",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": None,
    }
    status, data = _raw(srv, "POST", "/v1/nothing", b"{}")
    assert status == 404
    status, data = _raw(srv, "POST", "/v1/completions", json.dumps({"prompt": "a", "logprobs": 1}).encode())
    assert status == 400  # logprobs only for echo scoring
    status, data = _raw(srv, "GET", "/health")
    assert status == 200


def test_concurrent_requests_are_batched_and_unchanged(served):
    be, srv = served
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    reqs = [GenerationRequest(PREFIX + s + "啊" * k, seed=k, params=params) for k, s in enumerate(STATES * 3)]
    direct = [c.text for c in be.generate(reqs)]
    client = _client(srv, max_concurrency=16)
    calls_before = be.stats.calls
    with ThreadPoolExecutor(4) as ex:  # several callers at once
        outs = list(ex.map(lambda r: client.generate([r])[0].text, reqs))
    assert outs == direct
    assert be.stats.calls - calls_before <= len(reqs)


def test_backend_errors_become_http_500_not_text(served, monkeypatch):
    be, srv = served

    def boom(requests):
        raise BackendError("oom", "out of memory")

    monkeypatch.setattr(be, "generate", boom)
    with pytest.raises(BackendError) as ei:
        _client(srv).generate(_reqs(SamplingParams(max_new_tokens=2))[:1])
    assert ei.value.kind == "server_error" and "out of memory" in str(ei.value)


def test_api_key_required_when_configured(tiny_model_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MFLLM_SERVE_API_KEY", "sk-serve-123")
    be = HFBackend(tiny_model_dir, device="cpu")
    srv = make_server(be, "127.0.0.1", 0, model_name="tiny")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, _ = _raw(srv, "GET", "/v1/models")
        assert status == 401
        status, _ = _raw(srv, "GET", "/v1/models", headers={"Authorization": "Bearer sk-serve-123"})
        assert status == 200
        monkeypatch.setenv("OPENAI_API_KEY", "sk-serve-123")
        out = OpenAIBackend(srv.url, "tiny", retries=0).generate(
            [GenerationRequest("今天", params=SamplingParams(max_new_tokens=3))]
        )
        assert out[0].generated_tokens == 3
    finally:
        srv.shutdown()
        srv.server_close()


def test_serve_command_is_a_typer_command():
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["serve", "--help"])
    assert res.exit_code == 0
    for opt in ("--model", "--host", "--port", "--adapter"):
        assert opt in res.output


def test_one_bad_request_does_not_fail_its_batch(served):
    _, srv = served
    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    good = GenerationRequest(PREFIX, seed=1, params=params)
    bad = GenerationRequest("微博" * 2000, seed=2, params=params)  # over the tiny model's context
    results = {}

    def call(name, req):
        try:
            results[name] = srv.batcher.submit([req])[0].generated_tokens
        except BackendError as e:
            results[name] = e.kind

    threads = [threading.Thread(target=call, args=(n, r)) for n, r in (("good", good), ("bad", bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"good": 3, "bad": "context_length"}
