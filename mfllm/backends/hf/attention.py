"""Shared-prefix attention: softmax over [shared prefix | the row's own columns], the prefix read once per batch.

All agents of a step share a long prompt prefix. :func:`use_prefix_attention` registers :func:`prefix_sdpa`
as the model's attention; inside :func:`shared_prefix` every attention layer also attends to that prefix's
keys/values (batch 1), so the prefix is never copied per row. Outside it, it is plain sdpa.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PREFIX_ATTN = "mfllm_prefix_sdpa"
_PREFIX_CTX = threading.local()
_SDPA: Any = None


@contextmanager
def shared_prefix(layers) -> Iterator[None]:
    """While active (this thread), attention layers also attend to ``layers[i].keys/values`` (batch 1)."""
    old = getattr(_PREFIX_CTX, "layers", None)
    _PREFIX_CTX.layers = layers
    try:
        yield
    finally:
        _PREFIX_CTX.layers = old


def use_prefix_attention(lm) -> bool:
    """Switch the model to PREFIX_ATTN where it is safe: a model on sdpa whose attention modules have a
    ``layer_idx``, no sliding windows, no logit soft-capping. Outside a shared-prefix chunk it is plain sdpa."""
    cfg = getattr(lm, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", None) == PREFIX_ATTN:
        return True  # switched already (a second handle on the same model)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    if any(getattr(text, k, None) for k in ("sliding_window", "attn_logit_softcapping", "use_sliding_window")):
        return False
    if getattr(text, "layer_types", None) and any(t != "full_attention" for t in text.layer_types):
        return False
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - other transformers layouts keep the broadcast path
        return False
    attn_modules = [m for m in lm.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not attn_modules:
        return False
    global _SDPA
    _SDPA = sdpa_attention_forward
    # register() fills the global mapping, which mask creation checks (item assignment would not)
    type(ALL_ATTENTION_FUNCTIONS).register(PREFIX_ATTN, prefix_sdpa)
    type(ALL_MASK_ATTENTION_FUNCTIONS).register(PREFIX_ATTN, sdpa_mask)
    cfg._attn_implementation = PREFIX_ATTN
    for sub in (text,):  # a text sub-config of a multimodal config
        if sub is not cfg and getattr(sub, "_attn_implementation", None) == "sdpa":
            sub._attn_implementation = PREFIX_ATTN
    return cfg._attn_implementation == PREFIX_ATTN


def prefix_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                 **kwargs):
    """sdpa, plus (inside :func:`shared_prefix`) a prefix every row attends to in full.

    ``key``/``value`` [B, Hkv, N, D] are the rows' own columns; ``attention_mask`` [B, 1, Q, N] masks them
    (bool, True = attend, or additive). The prefix P [1, Hkv, P, D] is multiplied with all rows' queries at
    once (the rows go into the matmul's M dimension), so its keys/values are read once per layer instead of
    once per row. Softmax runs over the concatenated scores, as attention over the whole sequence does.
    """
    import torch

    layers = getattr(_PREFIX_CTX, "layers", None)
    if layers is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None \
            or kwargs.get("s_aux") is not None:
        return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    layer = layers[module.layer_idx]
    pk, pv = layer.keys, layer.values  # [1, Hkv, P, D]
    b, h, q, d = query.shape
    hkv, n_pre = pk.shape[1], pk.shape[2]
    g = h // hkv
    scale = scaling if scaling is not None else d**-0.5
    # prefix scores: [Hkv, B*g*Q, D] @ [Hkv, D, P]
    qf = query.reshape(b, hkv, g, q, d).permute(1, 0, 2, 3, 4).reshape(hkv, b * g * q, d)
    s_pre = torch.bmm(qf, pk[0].transpose(1, 2)).reshape(hkv, b, g, q, n_pre).permute(1, 0, 2, 3, 4)
    s_pre = s_pre.reshape(b, h, q, n_pre)
    # own columns
    kq = key if g == 1 else key.repeat_interleave(g, dim=1)
    vq = value if g == 1 else value.repeat_interleave(g, dim=1)
    s_own = torch.matmul(query, kq.transpose(-1, -2))
    n_own = s_own.shape[-1]
    if attention_mask is None:
        if q > 1:  # causal within the own columns (the queries are the last q of them)
            qi = torch.arange(n_own - q, n_own, device=query.device).unsqueeze(1)
            ki = torch.arange(n_own, device=query.device).unsqueeze(0)
            s_own = s_own.masked_fill(ki > qi, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        s_own = s_own.masked_fill(~attention_mask[..., :n_own], float("-inf"))
    else:
        s_own = s_own + attention_mask[..., :n_own] / scale  # additive mask, applied before scaling below
    probs = torch.softmax(torch.cat([s_pre, s_own], dim=-1).float() * scale, dim=-1).to(value.dtype)
    p_pre, p_own = probs[..., :n_pre], probs[..., n_pre:]
    pf = p_pre.reshape(b, hkv, g, q, n_pre).permute(1, 0, 2, 3, 4).reshape(hkv, b * g * q, n_pre)
    out = torch.bmm(pf, pv[0]).reshape(hkv, b, g, q, d).permute(1, 0, 2, 3, 4).reshape(b, h, q, d)
    out = out + torch.matmul(p_own, vq)
    return out.transpose(1, 2).contiguous(), None
