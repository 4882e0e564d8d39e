"""OpenAIBackend against a fault-injecting local HTTP server: retries, errors, cache, concurrency, secrets."""

from __future__ import annotations

import json
import socket
import time

import pytest
from helpers.fake_openai import FakeOpenAI, ok_payload

from mfllm.backends.base import Backend, GenerationRequest, SamplingParams
from mfllm.backends.openai_api import OpenAIBackend
from mfllm.errors import BackendError, ConfigError

KEY = "sk-test-SECRET-0123456789"
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def _req(prompt="你好", seed=1, **kw):
    return GenerationRequest(prompt, seed=seed, params=SamplingParams(max_new_tokens=8, **kw))


def _backend(url, **kw):
    opts = {"retries": 3, "timeout_s": 5, **FAST, **kw}
    return OpenAIBackend(url, "m", **opts)


def test_success_usage_and_request_body(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI(lambda n, b, h: (200, ok_payload(f"回复{n}", 7, 3), {})) as srv:
        be = _backend(srv.url)
        assert isinstance(be, Backend)
        outs = be.generate([_req(seed=11, stop=("。",), top_k=5), _req(seed=12, temperature=0.0)])
    assert sorted(c.text for c in outs) == ["回复0", "回复1"]
    assert be.stats.to_dict()["prompt_tokens"] == 14 and be.stats.generated_tokens == 6
    b0 = next(b for b in srv.bodies if b["seed"] == 11)
    assert b0["prompt"] == "你好" and b0["max_tokens"] == 8 and b0["stop"] == ["。"] and b0["top_k"] == 5
    b1 = next(b for b in srv.bodies if b["seed"] == 12)
    assert b1["temperature"] == 0.0 and "top_p" not in b1
    assert srv.headers[0]["Authorization"] == f"Bearer {KEY}"


def test_retries_429_with_retry_after_then_500_then_success():
    def script(n, body, headers):
        if n == 0:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}
        if n == 1:
            return 500, {"error": {"message": "boom"}}, {}
        return 200, ok_payload("终于好了"), {}

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url)
        t0 = time.monotonic()
        outs = be.generate([_req()])
        elapsed = time.monotonic() - t0
    assert [c.text for c in outs] == ["终于好了"]
    assert srv.count == 3 and be.http_requests == 3
    assert elapsed >= 1.0  # Retry-After honoured


@pytest.mark.parametrize(
    "status,payload,kind",
    [
        (500, {"error": {"message": "internal boom"}}, "server_error"),
        (503, {"error": "overloaded"}, "server_error"),
        (200, ok_payload("   "), "empty"),
        (200, {"nothing": True}, "bad_response"),
    ],
)
def test_permanent_failures_raise_after_the_budget(status, payload, kind):
    with FakeOpenAI(lambda n, b, h: (status, payload, {})) as srv:
        be = _backend(srv.url, retries=2)
        with pytest.raises(BackendError) as ei:
            be.generate([_req()])
    assert ei.value.kind == kind
    assert srv.count == 3
    assert be.stats.requests == 0


def test_error_text_never_becomes_a_completion():
    # one request fails for good, the other succeeds: the call raises (no error text is returned)
    def script(n, body, headers):
        if body["prompt"] == "坏":
            return 500, {"error": {"message": "ERROR TEXT"}}, {}
        return 200, ok_payload("好"), {}

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url, retries=1)
        with pytest.raises(BackendError, match="ERROR TEXT"):
            be.generate([_req("好"), _req("坏")])


def test_client_errors_are_not_retried():
    with FakeOpenAI(lambda n, b, h: (400, {"error": {"message": "bad max_tokens"}}, {})) as srv:
        be = _backend(srv.url)
        with pytest.raises(BackendError) as ei:
            be.generate([_req()])
    assert ei.value.kind == "bad_request" and srv.count == 1


def test_connection_errors_and_timeouts():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    be = _backend(f"http://127.0.0.1:{port}/v1", retries=1)
    with pytest.raises(BackendError) as ei:
        be.generate([_req()])
    assert ei.value.kind == "connection"
    with FakeOpenAI(lambda n, b, h: 1.0) as srv:
        be = _backend(srv.url, retries=1, timeout_s=0.2)
        with pytest.raises(BackendError) as ei:
            be.generate([_req()])
    assert ei.value.kind == "timeout" and srv.count == 2


def test_concurrency_bound_is_respected():
    with FakeOpenAI(lambda n, b, h: (200, ok_payload(f"r{n}"), {}), delay_s=0.15) as srv:
        be = _backend(srv.url, max_concurrency=3)
        t0 = time.monotonic()
        outs = be.generate([_req(seed=i) for i in range(12)])
        elapsed = time.monotonic() - t0
    assert len(outs) == 12 and srv.count == 12
    assert srv.max_in_flight == 3
    assert elapsed < 12 * 0.15  # it did run concurrently


def test_rate_limit_spaces_requests():
    with FakeOpenAI(lambda n, b, h: (200, ok_payload(), {})) as srv:
        be = _backend(srv.url, rate_limit_rps=20)
        t0 = time.monotonic()
        be.generate([_req(seed=i) for i in range(6)])
    assert time.monotonic() - t0 >= 5 / 20 - 0.01


def test_response_cache_makes_reruns_free(tmp_path):
    with FakeOpenAI(lambda n, b, h: (200, ok_payload(f"r{b['seed']}", 4, 2), {})) as srv:
        be = _backend(srv.url, cache_dir=tmp_path / "cache")
        reqs = [_req(seed=i) for i in range(5)]
        first = be.generate(reqs)
        assert srv.count == 5
        again = _backend(srv.url, cache_dir=tmp_path / "cache").generate(reqs)  # a new process, same cache
        assert srv.count == 5
        assert [c.text for c in again] == [c.text for c in first]
        assert all(c.cached_prompt_tokens == c.prompt_tokens == 4 for c in again)
        be.generate([_req(seed=0, temperature=0.5)])  # other params: a miss
        assert srv.count == 6
    files = list((tmp_path / "cache").rglob("*"))
    assert not [f for f in files if f.name.startswith(".tmp-")]
    entry = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    assert set(entry) == {"text", "prompt_tokens", "generated_tokens", "finish_reason"}
    # a damaged entry is a miss, not a crash
    for f in files:
        if f.suffix == ".json":
            f.write_text("{torn")
    with FakeOpenAI(lambda n, b, h: (200, ok_payload("new"), {})) as srv:
        assert _backend(srv.url, cache_dir=tmp_path / "cache").generate([_req(seed=1)])[0].text == "new"


def test_api_key_never_leaks(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_KEY", KEY)

    def script(n, body, headers):  # a hostile server echoing the key back in its error
        return 401, {"error": {"message": f"bad key {headers.get('Authorization')}"}}, {}

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url, api_key_env="MY_KEY")
        with pytest.raises(BackendError) as ei:
            be.generate([_req()])
    assert srv.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert ei.value.kind == "auth"
    for text in (str(ei.value), repr(ei.value), repr(be), json.dumps(be.describe()), str(vars(ei.value))):
        assert KEY not in text
    kf = tmp_path / "key.txt"
    kf.write_text(KEY + "\n")
    monkeypatch.delenv("MY_KEY")
    with FakeOpenAI(lambda n, b, h: (200, ok_payload(), {})) as srv:
        be = _backend(srv.url, api_key_file=kf)
        be.generate([_req()])
    assert srv.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in json.dumps(be.describe()) and str(kf) in json.dumps(be.describe())
    with pytest.raises(ConfigError):
        _backend(srv.url, api_key_file=tmp_path / "missing.txt")


def test_chat_api_and_adapter_models():
    def script(n, body, headers):
        msg = body["messages"][0]["content"]
        return (
            200,
            {
                "choices": [
                    {
                        "message": {"role": "assistant", "content": f"{body['model']}:{msg}"},
                        "finish_reason": "length",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 8},
            },
            {},
        )

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url, api="chat", adapter_models={"policy": "lora-policy"})
        r = _req("问")
        r.adapter = "policy"
        out = be.generate([_req("问"), r])
    assert [c.text for c in out] == ["m:问", "lora-policy:问"]
    assert out[0].finish_reason == "length"
    with pytest.raises(BackendError) as ei:
        be.score(["a"], ["b"])
    assert ei.value.kind == "unsupported"


def test_generate_works_inside_a_running_event_loop():
    import asyncio

    with FakeOpenAI(lambda n, b, h: (200, ok_payload("嗯"), {})) as srv:
        be = _backend(srv.url)

        async def main():
            return be.generate([_req()])

        assert asyncio.run(main())[0].text == "嗯"


def test_bad_options():
    with pytest.raises(ConfigError):
        OpenAIBackend("http://x/v1", "m", api="grpc")
    with pytest.raises(ConfigError):
        OpenAIBackend("http://x/v1", "m", max_concurrency=0)
