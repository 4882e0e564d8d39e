"""The official `openai` SDK against a real `mfllm serve` (in a thread, on 127.0.0.1, the shipped default model):
streaming, n>1, models.retrieve, chat templates, context overflow and OpenAI's error shape."""

from __future__ import annotations

import json
import shutil
import threading

import httpx
import openai
import pytest
from conftest import SIM_ARGS, cli_inproc
from helpers.fake_openai import FakeOpenAI
from helpers.tiny_model import make_tiny_lora, tiny_model_dir  # noqa: F401 - pytest fixture

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.backends.hf import HFBackend
from mfllm.backends.openai_api import OpenAIBackend
from mfllm.backends.server import make_server
from mfllm.errors import BackendError
from mfllm.paths import DEFAULT_MODEL
from mfllm.seeds import derive_seed

PROMPT = "系统：你是一名微博用户。事件：地震后网友转发消息，官方回应辟谣。你的评论："
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _start(backend, name=None):
    srv = make_server(backend, "127.0.0.1", 0, model_name=name, api_key_env=None)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _stop(srv):
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def mini():
    be = HFBackend(DEFAULT_MODEL, device="cpu")
    srv = _start(be)  # served under its directory name, DEFAULT_MODEL.name
    yield be, srv
    _stop(srv)


def _sdk(srv, retries=0):
    return openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=retries, timeout=60)


def _sampled(**kw):
    return {"model": DEFAULT_MODEL.name, "max_tokens": 8, "temperature": 1.0, "seed": 11, **kw}


def test_streamed_completion_is_the_plain_one_in_chunks_ending_with_done(mini):
    _, srv = mini
    client = _sdk(srv)
    plain = client.completions.create(prompt=PROMPT, **_sampled())
    chunks = list(
        client.completions.create(
            prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **_sampled()
        )
    )
    assert all(isinstance(c, openai.types.Completion) for c in chunks)
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in body) == plain.choices[0].text != ""
    assert body[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage  # stream_options.include_usage
    assert all(c.usage is None for c in body)
    # on the wire: server-sent events, the last one `data: [DONE]`
    raw = httpx.post(f"{srv.url}/completions", json={"prompt": PROMPT, "stream": True, **_sampled()})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: ") :])["object"] == "text_completion"
    # without include_usage no usage chunk
    assert all(c.choices for c in client.completions.create(prompt=PROMPT, stream=True, **_sampled()))


def test_streamed_chat_deltas_add_up_to_the_plain_answer(mini):
    _, srv = mini
    client = _sdk(srv)
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(messages=messages, **_sampled())
    chunks = list(
        client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **_sampled()
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == plain.choices[0].message.content != ""
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens > 0


def test_n2_gives_two_seeded_choices_per_prompt(mini):
    be, srv = mini
    client = _sdk(srv)
    one = client.completions.create(prompt=[PROMPT, "今天"], **_sampled())
    two = client.completions.create(prompt=[PROMPT, "今天"], n=2, **_sampled())
    assert [c.index for c in two.choices] == [0, 1, 2, 3]  # prompt-major, vLLM's order
    # choice 0 of a prompt is the n=1 answer; choice 1 uses the derived seed
    assert [two.choices[0].text, two.choices[2].text] == [c.text for c in one.choices]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8)
    direct = be.generate(
        [GenerationRequest(p, seed=derive_seed(11, 1), params=params) for p in (PROMPT, "今天")]
    )
    assert [two.choices[1].text, two.choices[3].text] == [c.text for c in direct]
    assert two.choices[0].text != two.choices[1].text
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # each prompt counted once
    assert (
        two.usage.completion_tokens == sum(c.generated_tokens for c in direct) + one.usage.completion_tokens
    )

    chat = client.chat.completions.create(messages=[{"role": "user", "content": PROMPT}], n=2, **_sampled())
    assert [c.index for c in chat.choices] == [0, 1]
    assert (
        chat.choices[0].message.content == two.choices[0].text
    )  # no chat template: the content is the prompt
    streamed = list(
        client.chat.completions.create(
            messages=[{"role": "user", "content": PROMPT}], n=2, stream=True, **_sampled()
        )
    )
    by_index = {0: "", 1: ""}
    for c in streamed:
        by_index[c.choices[0].index] += c.choices[0].delta.content or ""
    assert by_index == {0: chat.choices[0].message.content, 1: chat.choices[1].message.content}


def test_models_retrieve_and_list(mini):
    _, srv = mini
    client = _sdk(srv)
    m = client.models.retrieve(DEFAULT_MODEL.name)
    assert m.id == DEFAULT_MODEL.name and m.object == "model"
    assert [x.id for x in client.models.list()] == [DEFAULT_MODEL.name]
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("gpt-4o")
    assert ei.value.code == "model_not_found"


def test_context_overflow_is_400_and_nobody_retries_it(mini, monkeypatch):
    _, srv = mini
    calls = []
    submit = srv.batcher.submit
    monkeypatch.setattr(srv.batcher, "submit", lambda reqs: calls.append(len(reqs)) or submit(reqs))
    too_long = "微博" * 2000
    with pytest.raises(openai.BadRequestError) as ei:
        _sdk(srv, retries=3).completions.create(prompt=too_long, **_sampled())
    err = ei.value
    assert err.status_code == 400 and err.code == "context_length_exceeded" and err.param == "prompt"
    assert err.type == "invalid_request_error" and "320" in err.message
    assert calls == [1]  # the SDK (max_retries=3) sent it once
    with pytest.raises(openai.BadRequestError) as ei:
        _sdk(srv).chat.completions.create(messages=[{"role": "user", "content": too_long}], **_sampled())
    assert ei.value.code == "context_length_exceeded" and ei.value.param == "messages"
    # scoring (echo + logprobs) too
    raw = httpx.post(
        f"{srv.url}/completions",
        json={"prompt": too_long, "echo": True, "logprobs": 0, "max_tokens": 0},
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "context_length_exceeded"
    # our own openai backend: one HTTP request, then a clear error (no retries of a 4xx)
    calls.clear()
    be = OpenAIBackend(srv.url, DEFAULT_MODEL.name, retries=5, backoff_base_s=0.01)
    with pytest.raises(BackendError) as bi:
        be.generate([GenerationRequest(too_long, seed=1, params=SamplingParams(max_new_tokens=4))])
    assert bi.value.kind == "bad_request" and "context" in str(bi.value)
    assert be.http_requests == 1 and calls == [1]


@pytest.mark.parametrize("status", [400, 401, 404, 408, 409, 422, 429, 500])
def test_our_openai_backend_retries_exactly_what_the_sdk_retries(status):
    def script(n, body, headers):  # retry-after-ms: the SDK's wait between retries, kept short here
        return (
            status,
            {"error": {"message": "no", "type": "x", "param": None, "code": None}},
            {"retry-after-ms": "5"},
        )

    with FakeOpenAI(script) as srv:
        with pytest.raises(openai.APIStatusError):
            openai.OpenAI(base_url=srv.url, api_key="k", max_retries=2).completions.create(
                model="m", prompt="x"
            )
        sdk_attempts = srv.count
    with FakeOpenAI(script) as srv:
        be = OpenAIBackend(srv.url, "m", retries=2, backoff_base_s=0.005, backoff_max_s=0.01)
        with pytest.raises(BackendError):
            be.generate([GenerationRequest("x", seed=1)])
        ours = srv.count
    assert ours == sdk_attempts == (3 if status in (408, 409, 429) or status >= 500 else 1)


def test_error_objects_have_the_sdk_shape(mini):
    _, srv = mini
    for body, status, code, param in (
        ({"prompt": PROMPT, "temperature": "hot"}, 400, None, "temperature"),
        ({"prompt": PROMPT, "model": "nope"}, 404, "model_not_found", "model"),
        ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, None, "stream_options"),
        ({"prompt": PROMPT, "n": 1000}, 400, None, "n"),
    ):
        r = httpx.post(f"{srv.url}/completions", json=body)
        assert r.status_code == status
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
        assert (err["code"], err["param"]) == (code, param), body
    with pytest.raises(openai.BadRequestError) as ei:
        _sdk(srv).completions.create(prompt=PROMPT, model=DEFAULT_MODEL.name, temperature=-1)
    assert ei.value.param == "temperature" and ei.value.code is None


@pytest.fixture(scope="module")
def templated(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """The tiny model with a chat template (starting with the BOS token) and a tokenizer that adds BOS itself."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("templated")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = "{{ bos_token }}" + TEMPLATE
    tok.save_pretrained(path)
    be = HFBackend(path, device="cpu")
    srv = _start(be, "templated")
    yield be, srv
    _stop(srv)


def test_chat_uses_the_models_chat_template(templated):
    be, srv = templated
    client = _sdk(srv)
    messages = [{"role": "system", "content": "你是网友"}, {"role": "user", "content": "今天地震了"}]
    rendered = be.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|system|>你是网友</s><|user|>今天地震了</s><|assistant|>"
    assert be.tokenizer("x")["input_ids"][0] == be.tokenizer.bos_token_id
    kw = {"model": "templated", "max_tokens": 6, "temperature": 1.0, "seed": 5}
    chat = client.chat.completions.create(messages=messages, **kw)
    plain = client.completions.create(
        prompt=rendered.removeprefix("<s>"), **kw
    )  # BOS once, from the tokenizer
    joined = client.completions.create(prompt="你是网友\n今天地震了", **kw)
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens != joined.usage.prompt_tokens
    assert chat.choices[0].message.content == plain.choices[0].text


def test_openai_backend_without_a_model_uses_the_servers_only_one(tiny_model_dir, tmp_path):  # noqa: F811
    adapter = make_tiny_lora(tiny_model_dir, tmp_path / "lora")
    srv = _start(HFBackend(tiny_model_dir, device="cpu", adapters={"policy": adapter}), "tiny")
    try:
        cards = {m.id: m for m in _sdk(srv).models.list()}
        assert set(cards) == {"tiny", "policy"} and cards["policy"].parent == "tiny"
        be = OpenAIBackend(srv.url, retries=0)  # the adapter is not a second model
        assert be.model == "tiny" and be.describe()["model"] == "tiny"
        out = be.generate([GenerationRequest("今天", seed=1, params=SamplingParams(max_new_tokens=3))])
        assert out[0].generated_tokens == 3
    finally:
        _stop(srv)


def test_simulate_against_mfllm_serve_with_no_model_option(mini, tmp_path):
    _, srv = mini
    res = cli_inproc(
        "simulate",
        *SIM_ARGS,
        "--limit",
        "1",
        "--backend",
        "openai",
        "--base-url",
        srv.url,
        "--out",
        tmp_path / "run",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["backend"]["model"] == DEFAULT_MODEL.name and cfg["model"] == DEFAULT_MODEL.name
    # the server's model, asked for by name, is the shipped decide model: its header is split off, as in a local run
    assert cfg["sim"]["decision_header"] is True and cfg["sim"]["meanfield"] == "stats-compact8"
    recs = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text(encoding="utf-8").splitlines()]
    acts = [a for r in recs if r["phase"] == "rollout" for a in r["actions"]]
    assert acts and all("decision" in a for a in acts) and any(a["decision"] for a in acts)
    assert not any((a["sim_text"] or "").startswith("【") and a["decision"] for a in acts)


def test_serve_command_defaults_to_the_shipped_model(monkeypatch):
    import mfllm.cli.serve as serve_cli

    got = {}
    monkeypatch.setattr(serve_cli, "serve", lambda model, *a, **kw: got.setdefault("model", model))
    res = cli_inproc("serve", "--port", "0")
    assert res.returncode == 0, res.stderr
    assert got["model"] == str(DEFAULT_MODEL)
