"""Scale out with Ray (optional: ``pip install mfllm[ray]``).

Replicas of a backend, giving the same records as a single-process run with a local seeded model (every
request carries its own seed and ``hf`` samples batch-invariantly, so where a request runs does not matter):

* :class:`RayBackend` implements the Backend interface over N Ray actors, each holding its own backend
  (e.g. an ``HFBackend`` or a ``VLLMBackend`` of the same model, one per GPU). A huge step's requests are cut
  into N contiguous shards (a step's requests share their prompt prefix, so each shard keeps its prefix
  reuse) sent to the actors at once. Use it for one huge event, or anywhere a backend is expected::

      from mfllm.backends.ray_pool import BackendSpec, RayBackend
      be = RayBackend(BackendSpec("vllm", {"model": "Qwen/Qwen2.5-7B-Instruct"}), replicas=8, num_gpus=1)

  From the command line: ``mfllm simulate --backend ray:vllm --model ...`` (``ray:hf`` on CPUs);
  replicas default to the cluster's GPUs (one each), else its CPUs (``MFLLM_RAY_REPLICAS`` overrides).

Sharding *events* across actors, each with its own Simulator, into one run directory is the simulation's
job: :func:`mfllm.simulation.ray_runner.run_events_parallel` (built on the pieces here).

Ray connects to ``address`` if given, else to ``RAY_ADDRESS`` or a cluster started on this machine with
``ray start --head``, else starts a local one (``ray.init()``'s rules). If you called ``ray.init`` yourself,
that session is used.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mfllm.backends.base import BackendStats, Completion, GenerationRequest
from mfllm.backends.factory import build_backend
from mfllm.errors import BackendError, ConfigError, MfllmError
from mfllm.paths import DEFAULT_MODEL

INSTALL_HINT = "Ray is not installed: pip install 'mfllm[ray]'  (or: pip install 'ray[default]')"


@dataclass(frozen=True)
class BackendSpec:
    """How each actor builds its backend: ``build_backend(name, **options)`` (picklable, built remotely)."""

    name: str = "hf"
    options: dict[str, Any] = field(default_factory=dict)

    def build(self):
        return build_backend(self.name, **dict(self.options))


def as_spec(spec: Any) -> BackendSpec | Callable[[], Any]:
    """A BackendSpec, a dict ``{"name": ..., **options}``, a backend name, or a picklable zero-argument
    callable returning a backend."""
    if isinstance(spec, BackendSpec) or callable(spec):
        return spec
    if isinstance(spec, str):
        return BackendSpec(spec)
    if isinstance(spec, dict):
        d = dict(spec)
        return BackendSpec(str(d.pop("name", "hf")), d)
    raise ConfigError(f"backend spec: expected BackendSpec, dict, name or callable, got {type(spec).__name__}")


def _build(spec):
    return spec.build() if isinstance(spec, BackendSpec) else spec()


def require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT, field="backend") from None
    return ray


def ensure_ray(address: str | None = None, **init_kwargs):
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, **init_kwargs)
    return ray


def portable_error(e: BaseException) -> dict:
    """An exception as plain data (our errors take several __init__ arguments, which pickling loses)."""
    return {"__error__": [type(e).__module__, type(e).__qualname__, [str(a) for a in e.args],
                          {k: v for k, v in vars(e).items() if isinstance(v, (str, int, float, type(None)))}]}


def restore_error(d: dict) -> Exception:
    mod, name, args, attrs = d["__error__"]
    try:
        cls = importlib.import_module(mod)
        for part in name.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError
        e = cls.__new__(cls)
        Exception.__init__(e, *args)
        e.__dict__.update(attrs)
        return e
    except Exception:  # noqa: BLE001 - an unknown class: keep the message
        return BackendError("ray", f"{name}: {' '.join(args)}")


def check_result(result):
    if isinstance(result, dict) and "__error__" in result:
        raise restore_error(result)
    return result


def unwrap_error(e: Exception) -> Exception:
    """The user-facing error inside a RayTaskError (BackendError / ConfigError keep their kind)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, MfllmError):
        return cause
    try:
        inner = e.as_instanceof_cause()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        inner = None
    if isinstance(inner, MfllmError):
        return inner
    return BackendError("ray", f"{type(e).__name__}: {e}")


class Worker:
    """What each Ray actor runs: one backend (mfllm.simulation.ray_runner adds a Simulator over it)."""

    def __init__(self, spec):
        self.backend, self.error = None, None
        try:
            self.backend = _build(spec)
        except MfllmError as e:  # reported by the first call (a dead actor would lose the message)
            self.error = portable_error(e)

    def call(self, method: str, *args, **kwargs):
        """``backend.<method>(...)``; our errors come back as data (see _portable)."""
        if self.error is not None:
            return self.error
        try:
            return getattr(self.backend, method)(*args, **kwargs)
        except MfllmError as e:
            return portable_error(e)

    def describe(self) -> dict:
        return self.error or self.backend.describe()

    def stats(self) -> dict:
        return self.error or self.backend.stats.to_dict()


def default_replicas(ray, num_gpus: float, num_cpus: float = 1) -> int:
    """MFLLM_RAY_REPLICAS, else as many as the cluster's GPUs (or CPUs) hold."""
    env = os.environ.get("MFLLM_RAY_REPLICAS")
    if env:
        return max(1, int(env))
    res = ray.cluster_resources()
    if num_gpus and res.get("GPU"):
        return max(1, int(res["GPU"] // num_gpus))
    return max(1, int(res.get("CPU", 1) // max(num_cpus, 1e-9)))


class RayBackend:
    """The Backend interface over ``replicas`` Ray actors, each with a backend built from the spec.

    ``generate`` cuts the requests into at most ``replicas`` contiguous shards of at least ``min_shard``
    requests and runs them at once (one per actor); results come back in order. ``num_cpus`` /
    ``num_gpus`` are each actor's Ray resources (``num_gpus=1``: one GPU per replica).
    """

    name = "ray"

    def __init__(self, backend_factory_spec: Any = "hf", replicas: int | None = None, *, num_cpus: float = 1,
                 num_gpus: float = 0, address: str | None = None, min_shard: int = 1,
                 actor_options: dict | None = None, ray_init: dict | None = None):
        self.spec = as_spec(backend_factory_spec)
        ray = ensure_ray(address, **(ray_init or {}))
        self._ray = ray
        self.replicas = int(replicas) if replicas else default_replicas(ray, num_gpus, num_cpus)
        if self.replicas < 1:
            raise ConfigError("replicas must be >= 1", field="replicas")
        self.min_shard = max(1, int(min_shard))
        worker = ray.remote(Worker)
        opts = {"num_cpus": num_cpus, "num_gpus": num_gpus, **(actor_options or {})}
        self.actors = [worker.options(**opts).remote(self.spec) for _ in range(self.replicas)]
        self.stats = BackendStats()
        self._next = 0
        try:
            self._inner = check_result(ray.get(self.actors[0].describe.remote()))
        except Exception as e:  # noqa: BLE001 - the backend failed to build in the actor
            self.close()
            raise (e if isinstance(e, MfllmError) else unwrap_error(e)) from None
        inner = getattr(self.spec, "name", None)
        self.name = f"ray:{inner}" if inner else "ray"
        # what the engine / server read from a backend (hf): tokenizer-free attributes only
        self.max_context = self._inner.get("max_context")

    @classmethod
    def from_options(cls, inner: str = "hf", *, replicas: int | None = None, num_cpus: float = 1,
                     num_gpus: float | None = None, address: str | None = None, **options) -> RayBackend:
        """``make_backend("ray:<inner>", model=..., replicas=..., **inner_options)``: GPU replicas (one GPU
        each) when the cluster has GPUs, else CPU replicas."""
        inner = (inner or "hf").lower()
        if inner in ("hf", "transformers", "local") and not options.get("model") and not options.get("model_path"):
            options["model"] = str(DEFAULT_MODEL)
        if num_gpus is None:
            ray = ensure_ray(address)
            num_gpus = 1 if ray.cluster_resources().get("GPU") else 0
        return cls(BackendSpec(inner, options), replicas, num_cpus=num_cpus, num_gpus=num_gpus, address=address)

    # ------------------------------------------------------------------ the interface

    def shards(self, n: int) -> list[tuple[int, int]]:
        """Contiguous [lo, hi) ranges: at most `replicas`, each at least `min_shard` long (but one)."""
        k = max(1, min(self.replicas, n // self.min_shard))
        base, extra = divmod(n, k)
        out, lo = [], 0
        for i in range(k):
            hi = lo + base + (1 if i < extra else 0)
            out.append((lo, hi))
            lo = hi
        return out

    def _map(self, method: str, columns: Sequence[Sequence], kwargs: dict | None = None) -> list:
        """Run ``backend.<method>(*[col[lo:hi] for col in columns], **kwargs)`` on the shards at once."""
        ray = self._ray
        refs = []
        for i, (lo, hi) in enumerate(self.shards(len(columns[0]))):
            actor = self.actors[(self._next + i) % self.replicas]
            refs.append(actor.call.remote(method, *[list(c[lo:hi]) for c in columns], **(kwargs or {})))
        self._next = (self._next + len(refs)) % self.replicas
        try:
            parts = [check_result(p) for p in ray.get(refs)]
        except MfllmError:
            raise
        except Exception as e:  # noqa: BLE001 - a RayTaskError wraps the actor's exception
            raise unwrap_error(e) from None
        return [x for p in parts for x in p]

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        if not requests:
            return []
        t0 = time.perf_counter()
        out = self._map("generate", [requests])
        if len(out) != len(requests):
            raise BackendError("internal", f"{len(out)} completions for {len(requests)} requests")
        self.stats.add(out, time.perf_counter() - t0)
        return out

    def score(self, prompts: list[str], continuations: list[str], **kwargs) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError("score: prompts and continuations differ in length")
        return self._map("score", [prompts, continuations], kwargs) if prompts else []

    def score_tokens(self, prompts: list[str], continuations: list[str], **kwargs) -> list[tuple[float, int]]:
        if len(prompts) != len(continuations):
            raise ValueError("score: prompts and continuations differ in length")
        return self._map("score_tokens", [prompts, continuations], kwargs) if prompts else []

    def describe(self) -> dict:
        return {"backend": self.name, "replicas": self.replicas, "inner": self._inner}

    def replica_stats(self) -> list[dict]:
        return self._ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["BackendSpec", "INSTALL_HINT", "RayBackend", "Worker", "as_spec", "default_replicas", "ensure_ray",
           "portable_error", "require_ray", "restore_error", "unwrap_error"]
