"""Backend for any OpenAI-compatible HTTP server (vLLM ``vllm serve``, SGLang, Ollama, OpenAI, ``mfllm serve``).

Design:

* ``httpx.AsyncClient`` directly (not the ``openai`` SDK): we own the retry policy (the SDK's own retries
  would stack with ours), we read ``Retry-After`` and the raw JSON (``usage``, ``logprobs``, server-specific
  fields such as ``prompt_tokens_details.cached_tokens``) without another layer, and the wire format is a few
  JSON fields.
* ``generate`` is synchronous for the caller; under the hood one event loop runs a whole step's requests
  concurrently, bounded by ``max_concurrency`` (a semaphore) and optionally ``rate_limit_rps``.
* Retries with exponential backoff + jitter on 429 (honouring ``Retry-After``), 408/500/502/503/504,
  connection errors, timeouts, malformed and empty completions. After the budget: ``BackendError(kind, ...)``.
  An error is never returned as a completion.
* An on-disk response cache keyed by sha256 of (api, model, prompt, sampling params, seed): re-runs and resumes
  cost nothing. Each entry is written atomically (``mfllm.files``).
* The API key comes from the environment variable ``api_key_env`` or the file ``api_key_file`` only. It is
  never part of ``describe()``, ``repr``, logs or exception messages (messages are scrubbed of it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfllm.backends.base import BackendStats, Completion, GenerationRequest, SamplingParams
from mfllm.errors import BackendError, ConfigError
from mfllm.files import atomic_write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # the openai SDK's set: never another 4xx


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


@dataclass(slots=True)
class _Result:
    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    cached_prompt_tokens: int = 0


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP date
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def params_dict(params: SamplingParams) -> dict:
    return {
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k),
        "max_new_tokens": int(params.max_new_tokens),
        "stop": list(params.stop),
    }


class _RateLimiter:
    """Spaces request starts at least 1/rps seconds apart (shared by all tasks of one loop)."""

    def __init__(self, rps: float):
        self.interval = 1.0 / float(rps)
        self.next_t = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            delay = self.next_t - now
            self.next_t = max(now, self.next_t) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


class OpenAIBackend:
    """``OpenAIBackend(base_url="http://127.0.0.1:8000/v1", model="NAME")``; with no ``model``, the server's only
    model (``GET /models``: the one entry without a ``parent``, so a server's LoRA adapters do not count).

    ``adapter_models={"policy": "served-lora-name"}`` maps ``GenerationRequest.adapter`` to the model name the
    server knows the LoRA by (vLLM: ``--lora-modules NAME=PATH``); without a mapping the adapter name itself is
    sent as the model.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api: str = "completions",
        api_key_env: str = "OPENAI_API_KEY",
        api_key_file: str | os.PathLike | None = None,
        max_concurrency: int = 8,
        rate_limit_rps: float | None = None,
        timeout_s: float = 60.0,
        retries: int = 5,
        cache_dir: str | os.PathLike | None = None,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        empty_is_error: bool = True,
        adapter_models: dict[str, str] | None = None,
        extra_body: dict[str, Any] | None = None,
    ):
        if api not in ("completions", "chat"):
            raise ConfigError(f"api must be 'completions' or 'chat', not {api!r}", field="api")
        if not base_url:
            raise ConfigError("base_url is required", field="base_url")
        if max_concurrency < 1:
            raise ConfigError("max_concurrency must be >= 1", field="max_concurrency")
        if rate_limit_rps is not None and rate_limit_rps <= 0:
            raise ConfigError("rate_limit_rps must be > 0", field="rate_limit_rps")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = api
        self.api_key_env = api_key_env
        self.api_key_file = str(api_key_file) if api_key_file else None
        self.max_concurrency = int(max_concurrency)
        self.rate_limit_rps = rate_limit_rps
        self.timeout_s = float(timeout_s)
        self.retries = max(0, int(retries))
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.empty_is_error = bool(empty_is_error)
        self.adapter_models = dict(adapter_models or {})
        self.extra_body = dict(extra_body or {})
        self.stats = BackendStats()
        self.cache_hits = 0
        self.http_requests = 0  # HTTP attempts actually sent (retries included)
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.__key = self._read_key()
        if not self.model:
            self.model = self._served_model()
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ secrets

    def _read_key(self) -> str | None:
        if self.api_key_file:
            p = Path(self.api_key_file).expanduser()
            try:
                key = p.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError(f"cannot read the API key file: {e.strerror}", path=str(p)) from None
            return key or None
        key = os.environ.get(self.api_key_env, "").strip() if self.api_key_env else ""
        return key or None

    def _served_model(self) -> str:
        """The name of the server's only (base) model, from ``GET {base_url}/models``."""
        import httpx

        url = f"{self.base_url}/models"
        try:
            resp = httpx.get(url, headers=self._headers(), timeout=self.timeout_s)
            resp.raise_for_status()
            cards = [c for c in resp.json()["data"] if isinstance(c, dict) and isinstance(c.get("id"), str)]
        except httpx.HTTPError as e:
            raise BackendError("connection", self._scrub(f"cannot list the models of {url}: {e}")) from None
        except (ValueError, KeyError, TypeError):
            raise BackendError("bad_response", f"{url} did not return a model list") from None
        names = [c["id"] for c in cards if not c.get("parent")]
        if len(names) != 1:
            raise ConfigError(
                f"{url} serves {len(names)} models ({', '.join(names[:5]) or 'none'}): name one with --model",
                field="model",
            )
        return names[0]

    def _scrub(self, text: str) -> str:
        key = self.__key
        if key and key in text:
            text = text.replace(key, "***")
        return text

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, api={self.api!r})"

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "base_url": self.base_url,
            "model": self.model,
            "api": self.api,
            "api_key_env": self.api_key_env if not self.api_key_file else None,
            "api_key_file": self.api_key_file,  # the path only, never the key
            "max_concurrency": self.max_concurrency,
            "rate_limit_rps": self.rate_limit_rps,
            "timeout_s": self.timeout_s,
            "retries": self.retries,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "adapter_models": dict(self.adapter_models),
        }

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.__key:
            h["Authorization"] = f"Bearer {self.__key}"
        return h

    # ------------------------------------------------------------------ cache

    def _model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.model
        return self.adapter_models.get(adapter, adapter)

    def cache_key(self, kind: str, model: str, prompt: str, params: dict | None, seed: int | None) -> str:
        blob = json.dumps(
            {
                "v": CACHE_VERSION,
                "kind": kind,
                "api": self.api,
                "model": model,
                "prompt": prompt,
                "params": params,
                "seed": seed,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        if not self.cache_dir:
            return None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a damaged entry is a miss; it will be rewritten

    def _cache_put(self, key: str, value: dict) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, value, indent=None)

    # ------------------------------------------------------------------ sync facade

    @staticmethod
    def _run(coro):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with ThreadPoolExecutor(max_workers=1) as ex:  # called from inside an event loop (e.g. Jupyter)
            return ex.submit(asyncio.run, coro).result()

    # ------------------------------------------------------------------ generation

    def _body(self, req: GenerationRequest, model: str) -> tuple[str, dict]:
        p = req.params
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": int(p.max_new_tokens),
            "temperature": float(max(0.0, p.temperature)),
            "seed": int(req.seed),  # as is: the server maps it to its sampler (see mfllm.seeds)
            "n": 1,
        }
        if not p.greedy:
            body["top_p"] = float(p.top_p)
            if p.top_k > 0:
                body["top_k"] = int(p.top_k)  # vLLM / SGLang extension
        if p.stop:
            body["stop"] = list(p.stop)
        body.update(self.extra_body)
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
            return "/chat/completions", body
        body["prompt"] = req.prompt
        return "/completions", body

    def _parse_generation(self, data: Any) -> _Result:
        try:
            choice = data["choices"][0]
            if self.api == "chat":
                text = (choice.get("message") or {}).get("content")
            else:
                text = choice.get("text")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable("bad_response", "the response has no choices") from None
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise _Retryable("bad_response", "the completion is not a string")
        if self.empty_is_error and not text.strip():
            raise _Retryable("empty", "the server returned an empty completion")
        try:
            usage = data.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            finish = choice.get("finish_reason") or "stop"
            return _Result(
                text=text,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                generated_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason="length" if finish == "length" else "stop",
                cached_prompt_tokens=int(details.get("cached_tokens") or 0),
            )
        except (AttributeError, TypeError, ValueError):
            raise _Retryable("bad_response", "malformed 'usage' in the response") from None

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        if not requests:
            return []
        t0 = time.perf_counter()
        out: list[Completion | None] = [None] * len(requests)
        todo: list[tuple[int, str, str, dict]] = []  # (index, cache key, path, body)
        for i, req in enumerate(requests):
            model = self._model_for(req.adapter)
            key = self.cache_key("generate", model, req.prompt, params_dict(req.params), int(req.seed))
            hit = self._cache_get(key)
            if hit is not None and isinstance(hit.get("text"), str):
                pt = int(hit.get("prompt_tokens", 0))
                out[i] = Completion(
                    text=hit["text"],
                    prompt_tokens=pt,
                    generated_tokens=int(hit.get("generated_tokens", 0)),
                    finish_reason=str(hit.get("finish_reason", "stop")),
                    cached_prompt_tokens=pt,
                )
                self.cache_hits += 1
                continue
            path, body = self._body(req, model)
            todo.append((i, key, path, body))
        if todo:
            results = self._run(
                self._gather([(path, body) for _, _, path, body in todo], self._parse_generation)
            )
            first_error: BackendError | None = None
            for (i, key, _, _), res in zip(todo, results, strict=True):
                if isinstance(res, BaseException):
                    if first_error is None:
                        first_error = (
                            res
                            if isinstance(res, BackendError)
                            else BackendError("internal", self._scrub(f"{type(res).__name__}: {res}"))
                        )
                    continue
                self._cache_put(
                    key,
                    {
                        "text": res.text,
                        "prompt_tokens": res.prompt_tokens,
                        "generated_tokens": res.generated_tokens,
                        "finish_reason": res.finish_reason,
                    },
                )
                out[i] = Completion(
                    text=res.text,
                    prompt_tokens=res.prompt_tokens,
                    generated_tokens=res.generated_tokens,
                    finish_reason=res.finish_reason,
                    cached_prompt_tokens=res.cached_prompt_tokens,
                )
            if first_error is not None:
                # the successful ones are cached: a retry of the step only pays for the failed ones
                self.stats.seconds += time.perf_counter() - t0
                raise first_error
        done = [c for c in out if c is not None]
        with self._lock:
            self.stats.add(done, time.perf_counter() - t0)
        return done

    async def _gather(self, items: list[tuple[str, dict]], parse) -> list[Any]:
        import httpx

        sem = asyncio.Semaphore(self.max_concurrency)
        limiter = _RateLimiter(self.rate_limit_rps) if self.rate_limit_rps else None
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits) as client:

            async def one(path: str, body: dict):
                async with sem:
                    return await self._post_with_retries(client, path, body, parse, limiter)

            return await asyncio.gather(*(one(p, b) for p, b in items), return_exceptions=True)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        delay = cap / 2 + self._rng.uniform(0, cap / 2)  # "equal jitter"
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    async def _post_with_retries(self, client, path: str, body: dict, parse, limiter) -> Any:
        import httpx

        last_kind, last_msg = "unknown", ""
        for attempt in range(self.retries + 1):
            if limiter is not None:
                await limiter.wait()
            retry_after = None
            try:
                self.http_requests += 1
                # httpx's timeout bounds each read, not the whole answer: a server trickling a byte at a time
                # would hold the call forever. This bounds the attempt.
                resp = await asyncio.wait_for(
                    client.post(path, json=body, headers=self._headers()), self.timeout_s
                )
                status = resp.status_code
                if status == 200:
                    try:
                        data = resp.json()
                    except ValueError:
                        raise _Retryable("bad_response", "the response is not JSON") from None
                    return parse(data)
                detail = self._scrub(_error_detail(resp))
                if status in RETRY_STATUS:
                    kind = "rate_limit" if status == 429 else ("timeout" if status == 408 else "server_error")
                    retry_after = _parse_retry_after(resp.headers.get("retry-after"))
                    raise _Retryable(kind, f"HTTP {status} from {self.base_url}{path}: {detail}", retry_after)
                kind = {
                    400: "bad_request",
                    401: "auth",
                    403: "auth",
                    404: "not_found",
                    422: "bad_request",
                }.get(status, f"http_{status}")
                raise BackendError(kind, f"HTTP {status} from {self.base_url}{path}: {detail}")
            except _Retryable as e:
                last_kind, last_msg, retry_after = e.kind, e.message, e.retry_after
            except (TimeoutError, httpx.TimeoutException):
                last_kind, last_msg = (
                    "timeout",
                    f"no answer from {self.base_url}{path} within {self.timeout_s}s",
                )
            except httpx.TransportError as e:
                last_kind, last_msg = "connection", self._scrub(f"cannot reach {self.base_url}{path}: {e!r}")
            if attempt < self.retries:
                delay = self._backoff(attempt, retry_after)
                log.warning(
                    "LLM call failed (%s), retry %d/%d in %.1fs", last_kind, attempt + 1, self.retries, delay
                )
                await asyncio.sleep(delay)
        raise BackendError(last_kind, f"{last_msg} (after {self.retries + 1} attempts)")

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: list[str], continuations: list[str]) -> list[float]:
        return [s for s, _ in self.score_tokens(prompts, continuations)]

    def score_tokens(self, prompts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        """(sum log p(continuation | prompt), number of continuation tokens) via the completions API with
        ``echo=True, logprobs=0, max_tokens=0``. The server tokenizes prompt + continuation as one text; tokens
        starting at or after ``len(prompt)`` (character offsets) count as the continuation."""
        if len(prompts) != len(continuations):
            raise ValueError("score: prompts and continuations differ in length")
        if not prompts:
            return []
        if self.api != "completions":
            raise BackendError("unsupported", "scoring needs the completions API (api='completions')")
        out: list[tuple[float, int] | None] = [None] * len(prompts)
        todo = []
        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            if not c:
                out[i] = (0.0, 0)
                continue
            key = self.cache_key("score", self.model, p + "\x00" + c, None, None)
            hit = self._cache_get(key)
            if hit is not None and "logprob" in hit:
                out[i] = (float(hit["logprob"]), int(hit["tokens"]))
                self.cache_hits += 1
                continue
            body = {
                "model": self.model,
                "prompt": p + c,
                "max_tokens": 0,
                "echo": True,
                "logprobs": 0,
                "temperature": 0.0,
            }
            todo.append((i, key, len(p), len(p) + len(c), body))
        if todo:

            def parse(data):
                return data

            results = self._run(self._gather([("/completions", b) for *_, b in todo], parse))
            for (i, key, start, end, _), res in zip(todo, results, strict=True):
                if isinstance(res, BackendError):
                    if res.kind in ("bad_request", "not_found"):
                        raise BackendError("unsupported", f"the server cannot score (echo + logprobs): {res}")
                    raise res
                if isinstance(res, BaseException):
                    raise BackendError("internal", self._scrub(f"{type(res).__name__}: {res}"))
                val = _sum_echo_logprobs(res, start, end)
                self._cache_put(key, {"logprob": val[0], "tokens": val[1]})
                out[i] = val
        return [x if x is not None else (0.0, 0) for x in out]


def _sum_echo_logprobs(data: Any, start: int, end: int) -> tuple[float, int]:
    try:
        lp = data["choices"][0]["logprobs"]
        offsets = lp["text_offset"]
        values = lp["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise BackendError(
            "unsupported", "the server returned no prompt logprobs (echo + logprobs)"
        ) from None
    total, n = 0.0, 0
    for off, v in zip(offsets, values, strict=False):
        if start <= off < end:
            if v is None:
                raise BackendError("unsupported", "the server returned no logprob for a continuation token")
            total += float(v)
            n += 1
    return total, n


def _error_detail(resp) -> str:
    try:
        data = resp.json()
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            msg = err.get("message") or json.dumps(err)[:300]
        elif err:
            msg = str(err)
        else:
            msg = json.dumps(data)[:300]
    except ValueError:
        msg = resp.text[:300]
    return str(msg)[:300]
