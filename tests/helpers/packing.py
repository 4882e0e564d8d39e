"""The reference for packed training rows: each example scored alone in its own row."""

from __future__ import annotations

import numpy as np
import torch


def unpacked_nll(model, toks) -> torch.Tensor:
    """Per-token NLL of every example (prefix + suffix + header + text) run alone, in packing order."""
    ref = []
    for t in toks:
        for su, h, x in zip(t.suffixes, t.headers, t.texts, strict=True):
            ids = torch.tensor(np.concatenate([t.prefix, su, h, x]).astype(np.int64))[None]
            logits = model(input_ids=ids).logits[0].float()
            start = len(t.prefix) + len(su)
            ref.append(torch.nn.functional.cross_entropy(logits[start - 1:-1], ids[0, start:], reduction="none"))
    return torch.cat(ref)
