"""Local Hugging Face backend with our own decoding loop (no ``generate``).

Why our own loop:

* **Per-request seeds, batch invariant.** Request ``r``'s token at step ``j`` is drawn by inverse-CDF
  sampling (in vocabulary order) with one uniform ``u = H(key(seed_base, seed_r), j)`` from a counter-based
  integer hash. The draw depends only on the request's own seed and step, never on the batch it lands in or
  its position there, so a resumed run or a Ray-split run samples the same tokens as the plain run. The whole
  batch is sampled with tensor ops (no per-agent Python loop per token). Because the CDF is taken in
  vocabulary order (not sorted order) and the top-k / top-p cut-offs are tie-inclusive thresholds on exact
  logit values, the ~1e-7 float noise from a different batch shape can only change a token when the uniform
  falls within ~1e-7 of a CDF boundary. Greedy (temperature 0) is ``argmax``.
* **Shared prefix.** All agents of a step share instructions + event + mean field; only the agent's own state
  comes last. The longest common *token* prefix of a group is run once (batch 1), its KV cache is copied
  along the batch dimension, and only the suffixes are run.
* **No padding inside a prompt.** Suffixes are right-padded and every row gets its own position ids, so
  each row sees exactly the tokens and positions it would see alone. The last prompt token of each row is
  fed in the first decoding step (a single column for all rows), so the logits of every step come from one
  column (``logits_to_keep=1``); the padding gap before it is masked out.

Only safetensors weights are loaded (``use_safetensors=True``: never pickle).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from mfllm.backends.base import BackendStats, Completion, GenerationRequest
from mfllm.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

SAMPLER_VERSION = "inverse-cdf/mix32-v1"
_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------
# Seeded, batch-invariant sampling (pure functions on tensors; tested on their own)
# ----------------------------------------------------------------------------------------------------------


def request_key(seed: int, seed_base: int = 0) -> tuple[int, int]:
    """Two 32-bit words that identify a request's random stream (any Python ints are accepted)."""
    h = hashlib.blake2b(f"mfllm-sampler:{int(seed_base)}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def _mix32(x):
    """A 32-bit integer hash (good avalanche) on int64 tensors holding values in [0, 2^32).

    Multipliers are < 2^31 so no intermediate product overflows int64: results are bit-identical on every
    device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _M32
    x = x ^ (x >> 16)
    return x


def uniforms(k0, k1, step):
    """``u`` in (0, 1), float64, one per row: a pure function of (request key, step)."""
    import torch

    h = _mix32((step & _M32) ^ 0x5BD1E995)
    h = _mix32(h ^ k0)
    h = _mix32(h ^ k1)
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def sample_next(logits, temperature, top_p, top_k, u):
    """Next token per row. ``logits`` [B, V]; ``temperature``, ``top_p`` float [B]; ``top_k`` long [B]
    (0 = off); ``u`` float64 [B] from :func:`uniforms`. Rows with temperature <= 0 are greedy."""
    import torch

    logits = logits.float()
    out = logits.argmax(dim=-1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return out
    idx = sampled.nonzero().squeeze(1)
    lg = logits.index_select(0, idx) / temperature.index_select(0, idx).unsqueeze(1)
    n_vocab = lg.shape[-1]
    tk = top_k.index_select(0, idx)
    tp = top_p.index_select(0, idx)
    tp = torch.where(tp >= 1.0, torch.full_like(tp, 2.0), tp)  # 1.0 = off (robust to rounding)
    if bool(((tk > 0) & (tk < n_vocab)).any()) or bool((tp < 1.0).any()):
        sorted_lg, _ = torch.sort(lg, dim=-1, descending=True)
        k = torch.where(tk > 0, tk.clamp(max=n_vocab), torch.full_like(tk, n_vocab))
        pos = torch.arange(n_vocab, device=lg.device).unsqueeze(0)
        in_k = pos < k.unsqueeze(1)
        sp = torch.softmax(sorted_lg.masked_fill(~in_k, float("-inf")), dim=-1)
        before = sp.cumsum(dim=-1) - sp
        keep = (before < tp.unsqueeze(1)) & in_k
        keep[:, 0] = True
        n_keep = keep.sum(dim=-1)
        # Tie-inclusive threshold on exact logit values: independent of the sort's tie order.
        thresh = sorted_lg.gather(1, (n_keep - 1).unsqueeze(1))
        lg = lg.masked_fill(lg < thresh, float("-inf"))
    probs = torch.softmax(lg, dim=-1)
    acc = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(acc).cumsum(dim=-1)
    target = u.index_select(0, idx).to(device=cdf.device, dtype=acc) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1).clamp(max=n_vocab - 1)
    out[idx] = tok
    return out


def longest_common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ----------------------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _resolve_dtype(dtype: Any, device: str):  # noqa: ARG001 - device kept for future per-device defaults
    import torch

    if dtype is None or dtype == "auto":
        # float32 everywhere: with bfloat16, a different batch shape changes logits by ~1e-2 and so changes
        # about 1 sampled text in 10 (measured); float32 keeps outputs batch invariant. bf16 is opt-in.
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if str(dtype) not in table:
        raise ConfigError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)", field="dtype")
    return table[str(dtype)]


class HFBackend:
    """A local causal LM (any ``AutoModelForCausalLM`` directory with safetensors weights).

    ``adapters={"policy": path, "meanfield": path}`` loads LoRA adapters with peft;
    ``GenerationRequest.adapter`` selects one (``None`` = the base model).
    """

    name = "hf"

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "auto",
        dtype: Any = None,
        batch_size: int = 64,
        seed_base: int = 0,
        *,
        adapters: dict[str, str | os.PathLike] | None = None,
        prefix_cache: bool = True,
        min_prefix_tokens: int = 16,
        stop_check_interval: int = 4,
        num_threads: int | None = None,
        score_budget: int = 1 << 26,
        prefix_attention: bool = True,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(f"not a model directory (no config.json): {path}", field="model")
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1", field="batch_size")
        self.model_path = path
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.batch_size = int(batch_size)
        self.seed_base = int(seed_base)
        self.prefix_cache = bool(prefix_cache)
        self.min_prefix_tokens = max(1, int(min_prefix_tokens))
        self.stop_check_interval = max(1, int(stop_check_interval))
        self.score_budget = int(score_budget)
        self.stats = BackendStats()

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - many loader errors; report one clear line
            raise ConfigError(f"cannot load tokenizer from {path}: {e}", field="model") from e
        dtype_kw = "dtype" if _transformers_major() >= 5 else "torch_dtype"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), use_safetensors=True, **{dtype_kw: self.dtype}
            )
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"cannot load model from {path} (safetensors weights are required): {e}", field="model"
            ) from e
        model.to(self.device)
        model.eval()
        self.num_threads = self._set_threads(num_threads, model)

        self.adapters: dict[str, str] = {}
        self._peft = None
        if adapters:
            from peft import PeftModel

            items = list(adapters.items())
            for role, apath in items:
                if not Path(apath).is_dir():
                    raise ConfigError(f"adapter '{role}': not a directory: {apath}", field="adapters")
                if not (Path(apath) / "adapter_model.safetensors").is_file():  # peft would unpickle a .bin
                    raise ConfigError(f"adapter '{role}': no adapter_model.safetensors in {apath} "
                                      "(safetensors weights are required; pickle files are never loaded)",
                                      field="adapters")
            first_role, first_path = items[0]
            peft_model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first_role)
            for role, apath in items[1:]:
                peft_model.load_adapter(str(apath), adapter_name=role)
            peft_model.to(self.device)
            peft_model.eval()
            self._peft = peft_model
            self.adapters = {role: str(p) for role, p in items}
            self._lm = peft_model.get_base_model()  # LoRA layers are injected in place
        else:
            self._lm = model

        cfg = self._lm.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        self._vocab = int(getattr(text_cfg, "vocab_size", 0) or len(self.tokenizer))
        params = inspect.signature(self._lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if "logits_to_keep" in params:
            self._keep_kw: str | None = "logits_to_keep"
        elif "num_logits_to_keep" in params:
            self._keep_kw = "num_logits_to_keep"
        else:
            self._keep_kw = None
        # attention over the shared prefix computed once for all rows (see _prefix_sdpa)
        self.prefix_attention = bool(prefix_attention) and self.prefix_cache and _use_prefix_attention(self._lm)

        tok = self.tokenizer
        eos: set[int] = set()
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        gen_eos = getattr(getattr(self._lm, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(int(e) for e in gen_eos)
        self.eos_token_ids: set[int] = eos
        self.pad_token_id = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None), 0)
        self._start_id = next(
            (t for t in (tok.bos_token_id, tok.eos_token_id, self.pad_token_id) if t is not None), 0
        )

    # ------------------------------------------------------------------ helpers

    def _set_threads(self, num_threads: int | None, model) -> int:
        """CPU threads: the given number, else OMP_NUM_THREADS, else one thread per ~20M parameters (at most
        the CPUs we may use). Small matmuls gain nothing from threads, and on a busy machine spinning OpenMP
        threads make them up to 100x slower. (torch's thread count is process-wide.)"""
        import torch

        if self.device != "cpu":
            return torch.get_num_threads()
        if num_threads is None:
            if os.environ.get("OMP_NUM_THREADS"):
                return torch.get_num_threads()
            try:
                avail = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - non-Linux
                avail = os.cpu_count() or 1
            n_params = sum(p.numel() for p in model.parameters())
            num_threads = max(1, min(avail, n_params // 20_000_000))
        torch.set_num_threads(int(num_threads))
        return int(num_threads)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "model": str(self.model_path),
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "batch_size": self.batch_size,
            "seed_base": self.seed_base,
            "prefix_cache": self.prefix_cache,
            "adapters": dict(self.adapters),
            "sampler": SAMPLER_VERSION,
        }

    def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(x) for x in ids]

    def _encode_prompts(self, texts: list[str]) -> list[list[int]]:
        return [x if x else [self._start_id] for x in self.encode(texts, add_special_tokens=True)]

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self._lm.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _decode_cache(self, capacity: int, batch: int, prefix_cache=None):
        """A cache for one chunk: layers whose keys/values live in a buffer of ``capacity`` columns, so each
        decoding step writes in place instead of ``torch.cat``-ing the whole cache (the cat was ~15% of a
        step on CPU). The shared prefix (batch 1) is broadcast into the first columns. Layers of another kind
        (sliding windows, ...) and older transformers keep the plain path (deepcopy + repeat)."""
        cache = None
        grow = _grow_layer_class()
        if grow is not None:
            cache = self._new_cache()
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
                return self._new_cache()
            cache = copy.deepcopy(prefix_cache)
            if batch > 1:
                cache.batch_repeat_interleave(batch)
        return cache

    def _forward(self, input_ids, attention_mask, position_ids, cache=None, keep: int = 1):
        kw: dict[str, Any] = {}
        if cache is not None:
            kw[self._cache_kw] = cache
            kw["use_cache"] = True
        else:
            kw["use_cache"] = False
        if self._keep_kw is not None:
            kw[self._keep_kw] = keep
        out = self._lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        logits = out.logits
        if self._keep_kw is None:
            logits = logits[:, -keep:]
        return logits

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none loaded"
            raise ConfigError(f"unknown LoRA adapter '{adapter}' (adapters: {known})", field="adapter")

    @contextmanager
    def _adapter_ctx(self, adapter: str | None) -> Iterator[None]:
        if self._peft is None:
            yield
        elif adapter is None:
            with self._peft.disable_adapter():
                yield
        else:
            self._peft.set_adapter(adapter)
            yield

    # ------------------------------------------------------------------ generation

    def _plan(self, idxs: list[int], enc: list[list[int]]) -> Iterator[tuple[int, list[list[int]]]]:
        """Yield (shared prefix length P, chunks of request indices); the P-token prefix is computed once for
        all the chunks of one item, P = 0 is the plain path.

        Prompts sorted in token order form runs whose neighbours share >= ``min_prefix_tokens`` tokens; the
        LCP of a run is the minimum of its neighbours' LCPs. Usually one run holds a whole step (all agents
        share instructions + event + mean field). Within a run rows are bucketed by length."""
        bs = self.batch_size

        def by_len(items: list[int]) -> list[list[int]]:
            items = sorted(items, key=lambda i: (len(enc[i]), enc[i]))
            return [items[k : k + bs] for k in range(0, len(items), bs)]

        if not self.prefix_cache or len(idxs) < 2:
            for chunk in by_len(idxs):
                yield 0, [chunk]
            return
        order = sorted(idxs, key=lambda i: enc[i])
        runs: list[tuple[list[int], int]] = []
        cur, cur_lcp = [order[0]], 1 << 62
        for prev, i in zip(order, order[1:], strict=False):
            n = longest_common_prefix(enc[prev], enc[i])
            if n >= self.min_prefix_tokens:
                cur.append(i)
                cur_lcp = min(cur_lcp, n)
            else:
                runs.append((cur, cur_lcp))
                cur, cur_lcp = [i], 1 << 62
        runs.append((cur, cur_lcp))
        plain: list[int] = []
        for run, lcp in runs:
            if len(run) >= 2:
                p = min(lcp, min(len(enc[i]) for i in run) - 1)  # every row keeps >= 1 suffix token
                if p >= self.min_prefix_tokens:
                    yield p, by_len(run)
                    continue
            plain.extend(run)
        for chunk in by_len(plain):
            yield 0, [chunk]

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        import torch

        if not requests:
            return []
        t0 = time.perf_counter()
        for r in requests:
            self._check_adapter(r.adapter)
        enc = self._encode_prompts([r.prompt for r in requests])
        capped = 0
        if self.max_context:
            # A prompt that does not fit is an error; a new-token budget that does not fit is cut to what is
            # left (finish_reason "length"): a long summariser prompt late in an event
            # should shorten its summary, not stop the run.
            fitted = []
            for r, ids in zip(requests, enc, strict=True):
                room = self.max_context - len(ids)
                if room < 1:
                    raise BackendError(
                        "context_length",
                        f"a prompt of {len(ids)} tokens leaves no room to generate in the model's context of "
                        f"{self.max_context} tokens",
                    )
                if r.params.max_new_tokens > room:
                    capped += 1
                    r = GenerationRequest(r.prompt, r.seed, replace(r.params, max_new_tokens=room), r.adapter)
                fitted.append(r)
            requests = fitted
        results: list[Completion | None] = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.adapter, []).append(i)
        try:
            with torch.inference_mode():
                for adapter, idxs in groups.items():
                    with self._adapter_ctx(adapter):
                        for p, chunks in self._plan(idxs, enc):
                            prefix_cache = self._prefill_prefix(enc[chunks[0][0]][:p]) if p else None
                            for chunk in chunks:
                                outs = self._generate_chunk(
                                    [requests[i] for i in chunk], [enc[i] for i in chunk], p, prefix_cache
                                )
                                for i, c in zip(chunk, outs, strict=True):
                                    results[i] = c
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            raise BackendError("oom", f"out of GPU memory (lower batch_size): {e}") from e
        done = [c for c in results if c is not None]
        if len(done) != len(requests):  # pragma: no cover - defensive
            raise BackendError("internal", "a request got no result")
        self.stats.add(done, time.perf_counter() - t0, budget_capped=capped)
        return done

    def _prefill_prefix(self, prefix: list[int]):
        import torch

        dev = self.device
        cache = self._new_cache()
        ids = torch.tensor([prefix], dtype=torch.long, device=dev)
        pos = torch.arange(len(prefix), device=dev).unsqueeze(0)
        self._forward(ids, torch.ones_like(ids), pos, cache)
        return cache

    def _generate_chunk(
        self, reqs: list[GenerationRequest], ids: list[list[int]], p: int, prefix_cache
    ) -> list[Completion]:
        b = len(reqs)
        suffixes = [x[p:] for x in ids]
        lens = [len(s) for s in suffixes]
        s1 = max(lens) - 1  # prefill width: every suffix without its last token
        max_new = [max(0, int(r.params.max_new_tokens)) for r in reqs]
        steps = max(max_new)
        if steps == 0:
            return [Completion("", len(x), 0, "length") for x in ids]

        total_cols = p + s1 + steps
        # With prefix attention the chunk's cache holds only the rows' own columns (suffix + generated) and
        # every layer attends to the shared prefix's keys/values (batch 1) directly: no per-row copy of the
        # prefix. Otherwise the prefix is broadcast into each row's cache.
        shared = self.prefix_attention and prefix_cache is not None and hasattr(prefix_cache, "layers")
        c0 = p if shared else 0  # first attention-mask column the model sees
        cache = self._decode_cache(total_cols - c0, b, None if shared else prefix_cache)
        with _shared_prefix(prefix_cache.layers if shared else None):
            return self._decode(reqs, ids, p, cache, c0, suffixes, lens, s1, steps, max_new)

    def _decode(self, reqs, ids, p, cache, c0, suffixes, lens, s1, steps, max_new) -> list[Completion]:
        import torch

        dev = self.device
        b = len(reqs)
        total_cols = p + s1 + steps
        attn = torch.ones((b, total_cols), dtype=torch.long, device=dev)
        if s1 > 0:
            inp = torch.full((b, s1), self.pad_token_id, dtype=torch.long)
            for r, s in enumerate(suffixes):
                if len(s) > 1:
                    inp[r, : len(s) - 1] = torch.tensor(s[:-1], dtype=torch.long)
                attn[r, p + len(s) - 1 : p + s1] = 0
            pos = (p + torch.arange(s1)).unsqueeze(0).expand(b, s1)
            self._forward(inp.to(dev), attn[:, c0 : p + s1], pos.to(dev), cache)
        col = p + s1

        last = torch.tensor([s[-1] for s in suffixes], dtype=torch.long, device=dev)
        cur_pos = torch.tensor([p + n - 1 for n in lens], dtype=torch.long, device=dev)
        keys = [request_key(r.seed, self.seed_base) for r in reqs]
        k0 = torch.tensor([k[0] for k in keys], dtype=torch.long, device=dev)
        k1 = torch.tensor([k[1] for k in keys], dtype=torch.long, device=dev)
        temp = torch.tensor([float(r.params.temperature) for r in reqs], dtype=torch.float32, device=dev)
        top_p = torch.tensor([float(r.params.top_p) for r in reqs], dtype=torch.float32, device=dev)
        top_k = torch.tensor([int(r.params.top_k) for r in reqs], dtype=torch.long, device=dev)
        limit = torch.tensor(max_new, dtype=torch.long, device=dev)
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], dtype=torch.long, device=dev)

        out_tokens = torch.full((b, steps), self.pad_token_id, dtype=torch.long, device=dev)
        n_gen = torch.zeros(b, dtype=torch.long, device=dev)  # tokens generated per original row
        hit_eos = torch.zeros(b, dtype=torch.bool, device=dev)
        stopped = torch.zeros(b, dtype=torch.bool, device=dev)  # a stop string was seen
        has_stop = torch.tensor([bool(r.params.stop) for r in reqs], dtype=torch.bool, device=dev)
        any_stop = bool(has_stop.any())
        # per active row: original index, finished flag (finished rows may stay until the next prune)
        rows = torch.arange(b, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)

        for j in range(steps):
            logits = self._forward(last.unsqueeze(1), attn[rows, c0 : col + 1], cur_pos.unsqueeze(1), cache)
            col += 1
            nxt = sample_next(logits[:, -1, :], temp, top_p, top_k, uniforms(k0, k1, torch.full_like(k0, j)))
            live = ~done
            live_rows = rows[live]
            out_tokens[live_rows, j] = nxt[live]
            n_gen[live_rows] = j + 1
            is_eos = torch.isin(nxt, eos) & live
            hit_eos[rows[is_eos]] = True
            new_done = is_eos | (live & (limit <= j + 1))
            if any_stop:
                # stop strings: checked on the decoded text every few steps and when a row finishes
                cand_mask = live & has_stop[rows] & ~is_eos
                if (j + 1) % self.stop_check_interval != 0:
                    cand_mask = cand_mask & new_done
                cand = cand_mask.nonzero().squeeze(1)
                if cand.numel():
                    orig = rows[cand]
                    texts = self.tokenizer.batch_decode(
                        out_tokens[orig, : j + 1].tolist(), skip_special_tokens=True
                    )
                    hits = [
                        any(s in t for s in reqs[o].params.stop)
                        for o, t in zip(orig.tolist(), texts, strict=True)
                    ]
                    hit = torch.tensor(hits, dtype=torch.bool, device=dev)
                    if bool(hit.any()):
                        stopped[orig[hit]] = True
                        new_done[cand[hit]] = True
            done = done | new_done
            if bool(done.all()):
                break
            last = nxt
            cur_pos = cur_pos + 1
            n_done = int(done.sum())
            if n_done * 4 >= rows.numel():  # drop finished rows once a quarter of the batch is finished
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, last, cur_pos, done = rows[keep], last[keep], cur_pos[keep], done[keep]
                k0, k1, temp, top_p, top_k, limit = (t[keep] for t in (k0, k1, temp, top_p, top_k, limit))

        return self._finish(
            reqs, ids, p, out_tokens.tolist(), n_gen.tolist(), hit_eos.tolist(), stopped.tolist(), max_new
        )

    def _finish(self, reqs, ids, p, out_tokens, n_gen, hit_eos, stopped, max_new) -> list[Completion]:
        """Texts (stop strings cut, eos dropped) and token counts, once per request."""
        res = []
        for r, req in enumerate(reqs):
            if max_new[r] == 0:
                res.append(
                    Completion(text="", prompt_tokens=len(ids[r]), generated_tokens=0, finish_reason="length")
                )
                continue
            toks = out_tokens[r][: n_gen[r]]
            finish = "stop" if hit_eos[r] or stopped[r] else "length"
            if hit_eos[r]:
                text = self.tokenizer.decode(toks[:-1], skip_special_tokens=True)
            else:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
            n_used = len(toks)
            stops = req.params.stop
            if stopped[r] or (stops and any(s in text for s in stops)):
                cut = min(text.find(s) for s in stops if s in text)
                text = text[:cut]
                finish = "stop"
                # the fewest tokens whose text holds the stop string (independent of the check interval)
                for n in range(1, len(toks) + 1):
                    t = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
                    if any(s in t for s in stops):
                        n_used = n
                        break
            c = Completion(
                text=text, prompt_tokens=len(ids[r]), generated_tokens=n_used, finish_reason=finish
            )
            c.cached_prompt_tokens = p
            res.append(c)
        return res

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: list[str], continuations: list[str], adapter: str | None = None) -> list[float]:
        """Sum of log p(continuation | prompt) in nats, one per pair."""
        return [s for s, _ in self.score_tokens(prompts, continuations, adapter=adapter)]

    def score_tokens(
        self, prompts: list[str], continuations: list[str], adapter: str | None = None
    ) -> list[tuple[float, int]]:
        """(sum log p(continuation | prompt) in nats, number of continuation tokens), one per pair.

        Prompt and continuation are tokenized separately and concatenated (a clean split at the boundary);
        the continuation gets no special tokens. An empty continuation scores (0.0, 0).
        """
        import torch

        if len(prompts) != len(continuations):
            raise ValueError("score: prompts and continuations differ in length")
        if not prompts:
            return []
        self._check_adapter(adapter)
        t0 = time.perf_counter()
        p_ids = self._encode_prompts(list(prompts))
        c_ids = self.encode(list(continuations), add_special_tokens=False)
        out: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
        todo = sorted(
            (i for i in range(len(prompts)) if c_ids[i]), key=lambda i: len(p_ids[i]) + len(c_ids[i])
        )
        n_vocab = self._vocab
        dev = self.device
        with torch.inference_mode(), self._adapter_ctx(adapter):
            k = 0
            while k < len(todo):
                # a chunk: at most batch_size rows and about score_budget logits
                chunk = [todo[k]]
                while k + len(chunk) < len(todo) and len(chunk) < self.batch_size:
                    nxt = todo[k + len(chunk)]
                    width = len(p_ids[nxt]) + len(c_ids[nxt])
                    if (len(chunk) + 1) * width * n_vocab > self.score_budget:
                        break
                    chunk.append(nxt)
                k += len(chunk)
                seqs = [p_ids[i] + c_ids[i] for i in chunk]
                length = max(len(x) for x in seqs)
                b = len(chunk)
                inp = torch.full((b, length), self.pad_token_id, dtype=torch.long)
                attn = torch.zeros((b, length), dtype=torch.long)
                for r, x in enumerate(seqs):
                    inp[r, : len(x)] = torch.tensor(x, dtype=torch.long)
                    attn[r, : len(x)] = 1
                starts = torch.tensor([len(p_ids[i]) for i in chunk])
                ends = torch.tensor([len(seqs[r]) for r in range(b)])
                first = int(starts.min()) - 1  # first column whose logits are needed
                pos = torch.arange(length).unsqueeze(0).expand(b, length)
                logits = self._forward(inp.to(dev), attn.to(dev), pos.to(dev), None, keep=length - first)
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # columns first .. length-2
                targets = inp[:, first + 1 :].to(dev)
                lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                tgt_col = torch.arange(first + 1, length).unsqueeze(0)  # position of each target token
                mask = (tgt_col >= starts.unsqueeze(1)) & (tgt_col < ends.unsqueeze(1))
                sums = (lp.double() * mask.to(dev)).sum(-1).tolist()
                for r, i in enumerate(chunk):
                    out[i] = (float(sums[r]), len(c_ids[i]))
        self.stats.seconds += time.perf_counter() - t0
        return out

    def token_logprobs(self, texts: list[str]) -> list[dict]:
        """Per-token log p(token | text before it) for whole texts (the server's echo+logprobs path).

        Returns per text: ``tokens`` (strings), ``ids``, ``logprobs`` (None for the first token),
        ``offsets`` (character start of each token).
        """
        res = []
        for text in texts:
            enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            offs = [int(o[0]) for o in enc["offset_mapping"]]
            if not ids:
                res.append({"tokens": [], "ids": [], "logprobs": [], "offsets": []})
                continue
            lps: list[float | None] = [None]
            if len(ids) > 1:
                # score token k given tokens < k: a prompt of ids[:1] and a continuation of the rest
                lps.extend(self._score_ids([ids[:1]], [ids[1:]])[0])
            toks = [self.tokenizer.decode([t]) for t in ids]
            res.append({"tokens": toks, "ids": ids, "logprobs": lps, "offsets": offs})
        return res

    def _score_ids(self, prefixes: list[list[int]], conts: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of ``conts`` after ``prefixes`` (one row at a time; used by the server)."""
        import torch

        out = []
        dev = self.device
        with torch.inference_mode():
            for pre, cont in zip(prefixes, conts, strict=True):
                seq = pre + cont
                inp = torch.tensor([seq], dtype=torch.long, device=dev)
                pos = torch.arange(len(seq), device=dev).unsqueeze(0)
                logits = self._forward(inp, torch.ones_like(inp), pos, None, keep=len(cont) + 1)
                logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=dev)
                out.append(logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).tolist())
        return out


# ----------------------------------------------------------------------------------------------------------
# Shared-prefix attention: softmax over [shared prefix | the row's own columns], prefix read once per batch
# ----------------------------------------------------------------------------------------------------------

PREFIX_ATTN = "mfllm_prefix_sdpa"
_PREFIX_CTX = threading.local()


@contextmanager
def _shared_prefix(layers) -> Iterator[None]:
    """While active (this thread), attention layers also attend to ``layers[i].keys/values`` (batch 1)."""
    old = getattr(_PREFIX_CTX, "layers", None)
    _PREFIX_CTX.layers = layers
    try:
        yield
    finally:
        _PREFIX_CTX.layers = old


def _use_prefix_attention(lm) -> bool:
    """Switch the model to PREFIX_ATTN where it is safe: a model on sdpa whose attention modules have a
    ``layer_idx``, no sliding windows, no logit soft-capping. Outside a shared-prefix chunk it is plain sdpa."""
    cfg = getattr(lm, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    if any(getattr(text, k, None) for k in ("sliding_window", "attn_logit_softcapping", "use_sliding_window")):
        return False
    if getattr(text, "layer_types", None) and any(t != "full_attention" for t in text.layer_types):
        return False
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - other transformers layouts keep the broadcast path
        return False
    attn_modules = [m for m in lm.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not attn_modules:
        return False
    global _SDPA
    _SDPA = sdpa_attention_forward
    # register() fills the global mapping, which mask creation checks (item assignment would not)
    type(ALL_ATTENTION_FUNCTIONS).register(PREFIX_ATTN, _prefix_sdpa)
    type(ALL_MASK_ATTENTION_FUNCTIONS).register(PREFIX_ATTN, sdpa_mask)
    cfg._attn_implementation = PREFIX_ATTN
    for sub in (text,):  # a text sub-config of a multimodal config
        if sub is not cfg and getattr(sub, "_attn_implementation", None) == "sdpa":
            sub._attn_implementation = PREFIX_ATTN
    return cfg._attn_implementation == PREFIX_ATTN


_SDPA: Any = None


def _prefix_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                 **kwargs):
    """sdpa, plus (inside :func:`_shared_prefix`) a prefix every row attends to in full.

    ``key``/``value`` [B, Hkv, N, D] are the rows' own columns; ``attention_mask`` [B, 1, Q, N] masks them
    (bool, True = attend, or additive). The prefix P [1, Hkv, P, D] is multiplied with all rows' queries at
    once (the rows go into the matmul's M dimension), so its keys/values are read once per layer instead of
    once per row. Softmax runs over the concatenated scores, as attention over the whole sequence does.
    """
    import torch

    layers = getattr(_PREFIX_CTX, "layers", None)
    if layers is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None \
            or kwargs.get("s_aux") is not None:
        return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    layer = layers[module.layer_idx]
    pk, pv = layer.keys, layer.values  # [1, Hkv, P, D]
    b, h, q, d = query.shape
    hkv, n_pre = pk.shape[1], pk.shape[2]
    g = h // hkv
    scale = scaling if scaling is not None else d**-0.5
    # prefix scores: [Hkv, B*g*Q, D] @ [Hkv, D, P]
    qf = query.reshape(b, hkv, g, q, d).permute(1, 0, 2, 3, 4).reshape(hkv, b * g * q, d)
    s_pre = torch.bmm(qf, pk[0].transpose(1, 2)).reshape(hkv, b, g, q, n_pre).permute(1, 0, 2, 3, 4)
    s_pre = s_pre.reshape(b, h, q, n_pre)
    # own columns
    kq = key if g == 1 else key.repeat_interleave(g, dim=1)
    vq = value if g == 1 else value.repeat_interleave(g, dim=1)
    s_own = torch.matmul(query, kq.transpose(-1, -2))
    n_own = s_own.shape[-1]
    if attention_mask is None:
        if q > 1:  # causal within the own columns (the queries are the last q of them)
            qi = torch.arange(n_own - q, n_own, device=query.device).unsqueeze(1)
            ki = torch.arange(n_own, device=query.device).unsqueeze(0)
            s_own = s_own.masked_fill(ki > qi, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        s_own = s_own.masked_fill(~attention_mask[..., :n_own], float("-inf"))
    else:
        s_own = s_own + attention_mask[..., :n_own] / scale  # additive mask, applied before scaling below
    probs = torch.softmax(torch.cat([s_pre, s_own], dim=-1).float() * scale, dim=-1).to(value.dtype)
    p_pre, p_own = probs[..., :n_pre], probs[..., n_pre:]
    pf = p_pre.reshape(b, hkv, g, q, n_pre).permute(1, 0, 2, 3, 4).reshape(hkv, b * g * q, n_pre)
    out = torch.bmm(pf, pv[0]).reshape(hkv, b, g, q, d).permute(1, 0, 2, 3, 4).reshape(b, h, q, d)
    out = out + torch.matmul(p_own, vq)
    return out.transpose(1, 2).contiguous(), None


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


def _transformers_major() -> int:
    import transformers

    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:  # pragma: no cover
        return 5
