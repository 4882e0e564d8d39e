"""Training data of a decide policy: every post-warm-up action, packed per step after one shared prefix.

An event is walked as the engine walks it (plan_steps, same step size and warm-up); at every rollout
step the policy prompt is built with exactly the inference templates: the method's context (the
compact stats mean field of the REAL preceding actions, step-lagged = teacher forcing, for `mf`),
then per agent its state. The target is the decision header (labels of the real text by the rules
labeler) followed by the real text, as the policy writes it at inference.

Packing: a step's agents share the prefix (instructions, event, context), so a step becomes one row
``prefix + agent_1 + agent_2 + ...`` whose attention mask lets each agent's segment see the prefix
and itself only, with positions restarting after the prefix: the same loss as one row per agent
(tests/test_decision.py checks it), for ~40 tokens per example instead of ~190.

Summariser replay: with `--meanfield llm` the same model writes m_t, so `meanfield_per_event` steps of
each event (warm-up or rollout) also yield a summariser example: the prompt LLMMeanField builds for that
update (the compact stats m_{t-1}, the step's actions, shortened to fit the context by the same
`fit_meanfield_prompt`), the target the compact stats text after the step: the format the policy reads.
It packs as a row of one segment with no suffix and no header (text weight 1).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mfllm.data.schema import Event
from mfllm.data.state import agent_state_text
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.labels.reader import LabelModel
from mfllm.labels.reader import Shares as ReaderShares
from mfllm.labels.reader import state_features as reader_state_features
from mfllm.labels.rules import RulesLabeler
from mfllm.prompts.templates import action_to_target, policy_prefix, policy_suffix
from mfllm.seeds import derived_rng
from mfllm.simulation.decision import HEADER_DIMS, header_format, render_header
from mfllm.simulation.history import History
from mfllm.simulation.meanfield import (
    LLMMeanField,
    MeanFieldModel,
    MeanFieldUpdate,
    compact_meanfield,
    fit_meanfield_prompt,
)
from mfllm.simulation.methods import METHODS, make_method
from mfllm.simulation.steps import plan_steps

TEXT_TOKENS = 48  # the engine's default max_new_tokens: text longer than this is clipped (no end token)
SUMMARY_TOKENS = LLMMeanField.MAX_NEW_TOKENS  # the llm mean field's default budget: a longer summary is clipped


@dataclass(slots=True)
class StepText:
    """One rollout step of one event, as text: the shared prefix and each agent's (state, header, text)."""

    event_id: str
    step: int
    method: str
    prefix: str
    agents: list[tuple[str, str, str]]  # (prompt suffix = state + answer cue, header, target text)
    labels: list[dict[str, str]]  # the rules labels of each agent's real text
    window: np.ndarray | None = None  # the crowd target: header-label shares of the next `window` real actions
    reader: np.ndarray | None = None  # [agents, header categories]: the label reader's distribution per agent


@dataclass(slots=True)
class SummaryText:
    """One summariser example: the llm mean field's update at a step and the mean field's text after it."""

    event_id: str
    step: int
    lang: str
    update: MeanFieldUpdate  # previous = the mean field before the step; pairs = the step's (state, real action)
    target: str


def event_steps(event: Event, *, lang: str = "zh", step_size: int = 16, warmup: int = 48,
                meanfield: MeanFieldModel | None = None, labeler: RulesLabeler | None = None,
                mix: dict[str, float] | None = None, rng: random.Random | None = None,
                meanfield_for: dict | None = None, meanfield_per_event: int = 0,
                seed: int = 0, window: int = 0, reader: LabelModel | None = None,
                dims: tuple[str, ...] = HEADER_DIMS) -> Iterator[StepText | SummaryText]:
    """The rollout steps of one event with teacher-forced contexts, and `meanfield_per_event` summariser examples.

    `mix`: method -> probability, drawn once per step (default: all `mf`). `meanfield_for`: when a dict,
    filled with step index -> the mean-field text the step read (the probe swaps these between events).
    The summariser steps are drawn from `derived_rng(seed, ..., event id)`, not `rng`: the action rows are
    the same with or without them. `window` > 0: each step also carries the header-label shares of the
    `window` real actions from its first one on (`header_shares`; the crowd term's target). `reader`: each
    `mf` step also carries, per agent, the label reader's distribution over the header categories given the
    real label shares through the step before and the agent's state (`reader_targets`; the reader term's target).
    `dims`: the dimensions the header names (and, by default, the compact mean field that goes with them).
    """
    mf_model = meanfield or compact_meanfield(dims, lang=lang)
    labeler = labeler or RulesLabeler()
    mix = mix or {"mf": 1.0}
    rng = rng or random.Random(0)
    methods = {m: make_method(m) for m in mix}
    names, weights = list(mix), list(mix.values())
    history = History(window=max(m.history_window for m in METHODS.values()))
    mf = mf_model.initial(lang)
    plan = list(plan_steps(event.actions, step_size=step_size, warmup=warmup))
    # labelled once, up front: a step's crowd target reaches into the steps after it, the reader's shares
    # count the warm-up's labels too
    step_labels = _per_step(plan, labeler.label([a.text for st in plan for a in st.actions]))
    rollout_labels = [lab.labels for st, labs in zip(plan, step_labels, strict=True) if st.phase == "rollout"
                      for lab in labs]
    shares = ReaderShares() if reader is not None else None
    done = 0
    replay = set()
    if meanfield_per_event > 0:
        replay = set(derived_rng(seed, "decide-summaries", event.event_id).sample(
            [st.index for st in plan], min(meanfield_per_event, len(plan))))
    for si, step in enumerate(plan):
        texts = [a.text for a in step.actions]
        if step.phase == "rollout":
            name = rng.choices(names, weights)[0] if len(names) > 1 else names[0]
            prefix = policy_prefix(event.source.text, methods[name].context(history, mf.text, lang), lang)
            labs = rollout_labels[done:done + len(texts)]
            target = header_shares(rollout_labels[done:done + window], lang, dims) if window > 0 else None
            done += len(texts)
            agents = [(policy_suffix(agent_state_text(a.profile, lang, depth=a.depth), lang), render_header(lab, lang, dims),
                       action_to_target(a.text, lang)) for a, lab in zip(step.actions, labs, strict=True)]
            if meanfield_for is not None:
                meanfield_for[step.index] = mf.text
            soft = (reader_targets(reader, shares, step.actions, lang, dims, labs) if shares is not None
                    and name == "mf" else None)
            yield StepText(event.event_id, step.index, name, prefix, agents, labs, target, soft)
        if shares is not None:
            shares.update(step_labels[si])
        if step.index in replay:  # the pairs as the engine feeds the llm mean field: (state, real text)
            update = MeanFieldUpdate(event.source.text, mf, [(agent_state_text(a.profile, lang, depth=a.depth), a.text)
                                                             for a in step.actions])
            mf = mf_model.update_many([update])[0]
            yield SummaryText(event.event_id, step.index, lang, update, mf.text)
        else:
            mf = mf_model.update_many([MeanFieldUpdate(event.source.text, mf, [("", t) for t in texts])])[0]
        for a in step.actions:
            history.add(a.action_id, a.text, a.parent, a.profile.followers, a.time)


def _per_step(plan, labels: list) -> list[list]:
    """A flat list over the plan's actions, cut into one list per step."""
    out, k = [], 0
    for st in plan:
        out.append(labels[k:k + len(st.actions)])
        k += len(st.actions)
    return out


def reader_targets(reader: LabelModel, shares: ReaderShares, actions, lang: str = "zh",
                   dims: tuple[str, ...] = HEADER_DIMS, labels: list[dict[str, str]] | None = None) -> np.ndarray:
    """[agents, header categories]: the label reader's distribution for each agent of a step, dimension after
    dimension in `header_shares`' order (`dims`, decision.json's category order). `labels`: the agents' real
    labels, which a conditional reader reads (those of the slots its header writes first, teacher forced)."""
    f = shares.features()
    pr = reader.probs(np.array([f + reader_state_features(a) for a in actions]), labels)
    cols = [pr[d][:, DIMENSIONS[d].index(c)] for d, c in header_categories(lang, dims)]
    return np.stack(cols, 1).astype(np.float32)


# ----------------------------------------------------------------------------- tokens


@dataclass(slots=True)
class StepTokens:
    """A step in token ids (int16 arrays: the vocabulary is < 32k)."""

    prefix: np.ndarray
    suffixes: list[np.ndarray]
    headers: list[np.ndarray]
    texts: list[np.ndarray]  # target text + end token (clipped texts have no end token)
    window: np.ndarray | None = None  # StepText.window
    reader: np.ndarray | None = None  # StepText.reader, rows of the agents kept (float16)


def tokenize_steps(tokenizer, steps: list[StepText], max_len: int, text_tokens: int = TEXT_TOKENS) -> list[StepTokens]:
    """Token ids of each step; an agent whose prompt + target does not fit `max_len` is dropped.

    The header and the text are encoded separately, so the header's tokens are the same in every
    example (a BPE merge across the close marker would otherwise vary them).
    """

    def enc(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prefixes = enc([s.prefix for s in steps])
    flat = [a for s in steps for a in s.agents]
    suf, hdr, txt = enc([a[0] for a in flat]), enc([a[1] for a in flat]), enc([a[2] for a in flat])
    eos = tokenizer.eos_token_id
    out, k = [], 0
    for s, p in zip(steps, prefixes, strict=True):
        st = StepTokens(np.asarray(p, np.int16), [], [], [], s.window)
        kept = []
        for j in range(len(s.agents)):
            t = txt[k][:text_tokens] if len(txt[k]) >= text_tokens else txt[k] + [eos]
            if len(p) + len(suf[k]) + len(hdr[k]) + len(t) <= max_len:
                st.suffixes.append(np.asarray(suf[k], np.int16))
                st.headers.append(np.asarray(hdr[k], np.int16))
                st.texts.append(np.asarray(t, np.int16))
                kept.append(j)
            k += 1
        if s.reader is not None and kept:
            st.reader = s.reader[kept].astype(np.float16)
        if st.suffixes:
            out.append(st)
    return out


def summary_prompt(row: SummaryText, encode, max_len: int) -> str:
    """The prompt LLMMeanField builds for this update on a model of `max_len` context (the one shortening rule)."""
    min_new = min(LLMMeanField.MIN_NEW_TOKENS, SUMMARY_TOKENS)
    return fit_meanfield_prompt(row.update, row.lang, encode, max_len, min_new)[0]


def tokenize_summaries(tokenizer, rows: list[SummaryText], max_len: int,
                       text_tokens: int = SUMMARY_TOKENS) -> list[StepTokens]:
    """Summariser examples as packed steps: prefix = the prompt's ids, one segment with no suffix or header, the
    target clipped at `text_tokens` or at the context's end, as inference clips it (else + end token).
    The prompt is encoded as the hf backend encodes it (special tokens included), the target without."""

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts)["input_ids"] if texts else []

    prompts = encode([summary_prompt(r, encode, max_len) for r in rows])
    targets = tokenizer([r.target for r in rows], add_special_tokens=False)["input_ids"] if rows else []
    empty = np.zeros(0, np.int16)
    out = []
    for p, t in zip(prompts, targets, strict=True):
        # At inference the summary stops at max_new_tokens or where the context ends, whichever is first:
        # the target is clipped the same way (a prompt that leaves no room is dropped).
        cap = min(text_tokens, max_len - len(p))
        if cap < 1:
            continue
        t = t[:cap] if len(t) >= cap else t + [tokenizer.eos_token_id]
        out.append(StepTokens(np.asarray(p, np.int16), [empty], [empty], [np.asarray(t, np.int16)]))
    return out


def is_summary(st: StepTokens) -> bool:
    """A summariser row: one segment with no suffix (an action's suffix always holds the agent's state)."""
    return len(st.suffixes) == 1 and len(st.suffixes[0]) == 0


def build_step_tokens(events: Iterable[Event], tokenizer, *, max_len: int, seed: int = 0, lang: str = "zh",
                      mix: dict[str, float] | None = None, chunk: int = 200,
                      meanfield_per_event: int = 0, decay: float = 0.8, window: int = 0,
                      reader: LabelModel | None = None, dims: tuple[str, ...] = HEADER_DIMS) -> list[StepTokens]:
    """Every rollout step of `events` and `meanfield_per_event` summariser rows per event, tokenized (in chunks
    of events, so the text never piles up; per chunk the action rows, then the summariser rows)."""
    rng = random.Random(seed)
    mf_model, labeler = compact_meanfield(dims, lang=lang, decay=decay), RulesLabeler()
    out: list[StepTokens] = []
    buf: list[StepText] = []
    sums: list[SummaryText] = []
    for ev in events:
        for row in event_steps(ev, lang=lang, meanfield=mf_model, labeler=labeler, mix=mix, rng=rng,
                               meanfield_per_event=meanfield_per_event, seed=seed, window=window, reader=reader,
                               dims=dims):
            (sums if isinstance(row, SummaryText) else buf).append(row)
        if len(buf) >= chunk * 8:
            out.extend(tokenize_steps(tokenizer, buf, max_len))
            out.extend(tokenize_summaries(tokenizer, sums, max_len))
            buf, sums = [], []
    out.extend(tokenize_steps(tokenizer, buf, max_len))
    out.extend(tokenize_summaries(tokenizer, sums, max_len))
    return out


# ----------------------------------------------------------------------------- packing


@dataclass(slots=True)
class Packed:
    """A batch of packed rows, ready for `packed_nll`."""

    ids: torch.Tensor  # [B, L] token ids (pad 0)
    pos: torch.Tensor  # [B, L] position ids (restart after the prefix in every segment)
    mask: torch.Tensor  # [B, 1, L, L] bool, True = may attend
    src: torch.Tensor  # [N] flat index (b * L + j) of the position whose logits predict a target token
    tgt: torch.Tensor  # [N] the target token
    weight: torch.Tensor  # [N] loss weight
    part: torch.Tensor  # [N] 0 = header token, 1 = text token, 2 = a contrast copy's text token
    seg: torch.Tensor  # [N] which example (global index over the batch's agents, in order)
    n_examples: int
    neg_of: torch.Tensor | None = None  # [M] the example each contrast copy m belongs to (its tokens: part 2, seg -(m+1))


def _flip_one(h: np.ndarray, cat_ids: list[list[int] | None], rng: np.random.Generator) -> np.ndarray:
    """`h` (open, one token per dimension, close) with one random dimension (those with ids) set to another category."""
    out = h.copy()
    dims = [i for i, c in enumerate(cat_ids) if c]
    d = dims[int(rng.integers(len(dims)))]
    others = [t for t in cat_ids[d] if t != int(h[1 + d])]
    out[1 + d] = others[int(rng.integers(len(others)))]
    return out


@dataclass(slots=True)
class Contrast:
    """What `pack` needs to add contrast copies: per header dimension the category token ids a copy may switch
    to (None: never changed), the rng, and the header slot + token of agents that get no copy (a plain repost:
    its text carries none of the other dimensions' decisions)."""

    cat_ids: list[list[int] | None]
    rng: np.random.Generator
    skip: tuple[int, int] | None = None


def pack(steps: list[StepTokens], header_weight: float = 1.0, prefixes: list[np.ndarray] | None = None,
         contrast: Contrast | None = None) -> Packed:
    """Pack steps into rows (one per step). `prefixes` replaces each step's prefix (probe: another context).
    `contrast`: every agent (but those `contrast.skip` names) also gets a copy of its text after its header with
    one dimension changed (weight 0; its text tokens are part 2, seg -(m+1))."""
    rows = []  # (prefix, segments); a segment: (suffix, header, text, None for an agent | the agent it copies)
    for i, st in enumerate(steps):
        p = prefixes[i] if prefixes is not None else st.prefix
        segs = [(sf, h, t, None) for sf, h, t in zip(st.suffixes, st.headers, st.texts, strict=True)]
        if contrast is not None and st.headers and len(st.headers[0]) == len(contrast.cat_ids) + 2:
            sk = contrast.skip
            segs += [(st.suffixes[k], _flip_one(h, contrast.cat_ids, contrast.rng), st.texts[k], k)
                     for k, h in enumerate(st.headers) if sk is None or int(h[1 + sk[0]]) != sk[1]]
        rows.append((p, segs))
    lengths = [len(p) + sum(len(sf) + len(h) + len(t) for sf, h, t, _ in segs) for p, segs in rows]
    B, L = len(rows), max(lengths)
    ids = np.zeros((B, L), np.int64)
    pos = np.zeros((B, L), np.int64)
    segid = np.full((B, L), -1, np.int64)
    src, tgt, weight, part, seg = [], [], [], [], []
    ex = 0
    neg_of = []
    for b, (p, segs) in enumerate(rows):
        P = len(p)
        ids[b, :P] = p
        pos[b, :P] = np.arange(P)
        segid[b, :P] = 0
        j = P
        base = ex  # the row's first agent
        for number, (sf, h, t, copy_of) in enumerate(segs, start=1):
            toks = np.concatenate([sf, h, t]).astype(np.int64)
            n = len(toks)
            ids[b, j:j + n] = toks
            pos[b, j:j + n] = np.arange(P, P + n)
            segid[b, j:j + n] = number
            first = j + len(sf)  # first header token
            # an agent's targets: its header and text; a copy's: its text only (weight 0, for contrast_term)
            for q in range(first if copy_of is None else first + len(h), j + n):
                src.append(b * L + q - 1)
                tgt.append(ids[b, q])
                hdr = q < first + len(h)
                part.append(2 if copy_of is not None else 0 if hdr else 1)
                weight.append(0.0 if copy_of is not None else header_weight if hdr else 1.0)
                seg.append(ex if copy_of is None else -(len(neg_of) + 1))
            if copy_of is None:
                ex += 1
            else:
                neg_of.append(base + copy_of)
            j += n
    sid = torch.from_numpy(segid)
    q_seg, k_seg = sid[:, :, None], sid[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None]
    mask = causal & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0)
    mask |= torch.eye(L, dtype=torch.bool)[None]  # padding rows attend to themselves (no empty softmax)
    return Packed(torch.from_numpy(ids), torch.from_numpy(pos), mask[:, None], torch.tensor(src), torch.tensor(tgt),
                  torch.tensor(weight, dtype=torch.float32), torch.tensor(part), torch.tensor(seg), ex,
                  torch.tensor(neg_of, dtype=torch.long) if neg_of else None)


def contrast_term(nll: torch.Tensor, batch: Packed) -> torch.Tensor:
    """-log sigma(NLL(text | changed header) - NLL(text | own header)), mean over the contrast copies: the text
    should be likelier after its own header than after one with a dimension changed (the text follows the header)."""
    if batch.neg_of is None:
        return nll.new_zeros(())
    own = batch.part == 1
    pos = nll.new_zeros(batch.n_examples).index_add(0, batch.seg[own], nll[own])
    neg_t = batch.part == 2
    neg = nll.new_zeros(len(batch.neg_of)).index_add(0, -batch.seg[neg_t] - 1, nll[neg_t])
    return torch.nn.functional.softplus(pos[batch.neg_of] - neg).mean()


def packed_nll(model, batch: Packed) -> torch.Tensor:
    """NLL of every target token of a packed batch ([N], same order as batch.tgt).

    The LM head runs only at the positions that predict a target (most of a row is prompt).
    """
    return torch.nn.functional.cross_entropy(packed_logits(model, batch).float(), batch.tgt, reduction="none")


def header_token_ids(tokenizer, lang: str = "zh", dims: tuple[str, ...] = HEADER_DIMS) -> list[dict[str, int]] | None:
    """Per header dimension (`dims` order): category -> its single token id; None when a label is not one token."""
    fmt = header_format(lang)
    out = []
    for d in dims:
        ids = {c: tokenizer(t, add_special_tokens=False)["input_ids"] for c, t in fmt["labels"][d].items()}
        if any(len(v) != 1 for v in ids.values()):
            return None
        out.append({c: v[0] for c, v in ids.items()})
    # the slots are read by position: every whole header must be [open, one token per dimension, close]
    open_ids, close_ids = (tokenizer(fmt[k], add_special_tokens=False)["input_ids"] for k in ("open", "close"))
    if len(open_ids) != 1 or len(close_ids) != 1:
        return None
    for combo in itertools.product(*(list(x) for x in out)):
        labels = dict(zip(dims, combo, strict=True))
        want = [*open_ids, *(x[c] for x, c in zip(out, combo, strict=True)), *close_ids]
        if tokenizer(render_header(labels, lang, dims), add_special_tokens=False)["input_ids"] != want:
            return None
    return out


def header_shares(labels: list[dict[str, str]], lang: str = "zh", dims: tuple[str, ...] = HEADER_DIMS) -> np.ndarray:
    """The share of each header category among `labels`, dimension after dimension (`dims`, and each
    dimension's categories in decision.json's order: the order of `header_token_ids`), as one float32 array."""
    n = max(len(labels), 1)
    return np.array([sum(x[d] == c for x in labels) / n for d, c in header_categories(lang, dims)], np.float32)


def header_categories(lang: str = "zh", dims: tuple[str, ...] = HEADER_DIMS) -> list[tuple[str, str]]:
    """(dimension, category) of every header category: `dims` in order, each dimension's categories in
    decision.json's order (the order of `header_token_ids`, `header_shares` and `reader_targets`)."""
    fmt = header_format(lang)["labels"]
    return [(d, c) for d in dims for c in fmt[d]]


def header_slots(batch: Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the target index of every header token, its example, its slot in the header: 0 = the open marker,
    1.. = the header's dimensions in order)."""
    hdr = (batch.part == 0).nonzero().squeeze(1)
    seg = batch.seg[hdr]
    first = torch.zeros_like(seg)
    first[1:] = (seg[1:] != seg[:-1]).long()
    return hdr, seg, torch.arange(len(seg)) - torch.cummax(first * torch.arange(len(seg)), 0).values


def crowd_kl(logits: torch.Tensor, batch: Packed, rows: list[int], cat_ids: list[torch.Tensor],
             targets: list[np.ndarray | None] | None = None) -> torch.Tensor:
    """The crowd term: per packed row (one event step) and header dimension, KL(real mix || mean predicted mix).

    `logits` are the model's at every target position of `batch` ([N, V]); `rows[k]` is the row of example k;
    `cat_ids[d]` the token ids of dimension d's categories (`header_token_ids`' values, as a tensor).
    The real mix is the step's real header labels (the targets), or `targets[row]` (`header_shares` of a
    longer window of real actions: less sampling noise) where given; the predicted mix is the mean over the
    step's agents of each one's distribution over the dimension's categories. Per-action NLL already has the
    right optimum; this term adds the crowd-level error directly, the one a population simulator is scored on.
    Mean over (row, dimension) pairs with at least 2 agents; 0 when there are none.
    """
    hdr, seg, order = header_slots(batch)
    row_of = torch.tensor(rows)[seg]
    terms = []
    offsets = np.cumsum([0, *(len(c) for c in cat_ids)])
    for k, cats in enumerate(cat_ids, start=1):
        at = order == k
        pos, r = hdr[at], row_of[at]
        if len(pos) == 0:
            continue
        p = torch.softmax(logits[pos][:, cats].float(), dim=-1)  # [n, C] each agent's mix over the categories
        y = (batch.tgt[pos][:, None] == cats[None, :]).float()  # [n, C] its real label (one-hot)
        for row in r.unique():
            m = r == row
            if int(m.sum()) < 2:
                continue
            target = targets[int(row)] if targets is not None else None
            real = y[m].mean(0) if target is None else torch.from_numpy(target[offsets[k - 1]:offsets[k]])
            pred = p[m].mean(0)
            keep = real > 0
            terms.append((real[keep] * (real[keep].log() - pred[keep].clamp_min(1e-8).log())).sum())
    return torch.stack(terms).mean() if terms else logits.new_zeros(())


def reader_kl(logits: torch.Tensor, batch: Packed, targets: list[tuple[np.ndarray | None, int]],
              cat_ids: list[torch.Tensor]) -> torch.Tensor:
    """The reader term: per agent and header dimension, KL(the label reader's distribution || the model's over the
    dimension's categories), mean over (agent, dimension) pairs that have a reader target (the `mf` steps).

    `targets[r]`: row r's (StepTokens.reader or None, its number of agents); agents are numbered across rows
    in order, as `batch.seg`. A reader fitted on the training split's label shares copies an event's mix
    where the model shrinks it toward the corpus (issue 14): this pulls each decision toward that reading,
    per agent, without the sampling noise of a step's real mix (the crowd term's target)."""
    width = sum(len(c) for c in cat_ids)
    q = torch.full((batch.n_examples, width), float("nan"))
    k = 0
    for t, n in targets:
        if t is not None:
            q[k:k + n] = torch.from_numpy(t.astype(np.float32))
        k += n
    hdr, seg, order = header_slots(batch)
    offsets = np.cumsum([0, *(len(c) for c in cat_ids)])
    terms = []
    for d, cats in enumerate(cat_ids):
        at = order == d + 1
        pos, ex = hdr[at], seg[at]
        qd = q[ex, offsets[d]:offsets[d + 1]]
        ok = ~torch.isnan(qd[:, 0])
        if not bool(ok.any()):
            continue
        qd = qd[ok].clamp_min(1e-6)
        qd = qd / qd.sum(1, keepdim=True)
        logp = torch.log_softmax(logits[pos[ok]][:, cats].float(), dim=-1)
        terms.append((qd * (qd.log() - logp)).sum(1))
    return torch.cat(terms).mean() if terms else logits.new_zeros(())


def packed_logits(model, batch: Packed) -> torch.Tensor:
    out = model.model(input_ids=batch.ids, position_ids=batch.pos, attention_mask=batch.mask, use_cache=False)
    h = out.last_hidden_state.reshape(-1, out.last_hidden_state.size(-1))[batch.src]
    return model.lm_head(h).float()
