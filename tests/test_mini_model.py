"""The shipped mfllm-mini checkpoint, loaded like any Hugging Face model through the hf backend."""

import json

import pytest

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.data.load import load_events
from mfllm.data.state import agent_state_text
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.prompts.templates import action_to_target, policy_prefix, policy_suffix, render_context
from mfllm.training.mini import UNIGRAM_FILE, unigram_nll


@pytest.fixture(scope="module")
def backend():
    from mfllm.backends.hf import HFBackend

    return HFBackend(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def held_out():
    """Real actions of shipped test-split events (never seen in training), with their prompts."""
    ev = load_events(SAMPLE_DATA, limit=3).events
    rows = []
    for e in ev:
        prefix = policy_prefix(e.source.text, render_context("state", "zh"), "zh")
        for a in e.actions[:12]:
            rows.append((prefix + policy_suffix(agent_state_text(a.profile, "zh", depth=a.depth), "zh"),
                         action_to_target(a.text, "zh")))
    return rows


def test_checkpoint_is_small_and_safetensors():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    assert sum(files.values()) <= 20 * 1024 * 1024


def test_generates_chinese_actions(backend, held_out):
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=32, stop=("\n",))
    out = backend.generate([GenerationRequest(p, seed=i, params=params) for i, (p, _) in enumerate(held_out[:16])])
    assert len(out) == 16 and all(c.prompt_tokens > 0 for c in out)
    texts = [c.text.strip() for c in out]
    cjk = sum(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts)
    reposts = sum(t == "[转发]" for t in texts)
    assert cjk + reposts >= 12, texts  # Chinese comments or the explicit repost marker, not noise


def test_scores_and_beats_the_marginal_baseline_on_held_out_actions(backend, held_out):
    eos = backend.tokenizer.eos_token
    scored = backend.score_tokens([p for p, _ in held_out], [t + eos for _, t in held_out])
    model_nll = -sum(s for s, _ in scored)
    counts = {int(k): v for k, v in json.loads((DEFAULT_MODEL / UNIGRAM_FILE).read_text()).items()}
    tok = backend.tokenizer
    uni = sum(unigram_nll(counts, len(tok), tok(t + eos, add_special_tokens=False)["input_ids"]) for _, t in held_out)
    assert all(s < 0 for s, _ in scored)
    assert model_nll < 0.9 * uni, (model_nll, uni)  # measured: about 23% lower on the shipped sample
