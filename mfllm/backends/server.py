"""``mfllm serve``: a small OpenAI-compatible HTTP server for a local model (stdlib only).

Endpoints: ``POST /v1/completions`` (prompt string or list, max_tokens, temperature, top_p, top_k, seed, stop,
n=1, echo + logprobs with max_tokens=0 for scoring), ``POST /v1/chat/completions`` (the messages' contents are
joined into one prompt), ``GET /v1/models``, ``GET /health``. Responses carry ``usage``.

Concurrent HTTP requests are micro-batched: requests arriving within ``batch_wait_s`` of each other go to the
backend as one batch. With :class:`~mfllm.backends.hf.HFBackend` this changes no output (per-request seeds
make sampling independent of the batch). The model name in a request may name a LoRA adapter role of the
backend (vLLM's convention), which selects that adapter.

Binds 127.0.0.1 by default. If the environment variable named by ``api_key_env`` (default
``MFLLM_SERVE_API_KEY``) is set, requests must send ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mfllm.backends.base import Backend, Completion, GenerationRequest, SamplingParams
from mfllm.errors import BackendError, MfllmError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 4 * 1024 * 1024
MAX_TOKENS_LIMIT = 8192
DRAIN_LIMIT = 16 * 1024 * 1024


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, etype: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.etype = status, message, etype


class Batcher:
    """Collects generation requests from many HTTP threads into backend batches (one worker thread)."""

    def __init__(self, backend: Backend, lock: threading.Lock, max_batch: int = 64, wait_s: float = 0.01):
        self.backend, self.lock = backend, lock
        self.max_batch, self.wait_s = max(1, int(max_batch)), float(wait_s)
        self.q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mfllm-batcher", daemon=True)
        self.thread.start()

    def submit(self, reqs: list[GenerationRequest]) -> list[Completion]:
        futs = []
        for r in reqs:
            f: Future = Future()
            self.q.put((r, f))
            futs.append(f)
        return [f.result() for f in futs]

    def close(self) -> None:
        self._stop.set()
        self.q.put(None)
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self.q.get()
            if item is None:
                break
            batch = [item]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self.q.get(timeout=max(0.0, left)) if left > 0 else self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
            self._run(batch)

    def _run(self, batch: list) -> None:
        try:
            with self.lock:
                outs = self.backend.generate([r for r, _ in batch])
            for (_, f), c in zip(batch, outs, strict=True):
                f.set_result(c)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) > 1:  # one bad request (e.g. too long) must not fail the others
                for item in batch:
                    self._run([item])
            else:
                batch[0][1].set_exception(e)


class MfllmHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        addr,
        backend: Backend,
        model_name: str,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        batch_wait_s: float = 0.01,
        max_batch: int = 64,
        api_key: str | None = None,
    ):
        super().__init__(addr, _Handler)
        self.backend = backend
        self.model_name = model_name
        self.max_body_bytes = int(max_body_bytes)
        self.backend_lock = threading.Lock()
        self.batcher = Batcher(backend, self.backend_lock, max_batch=max_batch, wait_s=batch_wait_s)
        self._api_key = api_key
        self.requests_served = 0

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def adapter_names(self) -> list[str]:
        return sorted(getattr(self.backend, "adapters", {}) or {})


class _Handler(BaseHTTPRequestHandler):
    server: MfllmHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "mfllm-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    # -------------------------------------------------------------- plumbing

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, etype: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": etype, "code": status}})

    def _authorized(self) -> bool:
        key = self.server._api_key
        if not key:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {key}".encode())

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise _HTTPError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if n < 0:
            raise _HTTPError(400, "bad Content-Length")
        if n > self.server.max_body_bytes:
            if n <= DRAIN_LIMIT:  # read and drop it, so the client can read our answer
                left = n
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            self.close_connection = True
            raise _HTTPError(413, f"request body over {self.server.max_body_bytes} bytes")
        raw = self.rfile.read(n)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _HTTPError(400, "malformed JSON body") from None
        if not isinstance(data, dict):
            raise _HTTPError(400, "the JSON body must be an object")
        return data

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok"})
            return
        if not self._authorized():
            self._error(401, "missing or wrong API key", "authentication_error")
            return
        if path == "/v1/models":
            names = [self.server.model_name, *self.server.adapter_names()]
            self._send(
                200,
                {
                    "object": "list",
                    "data": [{"id": n, "object": "model", "created": 0, "owned_by": "mfllm"} for n in names],
                },
            )
            return
        self._error(404, f"no such endpoint: GET {path}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if not self._authorized():
                raise _HTTPError(401, "missing or wrong API key", "authentication_error")
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise _HTTPError(404, f"no such endpoint: POST {path}", "not_found_error")
            body = self._read_json()
            if path == "/v1/completions":
                payload = self._completions(body)
            else:
                payload = self._chat(body)
            self.server.requests_served += 1
            self._send(200, payload)
        except _HTTPError as e:
            self._error(e.status, e.message, e.etype)
        except BackendError as e:
            self._error(500, str(e), "server_error")
        except MfllmError as e:
            self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 - never kill the connection without an answer
            log.exception("internal error")
            self._error(500, f"internal error: {type(e).__name__}", "server_error")

    # -------------------------------------------------------------- request parsing

    def _adapter_for(self, model: Any) -> str | None:
        if model is None or model == self.server.model_name:
            return None
        if isinstance(model, str) and model in self.server.adapter_names():
            return model
        raise _HTTPError(404, f"unknown model {model!r} (see GET /v1/models)", "not_found_error")

    @staticmethod
    def _num(body: dict, key: str, default: float, lo: float, hi: float) -> float:
        v = body.get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _HTTPError(400, f"'{key}' must be a number")
        if not lo <= float(v) <= hi:
            raise _HTTPError(400, f"'{key}' must be in [{lo}, {hi}]")
        return float(v)

    def _params(self, body: dict) -> tuple[SamplingParams, int]:
        if int(self._num(body, "n", 1, 1, 1)) != 1:
            raise _HTTPError(400, "only n=1 is supported")
        max_tokens = int(self._num(body, "max_tokens", 16, 0, MAX_TOKENS_LIMIT))
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            max_tokens = int(self._num(body, "max_completion_tokens", 16, 0, MAX_TOKENS_LIMIT))
        temperature = self._num(body, "temperature", 1.0, 0.0, 100.0)
        top_p = self._num(body, "top_p", 1.0, 0.0, 1.0)
        top_k = int(self._num(body, "top_k", 0, -1, 1 << 30))
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,) if stop else ()
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = tuple(s for s in stop if s)
        else:
            raise _HTTPError(400, "'stop' must be a string or a list of strings")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(31)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise _HTTPError(400, "'seed' must be an integer")
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=max(0, top_k), max_new_tokens=max_tokens, stop=stops
        )
        return params, int(seed)

    @staticmethod
    def _usage(outs: list[Completion]) -> dict:
        pt = sum(c.prompt_tokens for c in outs)
        ct = sum(c.generated_tokens for c in outs)
        return {
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "total_tokens": pt + ct,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_prompt_tokens for c in outs)},
        }

    # -------------------------------------------------------------- endpoints

    def _completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise _HTTPError(400, "'prompt' must be a string or a non-empty list of strings")
        adapter = self._adapter_for(body.get("model"))
        params, seed = self._params(body)
        echo = bool(body.get("echo", False))
        logprobs = body.get("logprobs")
        model = body.get("model") or self.server.model_name
        if logprobs is not None:
            if not (echo and params.max_new_tokens == 0):
                raise _HTTPError(400, "logprobs are only supported with echo=true and max_tokens=0 (scoring)")
            return self._score_echo(prompts, model, adapter)
        reqs = [GenerationRequest(prompt=p, seed=seed, params=params, adapter=adapter) for p in prompts]
        outs = self.server.batcher.submit(reqs)
        choices = [
            {
                "index": i,
                "text": (p + c.text) if echo else c.text,
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, (p, c) in enumerate(zip(prompts, outs, strict=True))
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": self._usage(outs),
        }

    def _score_echo(self, prompts: list[str], model: str, adapter: str | None) -> dict:
        backend = self.server.backend
        fn = getattr(backend, "token_logprobs", None)
        if fn is None:
            raise _HTTPError(400, "this backend cannot return prompt logprobs")
        if adapter is not None:
            raise _HTTPError(400, "scoring with a LoRA adapter is not supported by this server")
        with self.server.backend_lock:
            rows = fn(prompts)
        choices = []
        total = 0
        for i, (p, row) in enumerate(zip(prompts, rows, strict=True)):
            total += len(row["ids"])
            choices.append(
                {
                    "index": i,
                    "text": p,
                    "logprobs": {
                        "tokens": row["tokens"],
                        "token_logprobs": row["logprobs"],
                        "top_logprobs": None,
                        "text_offset": row["offsets"],
                    },
                    "finish_reason": "length",
                }
            )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total},
        }

    def _chat(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "'messages' must be a non-empty list")
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                raise _HTTPError(400, "each message must be an object")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise _HTTPError(400, "message content must be a string")
            parts.append(content)
        prompt = "\n".join(parts)
        adapter = self._adapter_for(body.get("model"))
        params, seed = self._params(body)
        if body.get("logprobs"):
            raise _HTTPError(400, "logprobs are not supported on chat completions")
        outs = self.server.batcher.submit(
            [GenerationRequest(prompt=prompt, seed=seed, params=params, adapter=adapter)]
        )
        c = outs[0]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.server.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                }
            ],
            "usage": self._usage(outs),
        }


def make_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    batch_wait_s: float = 0.01,
    max_batch: int | None = None,
    api_key_env: str | None = "MFLLM_SERVE_API_KEY",
) -> MfllmHTTPServer:
    """A ready server (not yet serving: call ``serve_forever()``, e.g. in a thread). ``port=0`` picks a free
    port; see ``server.server_address`` / ``server.url``."""
    if model_name is None:
        desc = backend.describe()
        model_name = os.path.basename(str(desc.get("model", "mfllm")).rstrip("/")) or "mfllm"
    api_key = (os.environ.get(api_key_env, "").strip() or None) if api_key_env else None
    return MfllmHTTPServer(
        (host, int(port)),
        backend,
        model_name=model_name,
        max_body_bytes=max_body_bytes,
        batch_wait_s=batch_wait_s,
        max_batch=max_batch or getattr(backend, "batch_size", 64),
        api_key=api_key,
    )


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int = 64,
    adapters: dict[str, str] | None = None,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> None:
    """Load ``model`` with HFBackend and serve it until interrupted."""
    from mfllm.backends.hf import HFBackend

    backend = HFBackend(model, device=device, dtype=dtype, batch_size=batch_size, adapters=adapters)
    server = make_server(backend, host, port, model_name=model_name, max_body_bytes=max_body_bytes)
    if host not in ("127.0.0.1", "localhost", "::1") and server._api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use the model", host)
    print(f"mfllm serve: {server.model_name} on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
