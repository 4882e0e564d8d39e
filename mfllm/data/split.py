"""Deterministic train / val / test split by event id.

The split of an event depends only on its id (sha256), never on which other events exist, so adding
events to a corpus never moves an old one to another split. Proportions are 80 / 10 / 10.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CHOICES: tuple[str, ...] = ("train", "val", "test", "all")

# bucket = first 8 bytes of sha256(event_id) mod 100: [0, 80) train, [80, 90) val, [90, 100) test
_TRAIN_END = 80
_VAL_END = 90


def _bucket(event_id: str) -> int:
    digest = hashlib.sha256(str(event_id).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def split_of(event_id: str) -> Split:
    """The split ("train", "val" or "test") an event belongs to, from its id alone."""
    b = _bucket(event_id)
    if b < _TRAIN_END:
        return "train"
    if b < _VAL_END:
        return "val"
    return "test"


def in_split(event_id: str, split: str) -> bool:
    """True when `event_id` belongs to `split` ("all" matches everything)."""
    return split == "all" or split_of(event_id) == split
