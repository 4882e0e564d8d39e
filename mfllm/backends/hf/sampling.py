"""Seeded, batch-invariant sampling: pure functions on tensors (tested on their own).

Request ``r``'s token at step ``j`` is drawn by inverse-CDF sampling (in vocabulary order) with one uniform
``u = H(key(seed_base, seed_r), j)`` from a counter-based integer hash. The draw depends only on the request's
own seed and step, never on the batch it lands in or its position there, so a resumed run or a Ray-split run
samples the same tokens as the plain run. Because the CDF is taken in vocabulary order (not sorted order) and
the top-k / top-p cut-offs are tie-inclusive thresholds on exact logit values, the ~1e-7 float noise from a
different batch shape can only change a token when the uniform falls within ~1e-7 of a CDF boundary. Greedy
(temperature 0) is ``argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mfllm.seeds import seed_words

SAMPLER_VERSION = "inverse-cdf/mix32-v1"
_M32 = 0xFFFFFFFF


def request_key(seed: int, seed_base: int = 0) -> tuple[int, int]:
    """Two 32-bit words that identify a request's random stream (any Python ints are accepted)."""
    return seed_words(seed, seed_base)


def _mix32(x):
    """A 32-bit integer hash (good avalanche) on int64 tensors holding values in [0, 2^32).

    Multipliers are < 2^31 so no intermediate product overflows int64: results are bit-identical on every
    device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _M32
    x = x ^ (x >> 16)
    return x


def uniforms(k0, k1, step):
    """``u`` in (0, 1), float64, one per row: a pure function of (request key, step)."""
    import torch

    h = _mix32((step & _M32) ^ 0x5BD1E995)
    h = _mix32(h ^ k0)
    h = _mix32(h ^ k1)
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def sample_next(logits, temperature, top_p, top_k, u):
    """Next token per row. ``logits`` [B, V]; ``temperature``, ``top_p`` float [B]; ``top_k`` long [B]
    (0 = off); ``u`` float64 [B] from :func:`uniforms`. Rows with temperature <= 0 are greedy."""
    import torch

    logits = logits.float()
    out = logits.argmax(dim=-1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return out
    idx = sampled.nonzero().squeeze(1)
    lg = logits.index_select(0, idx) / temperature.index_select(0, idx).unsqueeze(1)
    n_vocab = lg.shape[-1]
    tk = top_k.index_select(0, idx)
    tp = top_p.index_select(0, idx)
    tp = torch.where(tp >= 1.0, torch.full_like(tp, 2.0), tp)  # 1.0 = off (robust to rounding)
    if bool(((tk > 0) & (tk < n_vocab)).any()) or bool((tp < 1.0).any()):
        sorted_lg, _ = torch.sort(lg, dim=-1, descending=True)
        k = torch.where(tk > 0, tk.clamp(max=n_vocab), torch.full_like(tk, n_vocab))
        pos = torch.arange(n_vocab, device=lg.device).unsqueeze(0)
        in_k = pos < k.unsqueeze(1)
        sp = torch.softmax(sorted_lg.masked_fill(~in_k, float("-inf")), dim=-1)
        before = sp.cumsum(dim=-1) - sp
        keep = (before < tp.unsqueeze(1)) & in_k
        keep[:, 0] = True
        n_keep = keep.sum(dim=-1)
        # Tie-inclusive threshold on exact logit values: independent of the sort's tie order.
        thresh = sorted_lg.gather(1, (n_keep - 1).unsqueeze(1))
        lg = lg.masked_fill(lg < thresh, float("-inf"))
    probs = torch.softmax(lg, dim=-1)
    acc = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(acc).cumsum(dim=-1)
    target = u.index_select(0, idx).to(device=cdf.device, dtype=acc) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1).clamp(max=n_vocab - 1)
    out[idx] = tok
    return out


def longest_common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
