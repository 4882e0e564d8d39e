"""make_backend, and the vLLM backend's request mapping (pure functions: no vLLM, no GPU needed)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
from helpers.tiny_model import tiny_model_dir  # noqa: F401 - pytest fixture

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.backends.registry import make_backend
from mfllm.backends.vllm_engine import (
    build_batch,
    completion_from_output,
    engine_kwargs,
    fit_budget,
    lora_specs,
    sampling_kwargs,
    sum_prompt_logprobs,
    vllm_seed,
)
from mfllm.errors import BackendError, ConfigError, MfllmError

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_make_backend(tiny_model_dir):  # noqa: F811
    hf = make_backend("hf", model=str(tiny_model_dir), device="cpu")
    assert hf.name == "hf" and hf.describe()["model"] == str(tiny_model_dir)
    oa = make_backend("openai", base_url="http://127.0.0.1:9/v1", model="m")
    assert oa.name == "openai"
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("gpt5")
    with pytest.raises(ConfigError, match="openai"):
        make_backend("openai", base_url="http://x/v1", model="m", no_such_option=1)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_how_to_install():
    with pytest.raises(MfllmError, match=r"pip install mfllm\[vllm\]"):
        make_backend("vllm", model="/nowhere")


def test_sampling_kwargs():
    kw = sampling_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=30, stop=("\n",)), 5
    )
    assert kw == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_tokens": 30,
        "stop": ["\n"],
        "seed": 5,
        "skip_special_tokens": True,
    }
    g = sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.5, top_k=3), 1, seed_base=10)
    assert (g["temperature"], g["top_p"], g["top_k"], g["stop"], g["seed"]) == (0.0, 1.0, -1, None, 11)
    assert sampling_kwargs(SamplingParams(top_k=0), 1)["top_k"] == -1
    for s in (-1, 2**70, -(2**70)):
        v = vllm_seed(s)
        assert 0 <= v < 2**63 and v == vllm_seed(s)


def test_lora_specs_and_build_batch():
    specs = lora_specs({"policy": "/a", "meanfield": "/b"})
    assert [(s.name, s.int_id, s.path) for s in specs.values()] == [
        ("policy", 1, "/a"),
        ("meanfield", 2, "/b"),
    ]
    reqs = [
        GenerationRequest("p0", seed=1),
        GenerationRequest("p1", seed=2, adapter="meanfield"),
        GenerationRequest("p2", seed=3, adapter="policy", params=SamplingParams(max_new_tokens=4)),
    ]
    prompts, kws, loras = build_batch(reqs, specs, seed_base=100)
    assert prompts == ["p0", "p1", "p2"]
    assert [k["seed"] for k in kws] == [101, 102, 103] and kws[2]["max_tokens"] == 4
    assert [x.name if x else None for x in loras] == [None, "meanfield", "policy"]
    with pytest.raises(ConfigError, match="unknown LoRA adapter"):
        build_batch([GenerationRequest("p", adapter="x")], specs)
    assert lora_specs(None) == {}


def test_completion_from_output_and_prompt_logprobs():
    out = SimpleNamespace(
        prompt_token_ids=[1, 2, 3, 4],
        num_cached_tokens=3,
        outputs=[SimpleNamespace(text="你好", token_ids=[5, 6], finish_reason="length")],
    )
    c = completion_from_output(out)
    assert (c.text, c.prompt_tokens, c.generated_tokens, c.finish_reason, c.cached_prompt_tokens) == (
        "你好",
        4,
        2,
        "length",
        3,
    )
    c2 = completion_from_output(
        SimpleNamespace(
            prompt_token_ids=[1], outputs=[SimpleNamespace(text="a", token_ids=[2], finish_reason="stop")]
        )
    )
    assert c2.finish_reason == "stop" and c2.cached_prompt_tokens == 0
    with pytest.raises(BackendError):
        completion_from_output(SimpleNamespace(outputs=[]))
    lp = [
        None,
        {2: SimpleNamespace(logprob=-1.0)},
        {3: SimpleNamespace(logprob=-0.5), 9: SimpleNamespace(logprob=-3)},
    ]
    assert sum_prompt_logprobs(lp, [1, 2, 3], 1) == -1.5
    assert sum_prompt_logprobs(lp, [1, 2, 3], 2) == -0.5
    with pytest.raises(BackendError):
        sum_prompt_logprobs(lp, [1, 2, 4], 2)


def test_engine_kwargs_keep_seeds_honoured_on_cpu():
    """On CPU chunked prefill is off (a seeded request would crash vLLM's sampler), and asking for it is refused,
    so a seed is never silently dropped; float32 for dtype auto; user arguments win otherwise."""
    cpu = engine_kwargs("m", on_cpu=True, seed_base=7, n_adapters=2, max_lora_rank=8)
    assert (cpu["enable_chunked_prefill"], cpu["enforce_eager"], cpu["dtype"], cpu["seed"]) == (False, True, "float32", 7)
    assert (cpu["enable_lora"], cpu["max_loras"], cpu["max_lora_rank"]) == (True, 2, 8)
    assert "gpu_memory_utilization" not in cpu and cpu["kv_cache_memory_bytes"] == 1 << 30
    assert engine_kwargs("m", on_cpu=True, dtype="bfloat16", enforce_eager=False)["enforce_eager"] is False
    with pytest.raises(ConfigError, match="chunked prefill") as e:
        engine_kwargs("m", on_cpu=True, enable_chunked_prefill=True)
    assert e.value.field == "enable_chunked_prefill"
    gpu = engine_kwargs("m", on_cpu=False, enable_chunked_prefill=True, max_model_len=1024)
    assert (gpu["enable_chunked_prefill"], gpu["dtype"], gpu["max_model_len"], gpu["gpu_memory_utilization"]) == (
        True, "auto", 1024, 0.85)
    assert "enable_lora" not in gpu


def test_fit_budget_is_the_hf_rule():
    reqs = [GenerationRequest("a", seed=1, params=SamplingParams(max_new_tokens=48)),
            GenerationRequest("b", seed=2, params=SamplingParams(max_new_tokens=10), adapter="policy")]
    out, capped = fit_budget(reqs, [300, 300], 320)
    assert capped == 1 and [r.params.max_new_tokens for r in out] == [20, 10]
    assert (out[0].seed, out[1].adapter) == (1, "policy") and reqs[0].params.max_new_tokens == 48
    assert fit_budget(reqs, [300, 300], 0) == (reqs, 0)
    with pytest.raises(BackendError, match="no room") as e:
        fit_budget(reqs, [320, 1], 320)
    assert e.value.kind == "context_length"
