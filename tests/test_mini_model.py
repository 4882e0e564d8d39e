"""The shipped mfllm-mini checkpoint, loaded like any Hugging Face model through the hf backend."""

import json

import pytest

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.data.load import load_events
from mfllm.data.state import agent_state_text
from mfllm.paths import MINI_MODEL, SAMPLE_DATA
from mfllm.prompts.templates import action_to_target, policy_prefix, policy_suffix, render_context
from mfllm.training.mini import UNIGRAM_FILE, unigram_nll


@pytest.fixture(scope="module")
def backend():
    from mfllm.backends.hf import HFBackend

    return HFBackend(MINI_MODEL)


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
    files = {p.name: p.stat().st_size for p in MINI_MODEL.iterdir()}
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
    counts = {int(k): v for k, v in json.loads((MINI_MODEL / UNIGRAM_FILE).read_text()).items()}
    tok = backend.tokenizer
    uni = sum(unigram_nll(counts, len(tok), tok(t + eos, add_special_tokens=False)["input_ids"]) for _, t in held_out)
    assert all(s < 0 for s, _ in scored)
    assert model_nll < 0.9 * uni, (model_nll, uni)  # measured: about 23% lower on the shipped sample


def test_training_checkpoint_is_atomic_and_survives_a_kill_between_renames(tmp_path):
    """save_checkpoint swaps whole folders (mfllm.files.atomic_dir): a failed save keeps the old checkpoint, and
    a kill between the two renames is undone by recover_dir (as train_mini does on start)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mfllm.files import recover_dir
    from mfllm.training.mini import load_checkpoint, save_checkpoint

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)

    def opt_factory(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-2)

    opt = opt_factory(model)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    ckpt = tmp_path / "checkpoint"
    save_checkpoint(ckpt, model, opt, 1, [{"step": 1}])

    class Boom(RuntimeError):
        pass

    class Broken:  # fails half-way through writing the next checkpoint
        def save_pretrained(self, path, **_kw):
            path.mkdir(parents=True)
            (path / "config.json").write_text("{")
            raise Boom

    with pytest.raises(Boom):
        save_checkpoint(ckpt, Broken(), opt, 2, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp folder left behind
    ckpt.rename(tmp_path / "checkpoint.old")  # a kill after the first rename of the next save
    recover_dir(ckpt)
    m2, _, step, history = load_checkpoint(ckpt, LlamaForCausalLM, opt_factory)
    assert step == 1 and history == [{"step": 1}]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True))
