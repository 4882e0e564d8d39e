"""The one seed mechanism: every random choice in mfllm takes its seed from ``derive_seed(run seed, *names)``.

A seed is a stable hash of its parts (blake2b, 63 bits), so it does not depend on call order, batching,
process or platform: the same run seed and the same names give the same draw everywhere.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (ints, strings, ids): order matters, values are joined with a separator."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & ((1 << 63) - 1)


def derived_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded with ``derive_seed(*parts)``."""
    return random.Random(derive_seed(*parts))
