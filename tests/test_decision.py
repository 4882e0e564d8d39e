"""Decide, then write: the decision header (parse / strip), the compact stats mean field, packed training
(same loss as unpacked) and the context-gain probe, on real shipped data and the real mfllm-mini."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers.packing import unpacked_nll

from mfllm.data.load import load_events
from mfllm.errors import ConfigError
from mfllm.labels import reader as mf_oracle
from mfllm.labels.base import ActionLabels
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.labels.rules import RulesLabeler
from mfllm.paths import DEFAULT_MODEL, MINI_MODEL, SAMPLE_DATA
from mfllm.simulation.decision import (
    FULL_HEADER_DIMS,
    HEADER_DIMS,
    Decision,
    header_agreement,
    header_dims,
    header_format,
    render_header,
    split_header,
)
from mfllm.simulation.meanfield import (
    CompactStatsMeanField,
    MeanFieldUpdate,
    StatsMeanField,
    compact_meanfield,
    make_meanfield,
)
from mfllm.training.decide.data import (
    contrast_term,
    crowd_kl,
    event_steps,
    header_shares,
    header_token_ids,
    pack,
    packed_logits,
    reader_kl,
    tokenize_steps,
)

LABELS = {"behavior_type": "comment", "stance": "oppose", "belief_degree": "doubt", "sentiment_state": "angry"}
LABELS8 = LABELS | {"sentiment_tendency": "negative", "subjectivity": "subjective", "intent": "question",
                    "rumor": "counter"}


@pytest.fixture(scope="module")
def events():
    return load_events(SAMPLE_DATA, limit=3).events


@pytest.mark.parametrize("lang", ["zh", "en"])
@pytest.mark.parametrize("dims", [HEADER_DIMS, FULL_HEADER_DIMS])
def test_header_round_trip(lang, dims):
    """A header of either layout (4 or 8 dimensions) parses back to its labels; one parser serves both models."""
    labels = {d: LABELS8[d] for d in dims}
    h = render_header(LABELS8, lang, dims)
    d = split_header(h + " 真的假的", lang)
    assert d.labels == labels and d.text == "真的假的" and d.raw_header == h


def test_eight_dimension_header_reads_its_tokens_in_order():
    assert render_header(LABELS8, "zh", FULL_HEADER_DIMS) == "【评反疑怒负主问辟】"
    assert split_header("【转中信平无客观传】转发", "zh").labels == {
        "behavior_type": "share", "stance": "neutral", "belief_degree": "believe", "sentiment_state": "calm",
        "sentiment_tendency": "neutral", "subjectivity": "objective", "intent": "opinion", "rumor": "spread"}
    with pytest.raises(ConfigError, match="4 or 8"):
        header_dims(5)


@pytest.mark.parametrize(("line", "text"), [
    ("【评支信悲无主观传】传】走好[蜡烛]", "走好[蜡烛]"),  # the last slot echoed and closed again
    ("【评支信悲无主观传】传】辟辟】 走好", "走好"),  # repeatedly, spaces between
    ("【评支信悲无主观传】【评支信悲无主观传】走好", "走好"),  # a second whole header
    ("【评支信悲无主观传】传】", ""),  # nothing but residue: an empty text (a plain repost downstream)
    ("【评支信悲无主观传】传说】走好", "传说】走好"),  # 说 is no label: the agent's words, kept
    ("【评支信悲无主观传】】走好", "】走好"),  # a bare close marker holds no labels: kept
])
def test_header_residue_after_the_header_is_not_text(line, text):
    """What a contrast-trained model echoes after its header (label strings closed again) is header, not
    the agent's words: dropped from the text, kept in raw_header; the labels are the first header's."""
    d = split_header(line, "zh")
    assert d.text == text
    assert d.labels == split_header("【评支信悲无主观传】x", "zh").labels
    assert line.startswith(d.raw_header) and d.raw_header.endswith("】")


@pytest.mark.parametrize(("line", "text", "has_raw"), [
    ("【评支】还行", "还行", True),  # malformed (two labels): stripped, recorded as missing
    ("【转评支信平】x", "x", True),  # five labels
    ("【评支信平正主】x", "x", True),  # six: neither layout
    ("【评支信平正主问辟传】x", "x", True),  # nine
    ("没有头部的评论", "没有头部的评论", False),
    ("【转载】新闻原文", "【转载】新闻原文", False),  # a real bracket, not label tokens: kept as text
    ("【评支信", "【评支信", False),  # never closed
    ("", "", False),
])
def test_malformed_or_missing_header_keeps_text(line, text, has_raw):
    d = split_header(line, "zh")
    assert d.labels is None and d.text == text and (d.raw_header is not None) == has_raw


def test_repost_header_and_labels_of_plain_repost():
    lab = RulesLabeler().label_one("转发微博").labels
    d = split_header(render_header(lab, "zh") + "[转发]", "zh")
    assert d.labels == {k: lab[k] for k in HEADER_DIMS} and d.text == "[转发]"
    assert d.labels["behavior_type"] == "share"


def test_header_agreement_counts_missing_apart():
    decs = [Decision("a", dict(LABELS)), Decision("b", dict(LABELS, stance="support")), Decision("c", None)]
    labs = [ActionLabels(dict(LABELS)), ActionLabels(dict(LABELS)), ActionLabels(dict(LABELS))]
    ag = header_agreement(decs, labs)
    assert ag["n"] == 2 and ag["missing"] == 1 and ag["joint"] == 0.5
    assert ag["per_dimension"]["stance"] == 0.5 and ag["per_dimension"]["behavior_type"] == 1.0
    assert list(ag["per_dimension"]) == list(HEADER_DIMS)  # the dimensions the headers name
    text8 = ActionLabels(dict(LABELS8, intent="opinion"))
    ag8 = header_agreement([Decision("a", dict(LABELS8)), Decision("b", dict(LABELS))], [text8, text8])
    assert list(ag8["per_dimension"]) == list(FULL_HEADER_DIMS) and ag8["per_dimension"]["intent"] == 0.0
    assert ag8["per_dimension"]["stance"] == 1.0 and ag8["joint"] == 0.5  # the 4-dimension header agrees in full


def test_compact_meanfield_has_the_stats_shares(events):
    ev = events[0]
    pairs = [("", a.text) for a in ev.actions[:48]]
    full = StatsMeanField("zh")
    comp = CompactStatsMeanField("zh")
    a = full.update_many([MeanFieldUpdate(ev.source.text, full.initial("zh"), pairs)])[0]
    b = comp.update_many([MeanFieldUpdate(ev.source.text, comp.initial("zh"), pairs)])[0]
    assert a.data == b.data  # same state, only the text differs
    counts = b.data["counts"]["behavior_type"]
    share = round(100 * counts["share"] / sum(counts.values()))
    assert b.text.startswith(f"已有48人：转{share}评{100 - share}|")
    stance = b.data["counts"]["stance"]
    assert f"中{round(100 * stance['neutral'] / sum(stance.values()))}|" in b.text  # the stance's neutral
    assert comp.initial("zh").text == full.initial("zh").text
    comp8 = make_meanfield("stats-compact8", "zh")
    c = comp8.update_many([MeanFieldUpdate(ev.source.text, comp8.initial("zh"), pairs)])[0]
    assert c.data == b.data and c.text.startswith(b.text.split("|问")[0] + "|正")  # the same shares, and then
    tend, subj = b.data["counts"]["sentiment_tendency"], b.data["counts"]["subjectivity"]
    assert f"无{round(100 * tend['neutral'] / sum(tend.values()))}|" in c.text
    assert f"|主{round(100 * subj['subjective'] / sum(subj.values()))}客" in c.text
    assert compact_meanfield(FULL_HEADER_DIMS).name == "stats-compact8" and compact_meanfield(HEADER_DIMS).name == "stats-compact"


def test_training_steps_read_the_step_lagged_meanfield(events):
    from mfllm.training.decide.data import event_steps

    ev = events[0]
    reads: dict = {}
    steps = list(event_steps(ev, meanfield_for=reads))
    assert steps and all(len(s.agents) == len(s.labels) for s in steps)
    assert "【舆论】已有48人：" in steps[0].prefix  # the first rollout step has seen exactly the 48 warm-up actions
    assert "已有64人：" in reads[steps[1].step]
    suffix, header, text = steps[0].agents[0]
    assert split_header(header + text).labels == {k: steps[0].labels[0][k] for k in HEADER_DIMS}


def test_packed_loss_equals_unpacked(events):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from mfllm.training.decide.data import event_steps, pack, packed_nll, tokenize_steps

    tok = PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    steps = [s for ev in events[:2] for s in event_steps(ev)][:2]
    for s in steps:
        s.agents, s.labels = s.agents[:5], s.labels[:5]
    toks = tokenize_steps(tok, steps, max_len=320)
    b = pack(toks, header_weight=2.0)
    assert b.n_examples == sum(len(t.suffixes) for t in toks)
    with torch.no_grad():
        packed = packed_nll(model, b)
        ref = unpacked_nll(model, toks)
    assert packed.shape == ref.shape
    assert torch.allclose(packed, ref, atol=1e-4)
    assert float(b.weight[b.part == 0].unique()) == 2.0 and float(b.weight[b.part == 1].unique()) == 1.0


def test_probe_reports_gain_per_action(events):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from mfllm.training.decide.probe import run_probe

    tok = PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    out = run_probe(model, tok, events, max_agents=8)
    assert out["events"] == len(events) and out["actions"] == 8 * len(events)
    own, other = out["nll_per_action"]["own"], out["nll_per_action"]["other"]
    assert own["total"] == pytest.approx(own["header"] + own["text"])
    g = out["gain"]["other-own:total"]
    assert g["mean_per_action"] == pytest.approx(other["total"] - own["total"], abs=1e-6)
    acc = out["header_accuracy"]
    assert set(acc["teacher_forced_slot_accuracy"]) == set(HEADER_DIMS) and 0 <= acc["all_dims"] <= 1
    plain = run_probe(model, tok, events, max_agents=8, header=False, compact=False, conditions=("own", "other"))
    assert plain["nll_per_action"]["own"]["header"] == 0 and "header_accuracy" not in plain


def test_policy_spec_reads_a_decide_model_folder(tmp_path):
    from mfllm.simulation.decision import POLICY_FILE, policy_spec

    assert policy_spec(MINI_MODEL) == {} and policy_spec(None) == {} and policy_spec("gpt-4o") == {}
    # the shipped default is a decide model; served under its folder's name (mfllm serve), the name stands for it
    assert policy_spec(DEFAULT_MODEL)["decision_header"] is True
    assert policy_spec(DEFAULT_MODEL.name) == policy_spec(DEFAULT_MODEL) and policy_spec(MINI_MODEL.name) == {}
    (tmp_path / POLICY_FILE).write_text('{"decision_header": true, "meanfield": "stats-compact"}')
    assert policy_spec(tmp_path) == {"decision_header": True, "meanfield": "stats-compact"}


def test_apply_policy_sets_what_the_model_file_asks_unless_the_user_chose(tmp_path):
    from mfllm.simulation.decision import POLICY_FILE, apply_policy

    (tmp_path / POLICY_FILE).write_text('{"decision_header": true, "meanfield": "stats-compact", "meanfield_decay": 1}')
    assert apply_policy(tmp_path, {}) == {"decision_header": True, "meanfield": "stats-compact", "meanfield_decay": 1.0}
    assert apply_policy(tmp_path, {"meanfield_decay": 0.5})["meanfield_decay"] == 0.5  # the user's choice wins
    assert "meanfield_decay" not in apply_policy(tmp_path, {"method": "state"})  # a method that does not read it
    assert apply_policy(tmp_path, {"meanfield": "llm"}) == {"meanfield": "llm", "decision_header": True}
    assert apply_policy(tmp_path, {}, keep_meanfield=True) == {"decision_header": True}
    assert apply_policy(tmp_path, {"decision_header": False}) == {"decision_header": False}
    assert apply_policy(MINI_MODEL, {}) == {}
    # the engine builds the stats mean field with that memory
    from mfllm.simulation.engine import SimConfig, Simulator

    sim = Simulator(None, SimConfig(**apply_policy(tmp_path, {})))
    assert sim.meanfield.decay == 1.0
    assert Simulator(None, SimConfig(**apply_policy(MINI_MODEL, {}))).meanfield.decay == 0.8


@pytest.fixture(scope="module")
def decide():
    """The shipped decide model and its tokenizer."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL)
    return tok, AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()


def _crowd_batch(decide, steps):
    """Steps packed as training packs them: tokens, batch, each example's row, category ids, the model's logits."""
    tok, model = decide
    toks = tokenize_steps(tok, steps, max_len=320)
    b = pack(toks)
    rows = [r for r, t in enumerate(toks) for _ in t.suffixes]
    cats = [torch.tensor(list(ids.values())) for ids in header_token_ids(tok)]
    with torch.no_grad():
        return toks, b, rows, cats, packed_logits(model, b)


def test_crowd_term_is_the_kl_of_each_steps_real_mix_to_its_mean_prediction(events, decide):
    steps = [s for ev in events[:2] for s in event_steps(ev)][:3]
    for s in steps:
        s.agents, s.labels = s.agents[:6], s.labels[:6]
    steps[2].agents, steps[2].labels = steps[2].agents[:1], steps[2].labels[:1]  # one agent: no crowd, skipped
    toks, b, rows, cats, logits = _crowd_batch(decide, steps)
    # by hand, from the labels of the text: the real mix, and the mean over agents of each one's distribution
    hdr = {}
    for j in (b.part == 0).nonzero().squeeze(1).tolist():
        hdr.setdefault(int(b.seg[j]), []).append(j)
    want = []
    for d, (dim, c) in enumerate(zip(HEADER_DIMS, cats, strict=True)):
        names = list(header_format("zh")["labels"][dim])
        for r in range(2):
            ex = [k for k in range(len(rows)) if rows[k] == r]
            real = torch.tensor([sum(steps[r].labels[i][dim] == n for i in range(len(ex))) for n in names]) / len(ex)
            pred = torch.stack([torch.softmax(logits[hdr[k][d + 1]][c], 0) for k in ex]).mean(0)
            m = real > 0
            want.append((real[m] * (real[m] / pred[m]).log()).sum())
    got = crowd_kl(logits, b, rows, cats)
    assert torch.allclose(got, torch.stack(want).mean(), atol=1e-5) and got > 0
    # a model that predicts each step's real mix for every agent has no crowd error
    perfect = torch.full_like(logits, -1e4)
    for d, c in enumerate(cats):
        for k in range(len(rows)):
            if rows[k] < 2:
                pos = hdr[k][d + 1]
                same = [i for i in range(len(rows)) if rows[i] == rows[k]]
                real = torch.stack([(b.tgt[hdr[i][d + 1]] == c).float() for i in same]).mean(0)
                perfect[pos, c] = real.clamp_min(1e-12).log()
    assert float(crowd_kl(perfect, b, rows, cats)) < 1e-6
    # it trains: the gradient reaches the logits
    x = logits.clone().requires_grad_(True)
    crowd_kl(x, b, rows, cats).backward()
    assert x.grad.abs().sum() > 0


def test_crowd_target_over_a_window_of_real_actions(events, decide):
    """window = the step size: each step's target is its own agents' mix, so the term is unchanged; a longer
    window reaches into the next steps' real labels."""
    own = list(event_steps(events[0], step_size=4, window=4))[:3]
    for st in own:
        assert (st.window == header_shares(st.labels)).all()
    longer = list(event_steps(events[0], step_size=4, window=8))[:3]
    assert [s.labels for s in longer] == [s.labels for s in own]  # the same rows, only the target differs
    assert (longer[0].window == header_shares(own[0].labels + own[1].labels)).all()
    toks, b, rows, cats, logits = _crowd_batch(decide, own)
    assert all(t.window is not None for t in toks)
    plain = crowd_kl(logits, b, rows, cats)
    assert torch.allclose(crowd_kl(logits, b, rows, cats, [t.window for t in toks]), plain, atol=1e-6)
    wide = crowd_kl(logits, b, rows, cats, [t.window for t in tokenize_steps(decide[0], longer, max_len=320)])
    assert not torch.allclose(wide, plain)


def _random_reader(events, seed=0):
    """A label reader (the mf-oracle's model class) with random weights: the reader term only needs its probs."""
    n = len(mf_oracle.Shares().features()) + len(mf_oracle.state_features(events[0].actions[0]))
    rng = np.random.default_rng(seed)
    return mf_oracle.LabelModel({d: rng.normal(size=(n, len(c))) for d, c in DIMENSIONS.items()}, {})


def test_reader_targets_are_the_readers_distribution_given_the_real_shares_before_the_step(events):
    reader = _random_reader(events)
    ev = events[0]
    steps = list(event_steps(ev, step_size=8, reader=reader, mix={"mf": 0.5, "state": 0.5}, rng=random.Random(3)))
    assert {s.method for s in steps} == {"mf", "state"}  # the seeded draw has both
    for s in steps:
        assert (s.reader is None) == (s.method != "mf")
    st = next(s for s in steps if s.method == "mf" and s.step > 7)
    # by hand: the reader's features from the real labels of every action before this step
    sh = mf_oracle.Shares()
    labs = RulesLabeler().label([a.text for a in ev.actions])
    for k in range(st.step):
        sh.update(labs[k * 8:(k + 1) * 8])
    acts = ev.actions[st.step * 8:st.step * 8 + len(st.agents)]
    pr = reader.probs(np.array([sh.features() + mf_oracle.state_features(a) for a in acts]))
    fmt = header_format("zh")["labels"]
    want = np.stack([pr[d][:, DIMENSIONS[d].index(c)] for d in HEADER_DIMS for c in fmt[d]], 1)
    assert np.allclose(st.reader, want, atol=1e-6)
    assert np.allclose(st.reader[:, :2].sum(1), 1) and np.allclose(st.reader[:, -6:].sum(1), 1)


def test_a_conditional_readers_targets_read_each_agents_real_labels_of_the_earlier_slots(events):
    """With a reader conditional on the header's earlier slots, an agent's target for a slot is the reader's
    distribution given that agent's real labels there (what the header says before it, teacher forced)."""
    plain = _random_reader(events, seed=4)
    given = {d: HEADER_DIMS[:j] for j, d in enumerate(HEADER_DIMS)}
    rng = np.random.default_rng(5)
    weights = {d: np.vstack([w, rng.normal(size=(sum(len(DIMENSIONS[g]) for g in given.get(d, ())), w.shape[1]))])
               for d, w in plain.weights.items()}
    reader = mf_oracle.LabelModel(weights, {}, given)
    ev = events[0]
    st = next(s for s in event_steps(ev, step_size=8, reader=reader) if s.step > 7)
    sh = mf_oracle.Shares()
    labs = RulesLabeler().label([a.text for a in ev.actions])
    for k in range(st.step):
        sh.update(labs[k * 8:(k + 1) * 8])
    acts = ev.actions[st.step * 8:st.step * 8 + len(st.agents)]
    x = np.array([sh.features() + mf_oracle.state_features(a) for a in acts])
    real = [lab.labels for lab in labs[st.step * 8:st.step * 8 + len(st.agents)]]
    assert st.labels == real
    pr = reader.probs(x, real)
    fmt = header_format("zh")["labels"]
    want = np.stack([pr[d][:, DIMENSIONS[d].index(c)] for d in HEADER_DIMS for c in fmt[d]], 1)
    assert np.allclose(st.reader, want, atol=1e-6)
    # the first slot reads nothing; a later one changes when the real labels before it change
    other = [r | {"behavior_type": "share" if r["behavior_type"] == "comment" else "comment"} for r in real]
    assert np.allclose(reader.probs(x, other)["behavior_type"], pr["behavior_type"])
    assert not np.allclose(reader.probs(x, other)["stance"], pr["stance"])


def test_reader_term_is_each_agents_kl_to_the_reader_and_zero_when_the_model_agrees(events, decide):
    reader = _random_reader(events, seed=1)
    steps = list(event_steps(events[0], reader=reader, mix={"mf": 0.5, "state": 0.5}, rng=random.Random(3)))[:3]
    for s in steps:
        s.agents, s.labels = s.agents[:5], s.labels[:5]
        if s.reader is not None:
            s.reader = s.reader[:5]
    assert any(s.reader is None for s in steps) and any(s.reader is not None for s in steps)
    toks, b, rows, cats, logits = _crowd_batch(decide, steps)
    targets = [(t.reader, len(t.suffixes)) for t in toks]
    hdr = {}
    for j in (b.part == 0).nonzero().squeeze(1).tolist():
        hdr.setdefault(int(b.seg[j]), []).append(j)
    off = [0, 2, 5, 7, 13]
    want, perfect = [], torch.full_like(logits, -1e4)
    for k, r in enumerate(rows):
        t = toks[r].reader
        if t is None:
            continue
        i = k - sum(len(toks[x].suffixes) for x in range(r))
        for d, c in enumerate(cats):
            q = torch.tensor(t[i, off[d]:off[d + 1]].astype("float32"))
            q = q.clamp_min(1e-6) / q.clamp_min(1e-6).sum()
            logp = torch.log_softmax(logits[hdr[k][d + 1]][c], 0)
            want.append((q * (q.log() - logp)).sum())
            perfect[hdr[k][d + 1], c] = q.log()
    got = reader_kl(logits, b, targets, cats)
    assert torch.allclose(got, torch.stack(want).mean(), atol=1e-5) and got > 0
    assert float(reader_kl(perfect, b, targets, cats)) < 1e-5
    x = logits.clone().requires_grad_(True)
    reader_kl(x, b, targets, cats).backward()
    assert x.grad.abs().sum() > 0
    assert float(reader_kl(logits, b, [(None, n) for _, n in targets], cats)) == 0.0  # no target, no term


def test_contrast_copies_score_the_text_after_a_header_with_one_dimension_changed(events):
    """`pack(contrast=...)`: each agent's text (plain reposts excepted) is packed a second time after its header with
    one allowed dimension switched to another category. The copies leave every own token's NLL as it was, a copy's
    text NLL equals the unpacked one after that header, and the term is the mean of -log sigmoid(NLL(copy) - NLL(own))."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from mfllm.training.decide.data import Contrast, packed_nll

    tok = PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    steps = [s for ev in events for s in event_steps(ev)
             if any(lab["behavior_type"] == "share" for lab in s.labels)][:2]
    for s in steps:  # three plain reposts and three comments a step, at most
        pick = ([j for j, lab in enumerate(s.labels) if lab["behavior_type"] == "share"][:3]
                + [j for j, lab in enumerate(s.labels) if lab["behavior_type"] == "comment"][:3])
        s.agents, s.labels = [s.agents[j] for j in sorted(pick)], [s.labels[j] for j in sorted(pick)]
    toks = tokenize_steps(tok, steps, max_len=320)
    ids = header_token_ids(tok)
    allowed = [None if d == "behavior_type" else list(c.values()) for d, c in zip(HEADER_DIMS, ids, strict=True)]
    b = HEADER_DIMS.index("behavior_type")
    share = (b, ids[b]["share"])
    plain = pack(toks, header_weight=10.0)
    both = pack(toks, header_weight=10.0, contrast=Contrast(allowed, np.random.default_rng(0), share))
    agents = [(i, k) for i, t in enumerate(toks) for k in range(len(t.suffixes))]
    kept = [n for n, (i, k) in enumerate(agents) if int(toks[i].headers[k][1 + b]) != share[1]]
    assert 0 < len(kept) < len(agents)  # the sample has both comments and plain reposts
    assert both.n_examples == plain.n_examples == len(agents) and both.neg_of.tolist() == kept
    with torch.no_grad():
        nll0, nll1 = packed_nll(model, plain), packed_nll(model, both)
    own = both.part != 2
    assert torch.allclose(nll0, nll1[own], atol=1e-4)  # the copies are invisible to the agents' own tokens
    assert float(both.weight[~own].abs().sum()) == 0.0  # and add nothing to the per-action loss
    # the first copy, unpacked: prefix + suffix + the changed header + the same text
    rng = np.random.default_rng(0)
    i, k = agents[kept[0]]
    st = toks[i]
    dims = [j for j, c in enumerate(allowed) if c]
    d = dims[int(rng.integers(len(dims)))]
    others = [t for t in allowed[d] if t != int(st.headers[k][1 + d])]
    changed = st.headers[k].copy()
    changed[1 + d] = others[int(rng.integers(len(others)))]
    assert HEADER_DIMS[d] != "behavior_type" and int((changed != st.headers[k]).sum()) == 1
    seq = np.concatenate([st.prefix, st.suffixes[k], changed, st.texts[k]]).astype(np.int64)
    with torch.no_grad():
        lg = model(torch.from_numpy(seq)[None]).logits[0]
    ref = torch.nn.functional.cross_entropy(lg[:-1], torch.from_numpy(seq[1:]), reduction="none")
    ref_text = float(ref[len(seq) - len(st.texts[k]) - 1:].sum())
    assert abs(float(nll1[both.seg == -1].sum()) - ref_text) < 1e-3
    # the term, by hand
    own_text = [float(nll1[(both.part == 1) & (both.seg == n)].sum()) for n in kept]
    copy_text = [float(nll1[both.seg == -(m + 1)].sum()) for m in range(len(kept))]
    want = np.mean([np.log1p(np.exp(x - y)) for x, y in zip(own_text, copy_text, strict=True)])
    assert abs(float(contrast_term(nll1, both)) - want) < 1e-4
    assert float(contrast_term(nll0, plain)) == 0.0  # no copies, no term
