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


# How a backend turns a request's (seed, seed_base) into its sampler's seed. The mappings differ because the
# samplers take different seeds and each must keep giving the texts it gave before:
# - hf's own sampler hashes (seed_base, seed) into two 32-bit words, the key of its counter-based hash;
# - vLLM takes one non-negative 63-bit int: seed + seed_base, hashed only when the sum falls outside that range;
# - an OpenAI-compatible server gets the request seed unchanged (it applies its own mapping; `mfllm serve`
#   passes it on to its backend).


def seed_words(seed: int, seed_base: int = 0) -> tuple[int, int]:
    """Two 32-bit words identifying a request's random stream in hf's sampler (any Python ints are accepted)."""
    h = hashlib.blake2b(f"mfllm-sampler:{int(seed_base)}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def seed63(seed: int, seed_base: int = 0) -> int:
    """One non-negative 63-bit seed (vLLM's): seed + seed_base as is when it fits, else a hash of the sum."""
    s = int(seed) + int(seed_base)
    if 0 <= s < (1 << 63):
        return s
    return int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
