"""Summariser replay in the decide training data: the llm mean field's exact inference prompt (with its shortening
to the model's context) -> the compact stats mean field's next text, packed beside the action rows. On the shipped
sample events, the real mfllm-mini tokenizer and model, and the real hf backend."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.packing import unpacked_nll

from mfllm.backends.base import Completion
from mfllm.data.load import load_events
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.simulation.meanfield import CompactStatsMeanField, LLMMeanField, MeanFieldUpdate
from mfllm.simulation.steps import plan_steps
from mfllm.training.decide.data import (
    SUMMARY_TOKENS,
    StepText,
    SummaryText,
    build_step_tokens,
    event_steps,
    is_summary,
    pack,
    packed_nll,
    summary_prompt,
    tokenize_steps,
    tokenize_summaries,
)

MAX_LEN = 320  # mfllm-mini's context


@pytest.fixture(scope="module")
def events():
    return load_events(SAMPLE_DATA, limit=3).events


@pytest.fixture(scope="module")
def tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def backend():
    from mfllm.backends.hf.backend import HFBackend

    return HFBackend(DEFAULT_MODEL, device="cpu")


class PromptTap:
    """The real hf backend's tokenizer and context, answering a fixed summary: records the prompts LLMMeanField sends."""

    def __init__(self, backend):
        self.inner, self.max_context, self.prompts = backend, backend.max_context, []

    def encode(self, texts, add_special_tokens=True):
        return self.inner.encode(texts, add_special_tokens=add_special_tokens)

    def generate(self, requests):
        self.prompts += [r.prompt for r in requests]
        return [Completion("x", 1, 1) for _ in requests]


def all_summaries(events) -> list[SummaryText]:
    """A summariser row at every step (warm-up and rollout) of every event."""
    mf = CompactStatsMeanField("zh")
    return [r for ev in events for r in event_steps(ev, meanfield=mf, meanfield_per_event=10_000)
            if isinstance(r, SummaryText)]


def test_summariser_prompt_is_the_llm_meanfields_prompt(events, tok, backend):
    rows = all_summaries(events)
    assert len(rows) == sum(len(list(plan_steps(e.actions, step_size=16, warmup=48))) for e in events)
    llm = LLMMeanField(PromptTap(backend), lang="zh")
    llm.update_many([r.update for r in rows])
    assert llm.backend.max_context == MAX_LEN
    assert llm.shortened > 0  # the sample's long steps exercise the shortening
    encode = backend.encode
    assert [summary_prompt(r, encode, MAX_LEN) for r in rows] == llm.backend.prompts
    # what the trainer packs is those prompts' ids as the backend feeds them
    for r, prompt in zip(rows[:40], llm.backend.prompts[:40], strict=True):
        got = tokenize_summaries(tok, [r], MAX_LEN)
        if got:
            assert got[0].prefix.tolist() == backend.encode([prompt])[0]


def test_summariser_target_is_the_compact_stats_next_text(events, tok):
    ev = events[0]
    rows = all_summaries([ev])
    comp = CompactStatsMeanField("zh")
    mf = comp.initial("zh")
    for r, step in zip(rows, plan_steps(ev.actions, step_size=16, warmup=48), strict=True):
        assert r.step == step.index and r.update.previous.text == mf.text  # m_{t-1}: the compact stats text
        assert [a for _, a in r.update.pairs] == [a.text for a in step.actions]
        mf = comp.update_many([MeanFieldUpdate(ev.source.text, mf, [("", a.text) for a in step.actions])])[0]
        assert r.target == mf.text
    assert rows[3].target.startswith("已有64人：")  # 4 steps of 16 actions
    toks = tokenize_summaries(tok, rows, MAX_LEN)
    assert toks and all(is_summary(t) for t in toks)
    full = {tuple(tok(r.target, add_special_tokens=False)["input_ids"]) for r in rows}
    for t in toks:
        ids = tuple(t.texts[0].tolist())
        if ids[-1] == tok.eos_token_id and ids[:-1] in full:  # the whole target + end token
            continue
        # else clipped where the context ends, as inference clips it
        assert len(t.prefix) + len(ids) == MAX_LEN and any(f[:len(ids)] == ids for f in full)
    assert all(len(t.prefix) + len(t.texts[0]) <= MAX_LEN for t in toks)
    assert SUMMARY_TOKENS == LLMMeanField.MAX_NEW_TOKENS
    clipped = tokenize_summaries(tok, rows[:3], MAX_LEN, text_tokens=10)
    assert all(len(t.texts[0]) == 10 and t.texts[0][-1] != tok.eos_token_id for t in clipped)


def test_packed_mix_of_actions_and_summaries_equals_unpacked(events, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    steps = [s for s in event_steps(events[0]) if isinstance(s, StepText)][:2]
    for s in steps:
        s.agents, s.labels = s.agents[:4], s.labels[:4]
    acts = tokenize_steps(tok, steps, max_len=MAX_LEN)
    sums = tokenize_summaries(tok, all_summaries(events), MAX_LEN)[:2]
    assert len(acts) == 2 and len(sums) == 2
    toks = [acts[0], sums[0], acts[1], sums[1]]
    b = pack(toks, header_weight=3.0)
    assert b.n_examples == 8 + 2
    with torch.no_grad():
        packed, ref = packed_nll(model, b), unpacked_nll(model, toks)
    assert packed.shape == ref.shape and torch.allclose(packed, ref, atol=1e-4)
    # a summary's tokens are text (weight 1); the header weight only on the actions' headers
    n_hdr = sum(len(h) for t in acts for h in t.headers)
    assert int((b.part == 0).sum()) == n_hdr and float(b.weight[b.part == 0].unique()) == 3.0
    sum_segs = [4, 9]  # example order: 4 actions, summary, 4 actions, summary
    for seg, t in zip(sum_segs, sums, strict=True):
        m = b.seg == seg
        assert int(m.sum()) == len(t.texts[0]) and bool((b.part[m] == 1).all()) and bool((b.weight[m] == 1.0).all())


def test_meanfield_per_event_zero_is_the_action_data_alone(events, tok):
    """0: exactly the rows built before summariser replay existed (event_steps -> tokenize_steps, one rng); on:
    the same action rows in the same order, plus summariser rows (their draw leaves the method-mix rng alone)."""
    mix = {"mf": 0.7, "state": 0.1, "recent": 0.1, "popular": 0.1}
    off = build_step_tokens(events, tok, max_len=MAX_LEN, seed=7, mix=mix, meanfield_per_event=0)
    rng, comp = random.Random(7), CompactStatsMeanField("zh")
    before = tokenize_steps(tok, [s for ev in events for s in event_steps(ev, meanfield=comp, mix=mix, rng=rng)],
                            MAX_LEN)
    assert not any(map(is_summary, off))
    on = build_step_tokens(events, tok, max_len=MAX_LEN, seed=7, mix=mix, meanfield_per_event=2)

    def same(a, b):
        return len(a) == len(b) and all(
            np.array_equal(x.prefix, y.prefix) and len(x.texts) == len(y.texts)
            and all(np.array_equal(p, q) for f in ("suffixes", "headers", "texts")
                    for p, q in zip(getattr(x, f), getattr(y, f), strict=True))
            for x, y in zip(a, b, strict=True))

    assert same(off, before)
    assert same(off, [s for s in on if not is_summary(s)])
    n_sum = sum(map(is_summary, on))
    assert 0 < n_sum <= 2 * len(events)
    # the draw is seeded: the same seed, the same summariser rows
    again = build_step_tokens(events, tok, max_len=MAX_LEN, seed=7, mix=mix, meanfield_per_event=2)
    assert same(on, again)


def test_probe_reads_action_rows_only(events):
    from mfllm.training.decide.probe import probe_steps

    steps, reads = probe_steps(events, max_agents=64)
    assert steps and all(isinstance(s, StepText) for s in steps)
    assert sum(len(s.agents) for s in steps) == 64 * len(events)


def test_training_data_counts_its_summaries(tmp_path, tok):
    from mfllm.training.decide.train import DecideConfig, _load_steps

    fixtures = Path(__file__).parent / "fixtures" / "data" / "ced"
    assert DecideConfig(data="x", out="y").meanfield_per_event == 2
    cfg = DecideConfig(data=str(fixtures), out=str(tmp_path))
    steps, info = _load_steps(cfg, tok, MAX_LEN, tmp_path, log=lambda m: None)
    n_sum = sum(map(is_summary, steps))
    assert info["train_summaries"] == n_sum > 0
    assert info["train_steps"] == len(steps) - n_sum
    assert info["train_examples"] == sum(len(s.suffixes) for s in steps if not is_summary(s))
    off_dir = tmp_path / "off"
    off_dir.mkdir()
    _, off = _load_steps(cfg.model_copy(update={"meanfield_per_event": 0}), tok, MAX_LEN, off_dir, log=lambda m: None)
    assert off["train_summaries"] == 0
    assert (off["train_steps"], off["train_examples"]) == (info["train_steps"], info["train_examples"])
