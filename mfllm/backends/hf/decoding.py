"""The one decoding loop (no ``generate``): the HF backend and IB-Tune sample through it.

* **Per-request seeds, batch invariant.** Each row draws its tokens with :mod:`.sampling`'s seeded sampler
  (a pure function of the request's seed and step), so a resumed or Ray-split run samples the same tokens
  as the plain run. The whole batch is sampled with tensor ops (no per-row Python loop per token).
* **Shared prefix.** The longest common *token* prefix of a group of prompts is run once (batch 1); with
  shared-prefix attention (:mod:`.attention`) every row attends to its keys/values directly, otherwise they
  are broadcast into each row's cache. Only the suffixes are run per row.
* **No padding inside a prompt.** Suffixes are right-padded and every row gets its own position ids, so each
  row sees exactly the tokens and positions it would see alone. The last prompt token of each row is fed in
  the first decoding step (a single column for all rows), so the logits of every step come from one column
  (``logits_to_keep=1``); the padding gap before it is masked out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from mfllm.backends.base import SamplingParams
from mfllm.backends.hf.attention import shared_prefix
from mfllm.backends.hf.kv_cache import decode_cache
from mfllm.backends.hf.loading import LM
from mfllm.backends.hf.sampling import longest_common_prefix, request_key, sample_next, uniforms


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    batch_size: int = 64  # rows per chunk
    seed_base: int = 0
    prefix_cache: bool = True  # run a group's common prompt prefix once
    min_prefix_tokens: int = 16  # shorter common prefixes are not worth sharing
    stop_check_interval: int = 4  # decode the texts to look for stop strings every this many steps
    prefix_attention: bool = False  # the model attends to a shared prefix directly (use_prefix_attention)


@dataclass(slots=True)
class Decoded:
    tokens: list[int]  # the generated tokens, a final eos / stop token included
    hit_eos: bool
    stopped: bool  # a stop string was seen in the text
    cached_prompt_tokens: int = 0  # the shared prefix computed once for the chunk
    logprob: float = 0.0  # sum of log p(token) over `tokens` at temperature 1 (with logprobs=True)


def plan(idxs: Iterable[int], enc: Sequence[Sequence[int]], opts: DecodeOptions
         ) -> Iterator[tuple[int, list[list[int]]]]:
    """Yield (shared prefix length P, chunks of row indices); the P-token prefix is computed once for all the
    chunks of one item, P = 0 is the plain path.

    Prompts sorted in token order form runs whose neighbours share >= ``min_prefix_tokens`` tokens; the LCP of
    a run is the minimum of its neighbours' LCPs. Usually one run holds a whole step (all agents share
    instructions + event + mean field). Within a run rows are bucketed by length."""
    idxs = list(idxs)
    bs = opts.batch_size

    def by_len(items: list[int]) -> list[list[int]]:
        items = sorted(items, key=lambda i: (len(enc[i]), enc[i]))
        return [items[k : k + bs] for k in range(0, len(items), bs)]

    if not opts.prefix_cache or len(idxs) < 2:
        for chunk in by_len(idxs):
            yield 0, [chunk]
        return
    order = sorted(idxs, key=lambda i: enc[i])
    runs: list[tuple[list[int], int]] = []
    cur, cur_lcp = [order[0]], 1 << 62
    for prev, i in zip(order, order[1:], strict=False):
        n = longest_common_prefix(enc[prev], enc[i])
        if n >= opts.min_prefix_tokens:
            cur.append(i)
            cur_lcp = min(cur_lcp, n)
        else:
            runs.append((cur, cur_lcp))
            cur, cur_lcp = [i], 1 << 62
    runs.append((cur, cur_lcp))
    plain: list[int] = []
    for run, lcp in runs:
        if len(run) >= 2:
            p = min(lcp, min(len(enc[i]) for i in run) - 1)  # every row keeps >= 1 suffix token
            if p >= opts.min_prefix_tokens:
                yield p, by_len(run)
                continue
        plain.extend(run)
    for chunk in by_len(plain):
        yield 0, [chunk]


def decode(lm: LM, enc: Sequence[list[int]], params: Sequence[SamplingParams], seeds: Sequence[int],
           opts: DecodeOptions, *, stop_tokens=None, logprobs: bool = False) -> list[Decoded]:
    """Sample a continuation of each prompt (token ids, each with its own params and seed).

    ``stop_tokens``: a bool tensor over the vocabulary; a row also ends on a token where it is True (the
    token is kept, as an eos is). ``logprobs``: also sum log p(token) (temperature 1) per row. Prompt +
    ``max_new_tokens`` must fit the model's context (the caller cuts the budgets)."""
    import torch

    results: list[Decoded | None] = [None] * len(enc)
    with torch.inference_mode():
        for p, chunks in plan(range(len(enc)), enc, opts):
            prefix_cache = prefill_prefix(lm, enc[chunks[0][0]][:p]) if p else None
            for chunk in chunks:
                outs = _decode_chunk(lm, [enc[i] for i in chunk], [params[i] for i in chunk],
                                     [seeds[i] for i in chunk], p, prefix_cache, opts, stop_tokens, logprobs)
                for i, d in zip(chunk, outs, strict=True):
                    results[i] = d
    return results  # type: ignore[return-value]


def prefill_prefix(lm: LM, prefix: list[int]):
    """The KV cache of one token prefix (batch 1)."""
    import torch

    dev = lm.device
    cache = lm.new_cache()
    ids = torch.tensor([prefix], dtype=torch.long, device=dev)
    pos = torch.arange(len(prefix), device=dev).unsqueeze(0)
    lm.forward(ids, torch.ones_like(ids), pos, cache)
    return cache


def _decode_chunk(lm: LM, ids: list[list[int]], params: list[SamplingParams], seeds: list[int], p: int,
                  prefix_cache, opts: DecodeOptions, stop_tokens, logprobs: bool) -> list[Decoded]:
    suffixes = [x[p:] for x in ids]
    lens = [len(s) for s in suffixes]
    s1 = max(lens) - 1  # prefill width: every suffix without its last token
    max_new = [max(0, int(sp.max_new_tokens)) for sp in params]
    steps = max(max_new)
    if steps == 0:
        return [Decoded([], False, False) for _ in ids]
    total_cols = p + s1 + steps
    # With prefix attention the chunk's cache holds only the rows' own columns (suffix + generated) and every
    # layer attends to the shared prefix's keys/values (batch 1) directly: no per-row copy of the prefix.
    # Otherwise the prefix is broadcast into each row's cache.
    shared = opts.prefix_attention and prefix_cache is not None and hasattr(prefix_cache, "layers")
    c0 = p if shared else 0  # first attention-mask column the model sees
    cache = decode_cache(lm.model, total_cols - c0, len(ids), None if shared else prefix_cache)
    with shared_prefix(prefix_cache.layers if shared else None):
        return _loop(lm, params, seeds, p, cache, c0, suffixes, lens, s1, steps, max_new, opts, stop_tokens,
                     logprobs)


def _loop(lm: LM, params, seeds, p, cache, c0, suffixes, lens, s1, steps, max_new, opts: DecodeOptions,
          stop_tokens, logprobs: bool) -> list[Decoded]:
    import torch

    dev = lm.device
    b = len(params)
    total_cols = p + s1 + steps
    attn = torch.ones((b, total_cols), dtype=torch.long, device=dev)
    if s1 > 0:
        inp = torch.full((b, s1), lm.pad_token_id, dtype=torch.long)
        for r, s in enumerate(suffixes):
            if len(s) > 1:
                inp[r, : len(s) - 1] = torch.tensor(s[:-1], dtype=torch.long)
            attn[r, p + len(s) - 1 : p + s1] = 0
        pos = (p + torch.arange(s1)).unsqueeze(0).expand(b, s1)
        lm.forward(inp.to(dev), attn[:, c0 : p + s1], pos.to(dev), cache)
    col = p + s1

    last = torch.tensor([s[-1] for s in suffixes], dtype=torch.long, device=dev)
    cur_pos = torch.tensor([p + n - 1 for n in lens], dtype=torch.long, device=dev)
    keys = [request_key(s, opts.seed_base) for s in seeds]
    k0 = torch.tensor([k[0] for k in keys], dtype=torch.long, device=dev)
    k1 = torch.tensor([k[1] for k in keys], dtype=torch.long, device=dev)
    temp = torch.tensor([float(sp.temperature) for sp in params], dtype=torch.float32, device=dev)
    top_p = torch.tensor([float(sp.top_p) for sp in params], dtype=torch.float32, device=dev)
    top_k = torch.tensor([int(sp.top_k) for sp in params], dtype=torch.long, device=dev)
    limit = torch.tensor(max_new, dtype=torch.long, device=dev)
    eos = torch.tensor(sorted(lm.eos_token_ids) or [-1], dtype=torch.long, device=dev)

    out_tokens = torch.full((b, steps), lm.pad_token_id, dtype=torch.long, device=dev)
    n_gen = torch.zeros(b, dtype=torch.long, device=dev)  # tokens generated per original row
    hit_eos = torch.zeros(b, dtype=torch.bool, device=dev)
    stopped = torch.zeros(b, dtype=torch.bool, device=dev)  # a stop string was seen
    lp = torch.zeros(b, dtype=torch.float64, device=dev)
    has_stop = torch.tensor([bool(sp.stop) for sp in params], dtype=torch.bool, device=dev)
    any_stop = bool(has_stop.any())
    # per active row: original index, finished flag (finished rows may stay until the next prune)
    rows = torch.arange(b, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)

    for j in range(steps):
        logits = lm.forward(last.unsqueeze(1), attn[rows, c0 : col + 1], cur_pos.unsqueeze(1), cache)[:, -1, :]
        col += 1
        nxt = sample_next(logits, temp, top_p, top_k, uniforms(k0, k1, torch.full_like(k0, j)))
        live = ~done
        live_rows = rows[live]
        out_tokens[live_rows, j] = nxt[live]
        n_gen[live_rows] = j + 1
        if logprobs:
            step_lp = torch.log_softmax(logits.float(), -1).gather(1, nxt.unsqueeze(1)).squeeze(1).double()
            lp[live_rows] += step_lp[live]
        is_eos = torch.isin(nxt, eos) & live
        hit_eos[rows[is_eos]] = True
        ends = is_eos
        if stop_tokens is not None:
            ends = ends | (stop_tokens[nxt] & live)
        new_done = ends | (live & (limit <= j + 1))
        if any_stop:
            # stop strings: checked on the decoded text every few steps and when a row finishes
            cand_mask = live & has_stop[rows] & ~ends
            if (j + 1) % opts.stop_check_interval != 0:
                cand_mask = cand_mask & new_done
            cand = cand_mask.nonzero().squeeze(1)
            if cand.numel():
                orig = rows[cand]
                texts = lm.tokenizer.batch_decode(out_tokens[orig, : j + 1].tolist(), skip_special_tokens=True)
                hits = [any(s in t for s in params[o].stop) for o, t in zip(orig.tolist(), texts, strict=True)]
                hit = torch.tensor(hits, dtype=torch.bool, device=dev)
                if bool(hit.any()):
                    stopped[orig[hit]] = True
                    new_done[cand[hit]] = True
        done = done | new_done
        if bool(done.all()):
            break
        last = nxt
        cur_pos = cur_pos + 1
        n_done = int(done.sum())
        if n_done * 4 >= rows.numel():  # drop finished rows once a quarter of the batch is finished
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, last, cur_pos, done = rows[keep], last[keep], cur_pos[keep], done[keep]
            k0, k1, temp, top_p, top_k, limit = (t[keep] for t in (k0, k1, temp, top_p, top_k, limit))

    toks, n, eos_l, stop_l, lp_l = (out_tokens.tolist(), n_gen.tolist(), hit_eos.tolist(), stopped.tolist(),
                                    lp.tolist())
    return [Decoded(toks[r][: n[r]], bool(eos_l[r]), bool(stop_l[r]), p, float(lp_l[r])) for r in range(b)]
