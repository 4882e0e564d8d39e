"""KV caches for decoding: transformers' DynamicCache, and a growable layer over a preallocated buffer.

With :class:`PreallocatedLayer` each decoding step writes its keys/values in place instead of ``torch.cat``-ing
the whole cache (the cat was ~15% of a step on CPU).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any


def cache_kwarg(lm) -> str:
    """The name under which ``lm.forward`` takes its cache (``cache`` or ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def new_cache(lm):
    """An empty DynamicCache for ``lm`` (updated in place by each forward)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=lm.config)
    except TypeError:  # older transformers
        return DynamicCache()


def decode_cache(lm, capacity: int, batch: int, prefix_cache=None):
    """A cache for one chunk: layers whose keys/values live in a buffer of ``capacity`` columns. The shared
    prefix (batch 1) is broadcast into the first columns. Layers of another kind (sliding windows, ...) and
    older transformers keep the plain path (deepcopy + repeat)."""
    cache = None
    grow = _grow_layer_class()
    if grow is not None:
        cache = new_cache(lm)
        layers = getattr(cache, "layers", None)
        if (not layers or any(type(layer) is not grow.__base__ for layer in layers)
                or (prefix_cache is not None and len(getattr(prefix_cache, "layers", ())) != len(layers))):
            cache = None
        else:
            cache.layers = [grow(capacity) for _ in layers]
            if prefix_cache is not None:
                for new, old in zip(cache.layers, prefix_cache.layers, strict=True):
                    new.init_from(old.keys, old.values, batch)
    if cache is None:
        if prefix_cache is None:
            return new_cache(lm)
        cache = copy.deepcopy(prefix_cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
    return cache


_GROW_LAYER: Any = False


def _grow_layer_class():
    """``DynamicLayer`` over a preallocated buffer (None where transformers has no ``DynamicLayer``)."""
    global _GROW_LAYER
    if _GROW_LAYER is not False:
        return _GROW_LAYER
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - transformers < 4.54
        _GROW_LAYER = None
        return None

    class PreallocatedLayer(DynamicLayer):
        """Keys/values are views ``buf[:, :, :n]`` of a buffer with ``capacity`` columns; an update writes in
        place (the buffer doubles if a caller ever goes past it)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = max(1, int(capacity))
            self.n = 0
            self.kbuf = self.vbuf = None

        def _alloc(self, like_k, like_v, batch: int, capacity: int) -> None:
            b_shape = (batch, like_k.shape[1], capacity)
            self.kbuf = like_k.new_empty(b_shape + (like_k.shape[-1],))
            self.vbuf = like_v.new_empty(b_shape + (like_v.shape[-1],))

        def _views(self) -> None:
            self.keys = self.kbuf[:, :, : self.n]
            self.values = self.vbuf[:, :, : self.n]

        def init_from(self, keys, values, batch: int) -> None:
            """Start from a batch-1 prefix, broadcast to ``batch`` rows."""
            self.lazy_initialization(keys, values)
            n = keys.shape[-2]
            self._alloc(keys, values, batch, max(self.capacity, n))
            self.kbuf[:, :, :n] = keys
            self.vbuf[:, :, :n] = values
            self.n = n
            self._views()

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.kbuf is None:
                self._alloc(key_states, value_states, key_states.shape[0], self.capacity)
            n, add = self.n, key_states.shape[-2]
            if n + add > self.kbuf.shape[-2]:
                old_k, old_v = self.kbuf, self.vbuf
                self._alloc(old_k, old_v, old_k.shape[0], max(2 * old_k.shape[-2], n + add))
                self.kbuf[:, :, :n] = old_k[:, :, :n]
                self.vbuf[:, :, :n] = old_v[:, :, :n]
            self.kbuf[:, :, n : n + add] = key_states
            self.vbuf[:, :, n : n + add] = value_states
            self.n = n + add
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

        def batch_select_indices(self, indices) -> None:
            if self.kbuf is None:
                return
            # one copy of the kept rows (their unused columns come along: cheaper than a second copy)
            self.kbuf = self.kbuf.index_select(0, indices)
            self.vbuf = self.vbuf.index_select(0, indices)
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.kbuf is None:
                return
            self.kbuf = self.kbuf.repeat_interleave(repeats, dim=0)
            self.vbuf = self.vbuf.repeat_interleave(repeats, dim=0)
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            if self.kbuf is not None and tokens_to_remove < 0:
                self.n = max(0, self.n + tokens_to_remove)
                self._views()

        def reset(self) -> None:
            self.n = 0
            self.kbuf = self.vbuf = None
            super().reset()

    _GROW_LAYER = PreallocatedLayer
    return PreallocatedLayer
