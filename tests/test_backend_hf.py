"""HFBackend on a tiny real model: seeded batch-invariant sampling, shared-prefix reuse, stops, scoring, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny_model import make_tiny_lora, tiny_model_dir  # noqa: F401 - pytest fixture

from mfllm.backends.base import Backend, GenerationRequest, SamplingParams
from mfllm.backends.hf import HFBackend, request_key, sample_next, uniforms
from mfllm.errors import BackendError, ConfigError

PREFIX = (
    "系统：你是一名微博用户，请根据事件和舆论写一条评论。事件：地震后网友转发消息，官方回应辟谣，"
    "记者已经求证。平均场：大家都很关注，有人支持官方，有人不信。你的状态："
)
STATES = ["", "支持", "反对官方的通报", "心疼孩子们啊！", "不信", "怎么回事？为什么没有通报？？", "加油加油"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=10)
HOT = SamplingParams(temperature=1.3, top_p=1.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def be(tiny_model_dir):  # noqa: F811
    return HFBackend(tiny_model_dir, device="cpu", batch_size=64, min_prefix_tokens=8)


def _reqs(params, seed0=100, states=STATES):
    return [GenerationRequest(PREFIX + s, seed=seed0 + i, params=params) for i, s in enumerate(states)]


def _texts(outs):
    return [(c.text, c.generated_tokens, c.finish_reason) for c in outs]


# ---------------------------------------------------------------- sampler


def test_uniforms_are_a_pure_function_of_key_and_step():
    keys = [request_key(s) for s in range(2000)]
    k0 = torch.tensor([k[0] for k in keys])
    k1 = torch.tensor([k[1] for k in keys])
    u = uniforms(k0, k1, torch.full_like(k0, 3))
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert abs(float(u.mean()) - 0.5) < 0.03
    # the same key and step give the same number whatever the batch around it
    assert torch.equal(uniforms(k0[5:6], k1[5:6], torch.tensor([3])), u[5:6])
    assert not torch.equal(uniforms(k0, k1, torch.full_like(k0, 4)), u)
    assert request_key(1, seed_base=0) != request_key(1, seed_base=1)
    assert request_key(10**30) == request_key(10**30)  # any Python int


def test_sample_next_matches_the_distribution_and_masks():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 4000
    logits = torch.log(probs).clamp(min=-1e9).expand(n, 5)
    keys = [request_key(s) for s in range(n)]
    k0 = torch.tensor([k[0] for k in keys])
    k1 = torch.tensor([k[1] for k in keys])
    u = uniforms(k0, k1, torch.zeros_like(k0))

    def draw(temp=1.0, top_p=1.0, top_k=0):
        return sample_next(
            logits,
            torch.full((n,), temp),
            torch.full((n,), top_p),
            torch.full((n,), top_k, dtype=torch.long),
            u,
        )

    freq = torch.bincount(draw(), minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.03)
    assert int(freq[4]) == 0
    assert bool((draw(temp=0.0) == 0).all())  # greedy
    assert bool((draw(top_k=1) == 0).all())
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.7).tolist()) == {0, 1}  # 0.5 + 0.25 >= 0.7
    # ties at the top-k boundary are kept together (independent of the sort's tie order)
    tied = torch.tensor([[1.0, 1.0, 1.0, -5.0]])
    got = {
        int(sample_next(tied, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2]), uu.view(1)))
        for uu in torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    }
    assert got == {0, 1, 2}


# ---------------------------------------------------------------- generation


def test_is_a_backend(be):
    assert isinstance(be, Backend)
    d = be.describe()
    json.dumps(d)
    assert d["backend"] == "hf" and d["prefix_cache"] is True


@pytest.mark.parametrize("params", [GREEDY, SAMPLED, HOT], ids=["greedy", "sampled", "hot"])
def test_prefix_reuse_batching_and_position_do_not_change_outputs(be, params):
    reqs = _reqs(params)
    be.prefix_cache = True
    with_prefix = be.generate(reqs)
    assert all(c.cached_prompt_tokens > 8 for c in with_prefix)
    be.prefix_cache = False
    try:
        plain = be.generate(reqs)
        alone = [be.generate([r])[0] for r in reqs]
    finally:
        be.prefix_cache = True
    assert all(c.cached_prompt_tokens == 0 for c in plain)
    assert _texts(with_prefix) == _texts(plain) == _texts(alone)
    # reversed order, other batch sizes (chunks), mixed with unrelated prompts
    other = [GenerationRequest("今天微博上" + "很" * k, seed=7 + k, params=params) for k in range(4)]
    mixed = be.generate(other[:2] + list(reversed(reqs)) + other[2:])
    assert _texts(list(reversed(mixed[2:9]))) == _texts(alone)
    be.batch_size = 3
    try:
        chunked = be.generate(reqs)
    finally:
        be.batch_size = 64
    assert _texts(chunked) == _texts(alone)
    assert [c.prompt_tokens for c in with_prefix] == [c.prompt_tokens for c in plain]


def test_seeds_and_mixed_params_in_one_batch(be):
    a = be.generate(_reqs(SAMPLED, seed0=1))
    b = be.generate(_reqs(SAMPLED, seed0=1))
    c = be.generate(_reqs(SAMPLED, seed0=50))
    assert _texts(a) == _texts(b)
    assert sum(x.text != y.text for x, y in zip(a, c, strict=True)) >= 5
    # rows with different params and lengths in one batch equal each row alone
    mixed = [
        GenerationRequest(PREFIX + "支持", seed=3, params=GREEDY),
        GenerationRequest(PREFIX + "不信", seed=4, params=SamplingParams(temperature=0.7, max_new_tokens=3)),
        GenerationRequest(
            PREFIX + "加油", seed=5, params=SamplingParams(temperature=1.0, top_k=5, max_new_tokens=14)
        ),
        GenerationRequest(PREFIX, seed=6, params=SamplingParams(max_new_tokens=0)),
    ]
    together = be.generate(mixed)
    alone = [be.generate([r])[0] for r in mixed]
    assert _texts(together) == _texts(alone)
    assert [x.generated_tokens for x in together] == [10, 3, 14, 0]
    assert [x.finish_reason for x in together] == ["length"] * 4


def test_stop_strings(be):
    base = be.generate(_reqs(GREEDY, states=STATES[:3]))
    text = base[1].text
    stop = next(
        text[i : i + 1] for i in range(2, len(text)) if text[i : i + 1].strip() and text.find(text[i]) >= 2
    )
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop=(stop, "never-seen"))
    reqs = _reqs(GREEDY, states=STATES[:3])
    reqs[1] = GenerationRequest(reqs[1].prompt, seed=reqs[1].seed, params=params)
    outs = be.generate(reqs)
    assert outs[1].text == text[: text.find(stop)]
    assert outs[1].finish_reason == "stop"
    assert 1 <= outs[1].generated_tokens <= base[1].generated_tokens
    assert _texts([outs[0], outs[2]]) == _texts([base[0], base[2]])  # the others are untouched
    assert _texts([be.generate([reqs[1]])[0]]) == _texts([outs[1]])
    be.stop_check_interval = 1
    try:
        assert _texts([be.generate([reqs[1]])[0]]) == _texts([outs[1]])  # counts don't depend on the interval
    finally:
        be.stop_check_interval = 4


def test_eos_ends_a_row(be):
    prompt = PREFIX + "支持"
    ids = be.encode([prompt])[0]
    with torch.inference_mode():
        x = torch.tensor([ids])
        t1 = int(be._lm(input_ids=x).logits[0, -1].argmax())
        t2 = int(be._lm(input_ids=torch.tensor([ids + [t1]])).logits[0, -1].argmax())
    old = set(be.eos_token_ids)
    try:
        be.eos_token_ids = {t1}
        c = be.generate([GenerationRequest(prompt, params=GREEDY)])[0]
        assert (c.text, c.generated_tokens, c.finish_reason) == ("", 1, "stop")
        if t2 != t1:
            be.eos_token_ids = {t2}
            c = be.generate([GenerationRequest(prompt, params=GREEDY)])[0]
            assert c.generated_tokens == 2 and c.finish_reason == "stop"
            assert c.text == be.tokenizer.decode([t1], skip_special_tokens=True)
    finally:
        be.eos_token_ids = old


def test_stats_are_counted(tiny_model_dir):  # noqa: F811
    b = HFBackend(tiny_model_dir, device="cpu", min_prefix_tokens=8)
    outs = b.generate(_reqs(GREEDY))
    st = b.stats.to_dict()
    assert st["calls"] == 1 and st["requests"] == len(STATES)
    assert st["prompt_tokens"] == sum(c.prompt_tokens for c in outs)
    assert st["generated_tokens"] == sum(c.generated_tokens for c in outs) == 10 * len(STATES)
    assert 0 < st["cached_prompt_tokens"] < st["prompt_tokens"]
    assert b.generate([]) == []


# ---------------------------------------------------------------- scoring


def test_score_matches_a_direct_forward(be):
    prompts = [PREFIX + "支持", "今天", PREFIX]
    conts = ["大家加油！", "微博热搜", ""]
    got = be.score_tokens(prompts, conts)
    assert got[2] == (0.0, 0)
    for (s, n), p, c in zip(got[:2], prompts[:2], conts[:2], strict=True):
        p_ids = be.encode([p])[0]
        c_ids = be.encode([c], add_special_tokens=False)[0]
        with torch.inference_mode():
            logits = be._lm(input_ids=torch.tensor([p_ids + c_ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[len(p_ids) - 1 + k, t]) for k, t in enumerate(c_ids))
        assert n == len(c_ids)
        assert s == pytest.approx(want, abs=1e-3)
        assert s < 0
    alone = [be.score([p], [c])[0] for p, c in zip(prompts, conts, strict=True)]
    assert be.score(prompts, conts) == pytest.approx(alone, abs=1e-4)
    with pytest.raises(ValueError):
        be.score(["a"], [])


# ---------------------------------------------------------------- adapters / loading


def test_lora_adapters_select_per_request(tiny_model_dir, tmp_path):  # noqa: F811
    pol = make_tiny_lora(tiny_model_dir, tmp_path / "policy", seed=1)
    mf = make_tiny_lora(tiny_model_dir, tmp_path / "meanfield", seed=2)
    b = HFBackend(
        tiny_model_dir, device="cpu", adapters={"policy": pol, "meanfield": mf}, min_prefix_tokens=8
    )
    plain = HFBackend(tiny_model_dir, device="cpu", min_prefix_tokens=8)
    reqs = _reqs(GREEDY, states=STATES[:3])

    def with_adapter(name):
        return [GenerationRequest(r.prompt, seed=r.seed, params=r.params, adapter=name) for r in reqs]

    base_out = _texts(b.generate(with_adapter(None)))
    assert base_out == _texts(plain.generate(reqs))
    pol_out = _texts(b.generate(with_adapter("policy")))
    mf_out = _texts(b.generate(with_adapter("meanfield")))
    assert pol_out != base_out and mf_out != base_out and pol_out != mf_out
    # a mixed batch is grouped by adapter and gives the same as separate calls
    mixed = [
        with_adapter("policy")[0],
        with_adapter(None)[1],
        with_adapter("meanfield")[2],
        with_adapter(None)[0],
    ]
    assert _texts(b.generate(mixed)) == [pol_out[0], base_out[1], mf_out[2], base_out[0]]
    assert b.describe()["adapters"] == {"policy": str(pol), "meanfield": str(mf)}
    s_base = b.score([PREFIX], ["大家加油"])[0]
    s_pol = b.score([PREFIX], ["大家加油"], adapter="policy")[0]
    assert s_base == pytest.approx(plain.score([PREFIX], ["大家加油"])[0], abs=1e-4) and s_pol != s_base
    with pytest.raises(ConfigError, match="unknown LoRA adapter"):
        b.generate(with_adapter("nope"))
    with pytest.raises(ConfigError, match="unknown LoRA adapter"):
        plain.generate(with_adapter("policy"))


def test_loading_errors(tmp_path, tiny_model_dir):  # noqa: F811
    with pytest.raises(ConfigError, match="config.json"):
        HFBackend(tmp_path / "missing")
    # a directory holding only pickle weights is refused (never unpickle)
    d = tmp_path / "pickled"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tiny_model_dir / f).read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConfigError, match="safetensors"):
        HFBackend(d, device="cpu")
    with pytest.raises(ConfigError, match="dtype"):
        HFBackend(tiny_model_dir, device="cpu", dtype="int3")


def test_groups_with_different_prefixes_each_reuse_their_own(be):
    other = "系统：你是一名新闻记者。事件：台风登陆，学校停课，医院通报伤者情况。平均场：大家都很心疼孩子。你的状态："
    reqs = []
    for i, s in enumerate(STATES):
        reqs.append(GenerationRequest(PREFIX + s, seed=i, params=SAMPLED))
        reqs.append(GenerationRequest(other + s, seed=50 + i, params=SAMPLED))
    reqs.append(GenerationRequest("今天", seed=99, params=SAMPLED))  # shares nothing
    outs = be.generate(reqs)
    assert all(c.cached_prompt_tokens >= 8 for c in outs[:-1]) and outs[-1].cached_prompt_tokens == 0
    be.prefix_cache = False
    try:
        alone = [be.generate([r])[0] for r in reqs]
    finally:
        be.prefix_cache = True
    assert _texts(outs) == _texts(alone)


def test_context_length_is_checked(be):
    with pytest.raises(BackendError) as ei:
        be.generate([GenerationRequest("微博" * 2000, params=GREEDY)])
    assert ei.value.kind == "context_length"


def test_new_token_budget_is_cut_to_fit_the_context(be):
    reps = 1
    while len(be._encode_prompts(["微博" * (reps * 2)])[0]) < be.max_context - 12:
        reps *= 2
    prompt = "微博" * reps
    room = be.max_context - len(be._encode_prompts([prompt])[0])
    assert 0 < room <= be.max_context
    before = be.stats.budget_capped
    big = SamplingParams(temperature=1.0, max_new_tokens=room + 50)
    out = be.generate([GenerationRequest(prompt, seed=3, params=big)])[0]
    assert out.generated_tokens <= room
    assert be.stats.budget_capped == before + 1
    # the cut request generates exactly what a request asking for the room would
    fit = be.generate([GenerationRequest(prompt, seed=3, params=SamplingParams(temperature=1.0, max_new_tokens=room))])[0]
    assert fit.text == out.text and be.stats.budget_capped == before + 1
