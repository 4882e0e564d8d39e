"""``make_backend(name, **options)``: build a backend by name; heavy imports happen only for the one chosen."""

from __future__ import annotations

from typing import Any

from mfllm.backends.base import Backend
from mfllm.errors import ConfigError

BACKENDS = ("hf", "openai", "vllm", "ray:hf", "ray:vllm")


def make_backend(name: str, **options: Any) -> Backend:
    """``"hf"`` -> :class:`~mfllm.backends.hf.HFBackend` (``model_path=...``),
    ``"openai"`` -> :class:`~mfllm.backends.openai_api.OpenAIBackend` (``base_url=..., model=...``),
    ``"vllm"`` -> :class:`~mfllm.backends.vllm_engine.VLLMBackend` (``model=...``),
    ``"ray:<inner>"`` -> :class:`~mfllm.backends.ray_pool.RayBackend`: replicas of ``<inner>`` on a Ray cluster."""
    key = (name or "").strip().lower()
    if key == "ray" or key.startswith("ray:"):  # replicas of another backend on a Ray cluster
        from mfllm.backends.ray_pool import RayBackend

        return RayBackend.from_options(key.partition(":")[2] or options.pop("inner", "hf"), **options)
    if key in ("hf", "transformers", "local"):
        from mfllm.backends.hf import HFBackend as cls
    elif key in ("openai", "openai_api", "http"):
        from mfllm.backends.openai_api import OpenAIBackend as cls
    elif key == "vllm":
        from mfllm.backends.vllm_engine import VLLMBackend as cls
    else:
        raise ConfigError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})", field="backend")
    if key in ("hf", "transformers", "local") and "model" in options and "model_path" not in options:
        options["model_path"] = options.pop("model")
    try:
        return cls(**options)
    except TypeError as e:  # an unknown / missing option: one clear line
        raise ConfigError(f"backend {key!r}: {e}", field="backend") from None
