"""Faults from LLM endpoints, over real HTTP on 127.0.0.1 (tests/helpers/fake_openai.py injects them).

What tests/test_backend_openai.py already covers (429 + Retry-After, 500/503, empty, no choices, 4xx, refused
connection, a server that sleeps, concurrency when healthy, key scrubbing) is not repeated. Added here:
429 without Retry-After or with an HTTP date, 502/504/408, connection resets, truncated and non-JSON
bodies, slow (trickled) streams, malformed usage, the concurrency bound under faults; the LLM judge
(LLMLabeler) answering in the wrong language / format over HTTP and its cache after an outage; and the
end-to-end run: `mfllm simulate --backend openai` through a faulting proxy in front of `mfllm serve`
(the shipped default model), failing after the retry budget, then resumed against the healthy endpoint: equal to the
local run, and no injected error text anywhere in the run directory.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import Counter
from email.utils import formatdate
from urllib.parse import urlparse

import pytest
from conftest import SERVE_KEY, SIM_ARGS, assert_clean_failure, assert_same_run, cli_env, grep_tree
from helpers.fake_openai import RESET, FakeOpenAI, Raw, ok_payload

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.backends.openai_api import OpenAIBackend
from mfllm.errors import BackendError
from mfllm.labels.cache import CachedLabeler, LabelCache
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.labels.llm import LLMLabeler
from mfllm.paths import DEFAULT_MODEL

MARK = "INJECTED-FAULT"  # in every injected error; must never reach a completion, action or label
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def _err(status: int, msg: str = "boom", headers: dict | None = None):
    return status, {"error": {"message": f"{MARK} {msg}", "type": "server_error"}}, headers or {}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


# name -> (answer of the faulting server, the kind it is reported as)
FAULTS = {
    "429": (_err(429, "rate limited"), "rate_limit"),
    "429-retry-after-0": (_err(429, "rate limited", {"Retry-After": "0"}), "rate_limit"),
    "429-retry-after-date": (_err(429, "rate limited", {"Retry-After": formatdate(usegmt=True)}), "rate_limit"),
    "408": (_err(408, "request timeout"), "timeout"),
    "500": (_err(500), "server_error"),
    "502": (_err(502, "bad gateway"), "server_error"),
    "503": (_err(503, "overloaded"), "server_error"),
    "504": (_err(504, "gateway timeout"), "server_error"),
    "502-html": (Raw(502, f"<html><h1>502 Bad Gateway {MARK}</h1></html>".encode()), "server_error"),
    "reset": (RESET, "connection"),
    "truncated": (Raw(200, _json_bytes(ok_payload(MARK))[:25], declared=400), "connection"),
    "not-json": (Raw(200, f"<html>{MARK} maintenance</html>".encode()), "bad_response"),
    "json-cut": (Raw(200, _json_bytes(ok_payload(MARK))[:-7]), "bad_response"),
    "no-choices": ((200, {"error": {"message": f"{MARK} in a 200"}}, {}), "bad_response"),
    "choices-empty": ((200, {"choices": []}, {}), "bad_response"),
    "text-not-str": ((200, {"choices": [{"text": {"x": MARK}}]}, {}), "bad_response"),
    "bad-usage": ((200, {**ok_payload(MARK), "usage": {"prompt_tokens": MARK}}, {}), "bad_response"),
    "empty": ((200, ok_payload(""), {}), "empty"),
    "whitespace": ((200, ok_payload(" \n "), {}), "empty"),
    "slow-stream": (Raw(200, _json_bytes(ok_payload(MARK)), trickle_s=0.05), "timeout"),
    "hang": (30.0, "timeout"),
}
FAULT_COUNTS: Counter = Counter()  # faults injected in this module (reported in docs/reliability.md)


@pytest.fixture(scope="module", autouse=True)
def _report_fault_counts(request):
    """After this module: print the faults it injected (docs/reliability.md's table). Not a test: a report."""
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None and FAULT_COUNTS:
        with capture.global_and_fixture_disabled():
            print("\nfaults injected:", json.dumps(dict(sorted(FAULT_COUNTS.items()))))


def _req(seed=1):
    return GenerationRequest("你好", seed=seed, params=SamplingParams(max_new_tokens=8))


def _backend(url, **kw):
    return OpenAIBackend(url, "m", **{"retries": 2, "timeout_s": 0.6, **FAST, **kw})


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_transient_fault_is_retried_then_succeeds(name):
    answer, _ = FAULTS[name]

    def script(n, body, headers):
        if n < 2:
            FAULT_COUNTS[name] += 1
            return answer
        return 200, ok_payload(f"好{body['seed']}"), {}

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url)
        t0 = time.monotonic()
        out = be.generate([_req(seed=5)])
        elapsed = time.monotonic() - t0
    assert [c.text for c in out] == ["好5"]
    assert srv.count == 3 and be.stats.requests == 1
    assert elapsed < 8


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_permanent_fault_fails_after_the_budget_as_its_kind(name):
    answer, kind = FAULTS[name]

    def script(n, body, headers):
        FAULT_COUNTS[name] += 1
        return answer

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url, retries=1)
        t0 = time.monotonic()
        with pytest.raises(BackendError) as ei:
            be.generate([_req()])
        elapsed = time.monotonic() - t0
    assert ei.value.kind == kind, str(ei.value)
    assert srv.count == 2  # 1 try + 1 retry, then the error
    assert "after 2 attempts" in str(ei.value)
    assert elapsed < 2 * 0.6 + 3  # every attempt is bounded by timeout_s (a trickle too), nothing hangs
    assert be.stats.requests == 0


def test_a_step_with_one_failing_request_returns_nothing():
    """Among 8 requests one fails for good: the whole call raises; no partial list, no error text."""

    def script(n, body, headers):
        if body["seed"] == 3:
            return _err(503)
        return 200, ok_payload(f"r{body['seed']}"), {}

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url, retries=1)
        with pytest.raises(BackendError) as ei:
            be.generate([_req(seed=i) for i in range(8)])
    assert ei.value.kind == "server_error"


def test_concurrency_stays_bounded_under_faults():
    lock = threading.Lock()
    tries: Counter = Counter()

    def script(n, body, headers):
        s = body["seed"]
        with lock:
            tries[s] += 1
            k = tries[s]
        if k == 1 and s % 4 == 0:
            return RESET
        if k == 1 and s % 4 == 1:
            return _err(503)
        if k == 1 and s % 4 == 2:
            return _err(429)
        time.sleep(0.05)
        return 200, ok_payload(f"r{s}"), {}

    with FakeOpenAI(script) as srv:
        be = _backend(srv.url, max_concurrency=3, retries=3, timeout_s=5)
        out = be.generate([_req(seed=i) for i in range(24)])
    assert [c.text for c in out] == [f"r{i}" for i in range(24)]
    assert srv.max_in_flight <= 3
    assert srv.count == 24 + 18


# ------------------------------------------------------------------------------------------ the LLM judge

_ITEM_RE = re.compile(r'^(t\d+): (".*")$', re.MULTILINE)


def _good(text: str) -> dict:
    states = DIMENSIONS["sentiment_state"]
    d = {dim: cats[0] for dim, cats in DIMENSIONS.items()}
    d["sentiment_state"] = states[sum(map(ord, text)) % len(states)]
    d["keywords"] = [text[:3]]
    return d


def _judge_answer(prompt: str) -> str:
    return json.dumps({i: _good(json.loads(t)) for i, t in _ITEM_RE.findall(prompt)}, ensure_ascii=False)


BAD_ANSWERS = {
    "wrong-language": lambda items: json.dumps(
        {i: {**_good(t), "sentiment_state": "愤怒", "stance": "支持"} for i, t in items}, ensure_ascii=False),
    "prose": lambda items: f"{MARK}: 抱歉，我无法完成这个任务。",
    "markdown-table": lambda items: "| id | stance |\n|---|---|\n" + "".join(f"| {i} | support |\n" for i, _ in items),
    "positional-list": lambda items: json.dumps([_good(t) for _, t in items], ensure_ascii=False),
    "wrong-ids": lambda items: json.dumps({f"x{k}": _good(t) for k, (_, t) in enumerate(items)}),
    "error-json": lambda items: json.dumps({"error": f"{MARK} model overloaded"}),
    "truncated-json": lambda items: _judge_answer("\n".join(f"{i}: {json.dumps(t)}" for i, t in items))[:-30],
}
TEXTS = [f"评论{k}：这事{'真' * (k % 3)}离谱了吧{k}" for k in range(9)]


def _check_labels(out, texts):
    for t, al in zip(texts, out, strict=True):
        if al is None:
            continue
        assert al.labels == {d: v for d, v in _good(t).items() if d != "keywords"}, t
        assert al.keywords == [t[:3]]
        assert MARK not in json.dumps(al.to_dict(), ensure_ascii=False)


@pytest.mark.parametrize("bad", list(BAD_ANSWERS))
def test_judge_bad_answers_over_http_are_retried_then_unlabelled_never_guessed(bad, tmp_path):
    """The judge answers badly on the first round (plus an HTTP fault); the retry round is good for the
    even texts only. Odd texts stay unlabelled (None), never an error text, never a neighbour's labels."""
    calls: Counter = Counter()

    def script(n, body, headers):
        prompt = body["prompt"]
        items = [(i, json.loads(t)) for i, t in _ITEM_RE.findall(prompt)]
        calls[prompt] += 1
        if calls[prompt] == 1 and n % 2 == 0:
            FAULT_COUNTS["judge-http-503"] += 1
            return _err(503)
        odd = any(int(re.match(r"评论(\d+)", t).group(1)) % 2 for _, t in items)
        if odd or body["seed"] < 1000:  # a first round, or an odd text
            FAULT_COUNTS[f"judge-{bad}"] += 1
            return 200, ok_payload(BAD_ANSWERS[bad](items)), {}
        return 200, ok_payload(_judge_answer(prompt)), {}

    with FakeOpenAI(script) as srv:
        judge = LLMLabeler(_backend(srv.url, retries=2, timeout_s=5), batch_size=1, retries=2)
        with CachedLabeler(judge, tmp_path / "labels.sqlite", chunk_size=3) as lab:
            out = lab.label(TEXTS)
    _check_labels(out, TEXTS)
    assert [al is not None for al in out] == [k % 2 == 0 for k in range(len(TEXTS))]
    assert LabelCache(tmp_path / "labels.sqlite").count() == 5  # only real labels are cached
    assert not grep_tree(tmp_path, [MARK, "愤怒"])


def test_judge_outage_mid_labelling_keeps_committed_labels_and_resumes(tmp_path):
    """The endpoint dies after 2 chunks: a clear BackendError, the cache holds whole chunks, and labelling
    again (healthy endpoint) asks only the rest and gives the uninterrupted result."""
    state = {"down": False, "asked": []}

    def script(n, body, headers):
        if state["down"]:
            FAULT_COUNTS["judge-outage-503"] += 1
            return _err(503, "judge down")
        state["asked"] += [json.loads(t) for _, t in _ITEM_RE.findall(body["prompt"])]
        if len(state["asked"]) >= 4 and not state.get("recovered"):
            state["down"] = True
        return 200, ok_payload(_judge_answer(body["prompt"])), {}

    path = tmp_path / "labels.sqlite"
    with FakeOpenAI(script) as srv:
        judge = LLMLabeler(_backend(srv.url, retries=1, max_concurrency=1), batch_size=1, retries=0)
        with CachedLabeler(judge, path, chunk_size=2) as lab, pytest.raises(BackendError) as ei:
            lab.label(TEXTS)
        assert ei.value.kind == "server_error" and "judge down" in str(ei.value)
        assert LabelCache(path).count() == 4
        state.update(down=False, asked=[], recovered=True)
        with CachedLabeler(judge, path, chunk_size=2) as lab:
            out = lab.label(TEXTS)
    assert sorted(state["asked"]) == sorted(TEXTS[4:])
    assert all(al is not None for al in out)
    _check_labels(out, TEXTS)
    assert not grep_tree(tmp_path, [MARK])


# ------------------------------------------------------------------------------------------ end to end


class FaultProxy:
    """In front of a real server: injects faults (each request at most `per_request` times), forwards
    the rest; `down_after` successful forwards it answers 503 to everything until `healthy()`."""

    E2E_FAULTS = ["429", "500", "502", "503", "reset", "truncated", "not-json", "json-cut", "empty",
                  "no-choices", "502-html"]

    def __init__(self, upstream: str, per_request: int = 2, every: int = 2, down_after: int | None = None):
        u = urlparse(upstream)
        self.host, self.port, self.prefix = u.hostname, u.port, u.path.rstrip("/")
        self.per_request, self.every, self.down_after = per_request, every, down_after
        self.lock = threading.Lock()
        self.faulted: Counter = Counter()
        self.injected: Counter = Counter()
        self.forwarded = 0
        self.down = False
        self.k = 0
        self.srv = FakeOpenAI(self.script)

    def healthy(self):
        with self.lock:
            self.down, self.down_after, self.per_request = False, None, 0

    def script(self, n, body, headers):
        key = (body.get("prompt"), body.get("seed"))
        with self.lock:
            if self.down:
                self.injected["503-down"] += 1
                return _err(503, "endpoint down for maintenance")
            if self.faulted[key] < self.per_request and (n % self.every == 0 or self.faulted[key]):
                self.faulted[key] += 1
                name = self.E2E_FAULTS[self.k % len(self.E2E_FAULTS)]
                self.k += 1
                self.injected[name] += 1
                return FAULTS[name][0]
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        auth = {k: v for k, v in headers.items() if k.lower() == "authorization"}
        conn.request("POST", self.prefix + "/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", **auth})
        resp = conn.getresponse()
        status, payload = resp.status, json.loads(resp.read())
        conn.close()
        with self.lock:
            self.forwarded += 1
            if self.down_after is not None and self.forwarded >= self.down_after:
                self.down = True
        return status, payload, {}


def test_simulate_through_a_faulting_endpoint_then_resume_against_a_healthy_one(cli, mini_server, mini_reference,
                                                                               tmp_path):
    proxy = FaultProxy(mini_server, every=1, down_after=10)
    run = tmp_path / "run"
    env = cli_env(MFLLM_E2E_KEY=SERVE_KEY)  # the key is read from the variable --api-key-env names
    with proxy.srv:
        args = ["simulate", *SIM_ARGS, "--backend", "openai", "--base-url", proxy.srv.url, "--model", DEFAULT_MODEL.name,
                "--api-key-env", "MFLLM_E2E_KEY", "--out", run, "--quiet"]
        t0 = time.monotonic()
        res = cli.run(*args, env=env, timeout=300)
        assert time.monotonic() - t0 < 120
        line = assert_clean_failure(res, "LLM backend error (server_error)", "after 6 attempts", code=3)
        assert "down for maintenance" in line
        assert not (run / "done.json").exists()
        partial = (run / "steps.jsonl").read_bytes().count(b"\n")
        assert 1 <= partial < 16
        assert not grep_tree(run, [MARK])

        proxy.healthy()
        res = cli.run("simulate", "--resume", run, "--quiet", env=env, timeout=300)
        assert res.returncode == 0, res.stderr
    assert_same_run(run, mini_reference)  # the served model through faults == the local model
    assert not grep_tree(run, [MARK, SERVE_KEY])
    assert SERVE_KEY not in res.stdout + res.stderr
    inj = {k: v for k, v in proxy.injected.items()}
    assert inj["503-down"] >= 4 and sum(inj.values()) - inj["503-down"] >= 16, inj  # 6 attempts: <= 2 faults + down
    for k, v in inj.items():
        FAULT_COUNTS[f"e2e-{k}"] += v


def test_resume_against_an_endpoint_that_moved(cli, mini_server, mini_reference, tmp_path):
    """The endpoint goes down for good; the run resumes with --base-url pointing at where it moved, and
    --retries bounds how long a dead endpoint is tried."""
    proxy = FaultProxy(mini_server, per_request=0, down_after=6)
    run = tmp_path / "run"
    env = cli_env(MFLLM_E2E_KEY=SERVE_KEY)
    with proxy.srv:
        res = cli.run("simulate", *SIM_ARGS, "--backend", "openai", "--base-url", proxy.srv.url, "--model",
                      DEFAULT_MODEL.name, "--api-key-env", "MFLLM_E2E_KEY", "--retries", "1", "--timeout", "30",
                      "--out", run, "--quiet", env=env, timeout=300)
        assert_clean_failure(res, "after 2 attempts", code=3)
        stored = json.loads((run / "config.json").read_text())["backend_options"]
        assert stored["retries"] == 1 and stored["base_url"] == proxy.srv.url
        res = cli.run("simulate", "--resume", run, "--quiet", env=env, timeout=300)  # still down: same error
        assert_clean_failure(res, "after 2 attempts", code=3)
        res = cli.run("simulate", "--resume", run, "--base-url", mini_server, "--quiet", env=env, timeout=300)
        assert res.returncode == 0, res.stderr
    assert_same_run(run, mini_reference)
    assert json.loads((run / "config.json").read_text())["backend_options"]["base_url"] == proxy.srv.url
    res = cli.run("simulate", "--resume", tmp_path / "nope", "--base-url", mini_server, "--quiet", timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
