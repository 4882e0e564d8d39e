"""``build_backend(name, **options)``: one backend process-local by name (hf, openai, vllm); heavy imports
happen only for the one chosen. :func:`mfllm.backends.registry.make_backend` adds ``ray:<inner>`` on top,
and each Ray actor builds its inner backend here (so ray_pool needs no registry: no import cycle)."""

from __future__ import annotations

from typing import Any

from mfllm.backends.base import Backend
from mfllm.errors import ConfigError

LOCAL_BACKENDS = ("hf", "openai", "vllm")


def build_backend(name: str, **options: Any) -> Backend:
    """``"hf"`` -> :class:`~mfllm.backends.hf.HFBackend` (``model_path=...``),
    ``"openai"`` -> :class:`~mfllm.backends.openai_api.OpenAIBackend` (``base_url=..., model=...``),
    ``"vllm"`` -> :class:`~mfllm.backends.vllm_engine.VLLMBackend` (``model=...``)."""
    key = (name or "").strip().lower()
    # heavy modules (torch, transformers, httpx, vllm): imported only for the backend asked for
    if key in ("hf", "transformers", "local"):
        from mfllm.backends.hf import HFBackend as cls
    elif key in ("openai", "openai_api", "http"):
        from mfllm.backends.openai_api import OpenAIBackend as cls
    elif key == "vllm":
        from mfllm.backends.vllm_engine import VLLMBackend as cls
    else:
        raise ConfigError(f"unknown backend {name!r} (choose one of: {', '.join(LOCAL_BACKENDS)}, "
                          "ray:hf, ray:vllm)", field="backend")
    if key in ("hf", "transformers", "local") and "model" in options and "model_path" not in options:
        options["model_path"] = options.pop("model")
    try:
        return cls(**options)
    except TypeError as e:  # an unknown / missing option: one clear line
        raise ConfigError(f"backend {key!r}: {e}", field="backend") from None
