"""IB-Tune's token work: sample summaries (through the HF backend's decoding loop) and score sequences with or
without gradients (a group's shared prompt prefix run once)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mfllm.backends.base import SamplingParams
from mfllm.backends.hf.decoding import DecodeOptions, decode
from mfllm.backends.hf.sampling import longest_common_prefix
from mfllm.training.ibtune.roles import Roles


def encode_targets(tok, texts: Sequence[str], eos_id: int) -> list[list[int]]:
    """The policy's targets: the text (no special tokens) + eos, as mini trained and inference stops."""
    if not texts:
        return []
    return [list(x) + [eos_id] for x in tok(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass(slots=True)
class Sample:
    ids: list[int]  # the sampled tokens, stop token included
    text: str  # m as the policy sees it: the first line, whitespace-normalised (as LLMMeanField does)
    logprob: float  # log q(ids | prompt) at temperature 1 (exact when sampled at temperature 1, top-p 1)


@torch.no_grad()
def generate(roles: Roles, model, prompts: list[list[int]], seeds: list[int], *, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 160, batch_size: int = 32) -> list[Sample]:
    """Sample continuations that stop at eos or a newline with the HF backend's decoding loop (a request's
    tokens depend on its seed only, not on the batch; identical prompts, the K samples of a history, share
    their prefill). A row never runs past the model's context (prompt + new tokens <=
    max_position_embeddings, as the HF backend requires): its budget is cut to what fits."""
    budgets = [max_new_tokens if not roles.max_context else
               max(1, min(max_new_tokens, roles.max_context - len(p))) for p in prompts]
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=n) for n in budgets]
    opts = DecodeOptions(batch_size=batch_size, prefix_attention=roles.prefix_attention)
    outs = decode(roles.lm_of(model), prompts, params, seeds, opts, stop_tokens=roles.newline_mask, logprobs=True)
    samples = []
    for d in outs:
        text = roles.tokenizer.decode(d.tokens, skip_special_tokens=True).split("\n", 1)[0]
        samples.append(Sample(d.tokens, " ".join(text.split()), d.logprob))
    return samples


def seq_logprobs(roles: Roles, model, rows: list[tuple[list[int], list[int]]], *, micro: int = 16,
                 weights: torch.Tensor | None = None, groups: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(continuation | prompt) per row, and the continuation's token count.

    Without `weights`: no gradient. With `weights` (one per row): backpropagates sum_r weights[r] * logp[r]
    micro-batch by micro-batch (gradients accumulate in the trainable tensors) and returns the values
    detached. Rows are left-padded so only the continuation's logits are computed. `groups`: a key per
    row; the rows of a key share their prompt's longest common token prefix, which is run once (as the
    HF backend shares a step's prefix; with gradients, the prefix's gradient is accumulated once).
    """
    sums = torch.zeros(len(rows), dtype=torch.float64)
    counts = torch.tensor([len(c) for _, c in rows], dtype=torch.long)
    if groups is not None:
        by_key: dict = {}
        for i, g in enumerate(groups):
            by_key.setdefault(g, []).append(i)
        plain = []
        for idx in by_key.values():
            if len(idx) < 2 or not _score_shared(roles, model, rows, idx, micro, sums, weights):
                plain += idx
        if plain:
            sub, _ = seq_logprobs(roles, model, [rows[i] for i in plain], micro=micro,
                                  weights=None if weights is None else weights[plain])
            sums[plain] = sub
        return sums, counts
    dev = roles.device
    lm = roles.lm_of(model)
    keep = lm.keep_kw
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for c0 in range(0, len(order), micro):
        idx = order[c0: c0 + micro]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        b, n = len(idx), max(len(s) for s in seqs)
        c = max(len(rows[i][1]) for i in idx)
        if c == 0:
            continue
        inp = torch.full((b, n), roles.pad_id, dtype=torch.long)
        att = torch.zeros((b, n), dtype=torch.long)
        cmask = torch.zeros((b, c), dtype=torch.bool)
        for r, s in enumerate(seqs):
            inp[r, n - len(s):] = torch.tensor(s)
            att[r, n - len(s):] = 1
            cmask[r, c - len(rows[idx[r]][1]):] = True
        inp, att, cmask = inp.to(dev), att.to(dev), cmask.to(dev)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        with torch.set_grad_enabled(weights is not None):
            kw = {keep: c + 1} if keep else {}
            logits = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=False, **kw).logits
            logits = logits[:, -(c + 1): -1].float()
            tgt = inp[:, n - c:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                    reduction="none").view(b, c)
            lp = torch.where(cmask, -nll, torch.zeros_like(nll)).sum(1)
            if weights is not None:
                w = weights[idx].to(device=dev, dtype=lp.dtype)
                (w * lp).sum().backward()
        sums[idx] = lp.detach().double().cpu()
    return sums, counts


def _score_shared(roles: Roles, model, rows, idx: list[int], micro: int, sums: torch.Tensor,
                  weights: torch.Tensor | None = None, min_prefix: int = 16) -> bool:
    """Score rows `idx` with their common prompt prefix run once (and backpropagate sum w * logp when
    `weights`); False (nothing done) when the prefix is too short or the cache has no per-layer tensors."""
    prompts = [rows[i][0] for i in idx]
    p = min(len(x) for x in prompts) - 1  # each row keeps >= 1 prompt token: its first target's logits
    for x in prompts[1:]:
        p = min(p, longest_common_prefix(prompts[0], x))
    lm = roles.lm_of(model)
    cache_kw, cache = lm.cache_kw, lm.new_cache()
    if p < min_prefix or not hasattr(cache, "layers"):
        return False
    dev = roles.device
    grad = weights is not None
    pre = torch.tensor([prompts[0][:p]], device=dev)
    keep = lm.keep_kw
    with torch.set_grad_enabled(grad):
        model(input_ids=pre, attention_mask=torch.ones_like(pre), position_ids=torch.arange(p, device=dev)[None],
              use_cache=True, **{cache_kw: cache}, **({keep: 1} if keep else {}))
    prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
    chunks = [idx[c0: c0 + micro] for c0 in range(0, len(idx), micro)]
    for n_chunk, part in enumerate(chunks):
        rest = [rows[i][0][p:] + rows[i][1] for i in part]
        b, w = len(part), max(len(r) for r in rest)
        inp = torch.full((b, w), roles.pad_id, dtype=torch.long)
        att = torch.zeros((b, p + w), dtype=torch.long)
        att[:, :p] = 1
        mask = torch.zeros((b, w - 1), dtype=torch.bool)  # logits column j predicts token j + 1
        for r, (i, x) in enumerate(zip(part, rest, strict=True)):
            inp[r, : len(x)] = torch.tensor(x)
            att[r, p: p + len(x)] = 1
            start = len(rows[i][0]) - p  # first target token's column in `rest`
            mask[r, start - 1: start - 1 + len(rows[i][1])] = True
        inp, att, mask = inp.to(dev), att.to(dev), mask.to(dev)
        pos = (p + torch.arange(w, device=dev))[None].expand(b, w)
        with torch.set_grad_enabled(grad):
            c = lm.new_cache()  # the prefix's keys / values broadcast to the chunk (in the graph)
            for li, (k, v) in enumerate(prefix_kv):
                c.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), li)
            logits = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=True,
                           **{cache_kw: c}).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), inp[:, 1:].reshape(-1),
                                                    reduction="none").view(b, w - 1)
            lp = torch.where(mask, -nll, torch.zeros_like(nll)).sum(1)
            if grad:
                w_part = weights[part].to(device=dev, dtype=lp.dtype)
                (w_part * lp).sum().backward(retain_graph=n_chunk + 1 < len(chunks))
        sums[part] = lp.detach().double().cpu()
    return True
