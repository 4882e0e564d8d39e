"""Labels shared by simulation (stats mean field), training and evaluation: the 9 dimensions and the labelers
(`rules`, offline and deterministic, the default; `llm`, an LLM judge through any backend)."""

from __future__ import annotations

from pathlib import Path

from mfllm.errors import ConfigError
from mfllm.labels.base import ActionLabels, Labeler

LABELERS = ("rules", "llm")
DEFAULT_CACHE = Path.home() / ".cache" / "mfllm" / "labels.sqlite"


def make_labeler(name: str = "rules", backend=None, cache: str | Path | None = None, **options) -> Labeler:
    """A labeler by name, wrapped in the on-disk label cache unless cache is "" (off)."""
    if name == "rules":
        from mfllm.labels.rules import RulesLabeler

        inner: Labeler = RulesLabeler()
    elif name == "llm":
        if backend is None:
            raise ConfigError("the llm labeler needs a backend (--labeler-backend / --labeler-model)", field="labeler")
        from mfllm.labels.llm import LLMLabeler

        inner = LLMLabeler(backend, **options)
    else:
        raise ConfigError(f"unknown labeler {name!r}; choose one of {', '.join(LABELERS)}", field="labeler")
    if cache == "":
        return inner
    from mfllm.labels.cache import CachedLabeler

    return CachedLabeler(inner, Path(cache) if cache else DEFAULT_CACHE)


__all__ = ["ActionLabels", "Labeler", "make_labeler", "LABELERS"]
