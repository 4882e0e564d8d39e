"""``make_backend(name, **options)``: build a backend by name; heavy imports happen only for the one chosen."""

from __future__ import annotations

from typing import Any

from mfllm.backends.base import Backend
from mfllm.backends.factory import build_backend
from mfllm.backends.ray_pool import RayBackend  # light: Ray itself is imported only when a pool is made
from mfllm.paths import DEFAULT_MODEL

BACKENDS = ("hf", "openai", "vllm", "ray:hf", "ray:vllm")
REMOTE_BACKENDS = ("openai", "openai_api", "http")  # a model run elsewhere, known to them by a name


def make_backend(name: str, **options: Any) -> Backend:
    """``"hf"``, ``"openai"``, ``"vllm"``: :func:`~mfllm.backends.factory.build_backend`;
    ``"ray:<inner>"`` -> :class:`~mfllm.backends.ray_pool.RayBackend`: replicas of ``<inner>`` on a Ray cluster."""
    key = (name or "").strip().lower()
    if options.get("model") is None and key not in REMOTE_BACKENDS:
        options["model"] = str(DEFAULT_MODEL)  # a local backend given no model runs the shipped one
    if key == "ray" or key.startswith("ray:"):  # replicas of another backend on a Ray cluster
        return RayBackend.from_options(key.partition(":")[2] or options.pop("inner", "hf"), **options)
    return build_backend(name, **options)
