"""IB-Tune on the tiny real model and a few real sample events (the sample is the "training data" here).

The estimator is checked against the exact gradient: with one-token summaries m, q(m|X) is a softmax over
the vocabulary, so J = sum_m q(m) [R(m) - beta (log q(m) - log p0(m))] is computed exactly by enumeration.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from helpers.tiny_model import make_tiny_lora, tiny_model_dir  # noqa: F401 - pytest fixture

from mfllm.data.load import load_events
from mfllm.errors import ConfigError
from mfllm.paths import SAMPLE_DATA
from mfllm.prompts.templates import meanfield_prompt
from mfllm.training import ibtune as ib


@pytest.fixture(scope="module")
def events():
    """Three real sample events, each cut to its first 12 actions (3 steps of 4 agents)."""
    evs = load_events(SAMPLE_DATA / "events.jsonl", split="all", limit=3).events
    return [dataclasses.replace(e, actions=e.actions[:12]) for e in evs]


def _cfg(out, base, **kw):
    d = dict(out=str(out), base=str(base), device="cpu", step_size=4, max_steps=3, targets_per_unit=2,
             mf_max_new_tokens=4, units_per_event=1, batch_size=2, samples_k=3, lora_rank=4, lora_alpha=8,
             lr=1e-2, warmup_steps=0, steps=3, val_units=2, val_events=2, agents_per_step=2, eval_every=2,
             micro_batch=64, seed=0)
    d.update(kw)
    return ib.TuneConfig(**d)


def _grads(roles):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in roles.parameters()])


def _zero(roles):
    for p in roles.parameters():
        p.grad = None


# ---------------------------------------------------------------- stage 1: the estimator


@pytest.fixture(scope="module")
def one_token(tiny_model_dir, events, tmp_path_factory):  # noqa: F811
    """A mean-field role writing one-token summaries, one history, and R(m) for every m in the vocabulary."""
    cfg = _cfg(tmp_path_factory.mktemp("s1"), tiny_model_dir, mf_max_new_tokens=1, beta=0.5)
    roles = ib.Roles(tiny_model_dir, "cpu")
    roles.add_trainable("meanfield", rank=4, alpha=8, seed=0)
    unit = ib.build_units(events, cfg, 1, random.Random(0), roles)[0]
    clip = [(s[:12], a[:12]) for s, a in unit.pairs], [(s[:12], a[:12]) for s, a in unit.targets]
    unit = dataclasses.replace(unit, event_text=unit.event_text[:16], previous=unit.previous[:20], pairs=clip[0],
                               targets=clip[1])  # shorter real texts: R is scored for all 600 summaries
    tok = roles.tokenizer
    texts = [" ".join(tok.decode([i], skip_special_tokens=True).split("\n", 1)[0].split())
             for i in range(roles.newline_mask.numel())]
    reward = ib.score_reward(roles, [unit], [texts], cfg, None)[0].float()  # the frozen policy: fixed R(m)
    return roles, cfg, unit, reward


def _exact_objective(roles, cfg, unit, reward, beta):
    p = roles.encode_prompts([meanfield_prompt(unit.event_text, unit.previous, unit.pairs, cfg.lang)])[0]
    p0 = roles.encode_prompts([ib.prior_prompt(unit.event_text, cfg.lang)])[0]
    with torch.no_grad(), roles.active(None) as ref:
        lp0 = torch.log_softmax(ref(input_ids=torch.tensor([p0])).logits[0, -1].float(), -1)
    with roles.active("meanfield") as m:
        lq = torch.log_softmax(m(input_ids=torch.tensor([p])).logits[0, -1].float(), -1)
    return (lq.exp() * (reward - beta * (lq - lp0))).sum()


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_estimator_points_along_the_exact_gradient(one_token, beta):
    roles, cfg, unit, reward = one_token
    assert float(reward.max() - reward.min()) > 0.1  # the policy's likelihood of the next actions depends on m
    _zero(roles)
    _exact_objective(roles, cfg, unit, reward, beta).backward()
    exact = _grads(roles)
    _zero(roles)
    cfg = cfg.model_copy(update=dict(beta=beta, samples_k=128 if beta == 0 else 256))  # the KL term adds variance
    res = ib.stage1_step(roles, [unit], cfg, seed=5)
    estimate = -_grads(roles)  # the surrogate is minimised: -grad L estimates grad J
    _zero(roles)
    assert exact.norm() > 0 and estimate.norm() > 0
    cos = float(torch.nn.functional.cosine_similarity(exact, estimate, dim=0))
    assert cos > 0.2, cos  # a random direction in this 8192-dim space: |cos| ~ 0.01; K=512 gives 0.64-0.86
    assert torch.allclose(res["adv"].sum(1), torch.zeros(1, dtype=torch.float64), atol=1e-6)  # leave-one-out
    # log q from the sampler equals the teacher-forced forward that carries the gradient
    assert torch.allclose(res["logq"], res["logq_forward"], atol=1e-3)


def test_objective_increases_over_a_few_steps(one_token):
    roles, cfg, unit, reward = one_token
    cfg = cfg.model_copy(update=dict(samples_k=64))
    saved = [p.detach().clone() for p in roles.parameters()]
    with torch.no_grad():
        before = float(_exact_objective(roles, cfg, unit, reward, cfg.beta))
    opt = torch.optim.SGD(roles.parameters(), lr=0.3)  # plain SGD: the step follows the estimate itself
    for s in range(3):
        ib.stage1_step(roles, [unit], cfg, seed=100 + s)
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = float(_exact_objective(roles, cfg, unit, reward, cfg.beta))
        for p, v in zip(roles.parameters(), saved, strict=True):
            p.copy_(v)
    assert after > before, (before, after)


def test_stage1_gradient_reaches_only_the_meanfield_adapter(tiny_model_dir, events, tmp_path):  # noqa: F811
    pol = make_tiny_lora(tiny_model_dir, tmp_path / "pol")
    cfg = _cfg(tmp_path / "o", tiny_model_dir, beta=0.0)  # prediction term only
    roles = ib.Roles(tiny_model_dir, "cpu")
    roles.add_trainable("meanfield", rank=4, alpha=8)
    roles.load_frozen("policy", pol)
    units = ib.build_units(events, cfg, 2, random.Random(0), roles)
    res = ib.stage1_step(roles, units, cfg, seed=1, policy_role="policy")
    assert float(res["reward"].std()) > 0
    mf = [p for n, p in roles.peft.named_parameters() if ".meanfield." in n]
    others = [(n, p) for n, p in roles.peft.named_parameters() if ".meanfield." not in n]
    assert mf and all(p.requires_grad for p in mf)
    assert sum(float(p.grad.norm()) for p in mf if p.grad is not None) > 0
    assert any(".policy." in n for n, _ in others)
    assert all(p.grad is None and not p.requires_grad for _, p in others)  # policy adapter and base: no gradient


# ---------------------------------------------------------------- stage 2


def test_stage2_sft_loss_decreases_with_the_mf_context(tiny_model_dir, events, tmp_path):  # noqa: F811
    cfg = _cfg(tmp_path, tiny_model_dir, context="mf")
    roles = ib.Roles(tiny_model_dir, "cpu")
    roles.add_trainable("policy", rank=4, alpha=8)
    exs = ib.build_policy_examples(events, cfg, 8, random.Random(0), roles, meanfield_role=None)
    assert len(exs) == 8 and all("【舆论】" in e.prompt for e in exs)
    assert any(e.step > 0 and "【舆论】暂无回应" not in e.prompt for e in exs)  # m_t written by the summariser
    rows = ib.encode_examples(roles, exs)
    opt = torch.optim.AdamW(roles.parameters(), lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(6):
        losses.append(ib.sft_step(roles, rows, micro=8)["train_loss"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.1, losses


def test_state_context_is_the_state_methods(tiny_model_dir, events, tmp_path):  # noqa: F811
    from mfllm.prompts.templates import policy_prefix, render_context

    cfg = _cfg(tmp_path, tiny_model_dir, context="state")
    exs = ib.build_policy_examples(events, cfg, 4, random.Random(0), None)
    prefixes = {policy_prefix(ev.source.text, render_context("state", "zh")) for ev in events}
    assert all(any(e.prompt.startswith(p) for p in prefixes) for e in exs)


def test_a_decide_base_model_is_tuned_on_its_own_target_format(tiny_model_dir, events, tmp_path):  # noqa: F811
    """The default (decide) model writes a decision header before its text: IB-Tune's targets carry the rules
    labeler's header for it (as in its training) and none for a plain model; the flag overrides the file."""
    from mfllm.labels.rules import RulesLabeler
    from mfllm.paths import DEFAULT_MODEL
    from mfllm.prompts.templates import action_to_target
    from mfllm.simulation.decision import FULL_HEADER_DIMS, render_header, split_header

    texts = [a.text for a in events[0].actions[:6]]
    labels = RulesLabeler().label(texts)
    decide = _cfg(tmp_path / "d", str(DEFAULT_MODEL), context="state")
    assert decide.policy_sim() == {"method": "mf", "decision_header": True, "meanfield": "stats-compact8",
                                   "meanfield_decay": 1.0}
    got = ib.policy_targets(texts, decide)  # the shipped model's header names all eight dimensions
    assert got == [render_header(lab.labels, "zh", FULL_HEADER_DIMS) + action_to_target(t)
                   for lab, t in zip(labels, texts, strict=True)]
    assert [split_header(g).labels for g in got] == [{d: lab.labels[d] for d in FULL_HEADER_DIMS} for lab in labels]
    exs = ib.build_policy_examples(events, decide, 6, random.Random(0), None)
    assert exs and all(split_header(e.target).labels is not None for e in exs)

    plain = _cfg(tmp_path / "p", tiny_model_dir, context="state")
    assert plain.policy_sim() == {"method": "mf"}
    assert ib.policy_targets(texts, plain) == [action_to_target(t) for t in texts]
    off = _cfg(tmp_path / "o", str(DEFAULT_MODEL), context="state", decision_header=False)
    assert ib.policy_targets(texts, off) == [action_to_target(t) for t in texts]


def test_first_step_skips_each_events_first_steps(tiny_model_dir, events, tmp_path):  # noqa: F811
    """--first-step: stage 1's histories and stage 2's examples start at that step (the rollout's phase), while
    the mean-field chain is still fed the real history from the event's start."""
    from mfllm.prompts.templates import policy_prefix, render_context

    cfg = _cfg(tmp_path, tiny_model_dir, context="state", first_step=1, max_steps=2)
    exs = ib.build_policy_examples(events, cfg, 50, random.Random(0), None)
    assert exs and {e.step for e in exs} == {1, 2}
    assert all(any(e.prompt.startswith(policy_prefix(ev.source.text, render_context("state", "zh"))) for ev in events)
               for e in exs)
    roles = ib.Roles(tiny_model_dir, "cpu")
    units = ib.build_units(events, _cfg(tmp_path / "u", tiny_model_dir, first_step=1, max_steps=1,
                                        previous="stats"), 6, random.Random(0), roles)
    assert units and {u.step for u in units} == {1}
    from mfllm.prompts.templates import strings

    assert all(u.previous != strings("zh")["empty_meanfield"] for u in units)  # m_{t-1} was fed step 0
    with pytest.raises(ConfigError, match="first_step"):
        _cfg(tmp_path, tiny_model_dir, first_step=-1)


# ---------------------------------------------------------------- both stages, adapters, resume, CLI


def test_ib_tune_writes_adapters_that_hfbackend_loads(tiny_model_dir, events, tmp_path):  # noqa: F811
    from mfllm.backends.base import GenerationRequest, SamplingParams
    from mfllm.backends.hf import HFBackend

    s1 = _cfg(tmp_path, tiny_model_dir, steps=2, lr=5e-2, val_units=1, eval_every=10)
    s2 = _cfg(tmp_path, tiny_model_dir, steps=4, lr=5e-2, batch_size=4, val_units=1, eval_every=10)
    infos = ib.ib_tune(ib.IBTunePlan(s1, s2, sft_baseline=False), tmp_path / "run", progress=False,
                       train_events=events, val_events=events)
    assert set(infos) == {"meanfield", "policy"}
    for name in infos:
        d = tmp_path / "run" / name
        assert (d / "adapter_model.safetensors").is_file() and (d / "adapter_config.json").is_file()
        assert not (d / "_work").exists()
    assert (tmp_path / "run/meanfield/reward_curve.png").is_file()
    assert (tmp_path / "run/meanfield/reward_curve.csv").read_text().startswith("step,objective,reward,kl")
    assert (tmp_path / "run/policy/loss_curve.png").is_file()
    mf_info = json.loads((tmp_path / "run/meanfield/training_info.json").read_text())
    assert mf_info["finished"] and "objective" in mf_info["val_after"] and mf_info["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "run/policy/adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir)
    assert json.loads((tmp_path / "run/ibtune.json").read_text())["policy"]["path"].endswith("policy")

    be = HFBackend(tiny_model_dir, device="cpu", adapters={"meanfield": tmp_path / "run/meanfield",
                                                           "policy": tmp_path / "run/policy"})
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompt = ib.mf_policy_prompt(events[0].source.text, "暂无回应", "用户：资料未知", "zh")
    outs = {a: be.generate([GenerationRequest(prompt, seed=1, params=greedy, adapter=a)])[0].text
            for a in (None, "policy", "meanfield")}
    assert outs["policy"] != outs[None]
    target = "[转发]"
    base, tuned = be.score([prompt], [target])[0], be.score([prompt], [target], adapter="meanfield")[0]
    assert base != tuned  # the mean-field adapter changes the model too


def test_interrupted_run_resumes_to_the_same_adapter(tiny_model_dir, events, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    kw = dict(context="state", steps=4, ckpt_every=1, batch_size=4)
    ib.train_policy(_cfg(tmp_path / "a", tiny_model_dir, **kw), events, events, progress=False)
    info = ib.train_policy(_cfg(tmp_path / "b", tiny_model_dir, interrupt_after=2, **kw), events, events,
                           progress=False)
    assert not info["finished"] and (tmp_path / "b/_work/checkpoint/progress.json").is_file()
    assert not (tmp_path / "b/adapter_model.safetensors").exists()
    ib.train_policy(_cfg(tmp_path / "b", tiny_model_dir, **kw), events, events, progress=False)
    a = load_file(str(tmp_path / "a/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError):  # a different config does not silently resume an old checkpoint
        ib.train_policy(_cfg(tmp_path / "c", tiny_model_dir, interrupt_after=1, **kw), events, events, progress=False)
        ib.train_policy(_cfg(tmp_path / "c", tiny_model_dir, **{**kw, "lr": 0.5}), events, events, progress=False)


def test_cli_policy_command(tiny_model_dir, events, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from mfllm.cli.train import train_app
    from mfllm.data.jsonl import write_jsonl

    write_jsonl(events, tmp_path / "ev.jsonl")
    r = CliRunner().invoke(train_app, [
        "policy", "--data", str(tmp_path / "ev.jsonl"), "--out", str(tmp_path / "pol"), "--base", str(tiny_model_dir),
        "--context", "state", "--split", "all", "--val-split", "all", "--steps", "2", "--batch-size", "2",
        "--lora-rank", "2", "--step-size", "4", "--max-steps", "2", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pol/adapter_model.safetensors").is_file()
    r = CliRunner().invoke(train_app, ["meanfield", "--data", str(tmp_path / "ev.jsonl"), "--out", str(tmp_path / "m"),
                                       "--base", str(tiny_model_dir), "--samples-k", "1"])
    assert r.exit_code == 2 and "samples-k" in r.output


# ---------------------------------------------------------------- the command line


def test_cli_ib_tune_writes_every_adapter_and_refuses_bad_options(tmp_path, tiny_model_dir):  # noqa: F811
    from conftest import assert_clean_failure, cli_inproc

    small = ("--data", SAMPLE_DATA, "--split", "all", "--val-split", "all", "--base", tiny_model_dir,
             "--steps", "1", "--policy-steps", "1", "--batch-size", "2", "--samples-k", "2", "--targets", "2",
             "--policy-batch-size", "2", "--max-new-tokens", "4", "--step-size", "4", "--max-steps", "2",
             "--max-events", "2", "--val-events", "2", "--lora-rank", "4", "--lora-alpha", "8", "--device", "cpu",
             "--quiet")
    res = cli_inproc("train", "ib-tune", "--out", tmp_path / "ib", *small)
    assert res.returncode == 0, res.stderr
    for role in ("meanfield", "policy", "policy-sft"):
        assert (tmp_path / "ib" / role / "adapter_model.safetensors").is_file(), role
    bad = cli_inproc("train", "ib-tune", "--out", tmp_path / "bad", *small, "--samples-k", "1")
    assert_clean_failure(bad, "samples_k")


def test_tune_config_refuses_bad_values_naming_the_field(tmp_path):
    for bad, field in ((dict(previous="last"), "previous"), (dict(context="mean"), "context"),
                       (dict(steps=0), "steps"), (dict(beta=-1.0), "beta"), (dict(lang="fr"), "lang")):
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            ib.TuneConfig(out=str(tmp_path), **bad)
    cfg = ib.replace_cfg(ib.TuneConfig(out=str(tmp_path)), context="state")
    assert cfg.context == "state" and cfg.model_dump()["previous"] == "chain"


def test_summaries_are_sampled_as_the_hf_backend_samples(tiny_model_dir, events):  # noqa: F811
    """IB-Tune samples m through the HF backend's decoding loop: same seed, same settings -> the same text as
    HFBackend.generate with stop="\\n" (what LLMMeanField asks at inference)."""
    from mfllm.backends.base import GenerationRequest, SamplingParams
    from mfllm.backends.hf import HFBackend

    roles = ib.Roles(tiny_model_dir, "cpu")
    texts = [meanfield_prompt(e.source.text[:40], "暂无回应", [], "zh") for e in events]
    seeds = [11, 12, 13]
    with roles.active(None) as model:
        got = ib.generate(roles, model, roles.encode_prompts(texts), seeds, temperature=0.7, top_p=0.95,
                          max_new_tokens=12)
    be = HFBackend(tiny_model_dir, device="cpu")
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=12, stop=("\n",))
    want = be.generate([GenerationRequest(t, seed=s, params=params) for t, s in zip(texts, seeds, strict=True)])
    assert [g.text for g in got] == [" ".join(w.text.split()) for w in want]
    assert any(g.text for g in got) and len({g.text for g in got}) > 1
