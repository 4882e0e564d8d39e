"""Labelers: `rules` (offline, deterministic, the default) and `llm` (an LLM judge through any backend)."""

from __future__ import annotations

from pathlib import Path

from mfllm.errors import ConfigError
from mfllm.evaluation.labelers.base import ActionLabels, Labeler

LABELERS = ("rules", "llm")
DEFAULT_CACHE = Path.home() / ".cache" / "mfllm" / "labels.sqlite"


def make_labeler(name: str = "rules", backend=None, cache: str | Path | None = None, **options) -> Labeler:
    """A labeler by name, wrapped in the on-disk label cache unless cache is "" (off)."""
    if name == "rules":
        from mfllm.evaluation.labelers.rules import RulesLabeler

        inner: Labeler = RulesLabeler()
    elif name == "llm":
        if backend is None:
            raise ConfigError("the llm labeler needs a backend (--labeler-backend / --labeler-model)", field="labeler")
        from mfllm.evaluation.labelers.llm import LLMLabeler

        inner = LLMLabeler(backend, **options)
    else:
        raise ConfigError(f"unknown labeler {name!r}; choose one of {', '.join(LABELERS)}", field="labeler")
    if cache == "":
        return inner
    from mfllm.evaluation.labelers.cache import CachedLabeler

    return CachedLabeler(inner, Path(cache) if cache else DEFAULT_CACHE)


__all__ = ["ActionLabels", "Labeler", "make_labeler", "LABELERS"]
