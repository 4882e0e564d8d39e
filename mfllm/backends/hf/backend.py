"""Local Hugging Face backend: any ``AutoModelForCausalLM`` directory with safetensors weights, sampled with
our own decoding loop (:mod:`.decoding`: per-request seeds, batch invariant, shared prompt prefix run once).

Only safetensors weights are loaded (``use_safetensors=True``: never pickle).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from mfllm.backends.base import BackendStats, Completion, GenerationRequest
from mfllm.backends.hf.attention import use_prefix_attention
from mfllm.backends.hf.decoding import Decoded, DecodeOptions, decode
from mfllm.backends.hf.loading import load_adapters, load_lm
from mfllm.backends.hf.sampling import SAMPLER_VERSION
from mfllm.errors import BackendError, ConfigError


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
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1", field="batch_size")
        lm, self.num_threads = load_lm(model_path, device, dtype, num_threads)
        self.model_path = Path(model_path)
        self.device = lm.device
        self.dtype = lm.dtype
        self.batch_size = int(batch_size)
        self.seed_base = int(seed_base)
        self.prefix_cache = bool(prefix_cache)
        self.min_prefix_tokens = max(1, int(min_prefix_tokens))
        self.stop_check_interval = max(1, int(stop_check_interval))
        self.score_budget = int(score_budget)
        self.stats = BackendStats()

        self.adapters: dict[str, str] = {}
        self._peft = None
        if adapters:
            # LoRA layers are injected in place: lm.model (the base model) now carries them
            self._peft = load_adapters(lm.model, adapters, self.device)
            self.adapters = {role: str(p) for role, p in adapters.items()}
        self._lm_handle = lm
        self._lm = lm.model
        self.tokenizer = lm.tokenizer
        self.max_context = lm.max_context
        self._vocab = lm.vocab
        self.pad_token_id = lm.pad_token_id
        # attention over the shared prefix computed once for all rows (see attention.prefix_sdpa)
        self.prefix_attention = bool(prefix_attention) and self.prefix_cache and use_prefix_attention(self._lm)

    @property
    def eos_token_ids(self) -> set[int]:
        """Tokens that end a row (the decoding loop reads them from the model handle)."""
        return self._lm_handle.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:
        self._lm_handle.eos_token_ids = set(ids)

    # ------------------------------------------------------------------ helpers

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
        return self._lm_handle.encode(texts, add_special_tokens=add_special_tokens)

    def _encode_prompts(self, texts: list[str]) -> list[list[int]]:
        return self._lm_handle.encode_prompts(texts)

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

    def _options(self) -> DecodeOptions:
        return DecodeOptions(batch_size=self.batch_size, seed_base=self.seed_base, prefix_cache=self.prefix_cache,
                             min_prefix_tokens=self.min_prefix_tokens, stop_check_interval=self.stop_check_interval,
                             prefix_attention=self.prefix_attention)

    # ------------------------------------------------------------------ generation

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
        opts = self._options()
        try:
            for adapter, idxs in groups.items():
                with self._adapter_ctx(adapter):
                    outs = decode(self._lm_handle, [enc[i] for i in idxs], [requests[i].params for i in idxs],
                                  [requests[i].seed for i in idxs], opts)
                for i, d in zip(idxs, outs, strict=True):
                    results[i] = self._completion(requests[i], len(enc[i]), d)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            raise BackendError("oom", f"out of GPU memory (lower batch_size): {e}") from e
        done = [c for c in results if c is not None]
        if len(done) != len(requests):  # pragma: no cover - defensive
            raise BackendError("internal", "a request got no result")
        self.stats.add(done, time.perf_counter() - t0, budget_capped=capped)
        return done

    def _completion(self, req: GenerationRequest, n_prompt: int, d: Decoded) -> Completion:
        """Text (stop strings cut, eos dropped) and token counts of one request."""
        if req.params.max_new_tokens <= 0:
            return Completion(text="", prompt_tokens=n_prompt, generated_tokens=0, finish_reason="length")
        toks = d.tokens
        finish = "stop" if d.hit_eos or d.stopped else "length"
        text = self.tokenizer.decode(toks[:-1] if d.hit_eos else toks, skip_special_tokens=True)
        n_used = len(toks)
        stops = req.params.stop
        if d.stopped or (stops and any(s in text for s in stops)):
            cut = min(text.find(s) for s in stops if s in text)
            text = text[:cut]
            finish = "stop"
            # the fewest tokens whose text holds the stop string (independent of the check interval)
            for n in range(1, len(toks) + 1):
                t = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
                if any(s in t for s in stops):
                    n_used = n
                    break
        return Completion(text=text, prompt_tokens=n_prompt, generated_tokens=n_used, finish_reason=finish,
                          cached_prompt_tokens=d.cached_prompt_tokens)

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
        p_ids = self._lm_handle.encode_prompts(list(prompts))
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
                logits = self._lm_handle.forward(inp.to(dev), attn.to(dev), pos.to(dev), None, keep=length - first)
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
                logits = self._lm_handle.forward(inp, torch.ones_like(inp), pos, None, keep=len(cont) + 1)
                logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=dev)
                out.append(logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).tolist())
        return out
