"""``mfllm serve``: a small OpenAI-compatible HTTP server for a local model (stdlib only).

Endpoints, in the shapes the official ``openai`` SDK parses:

- ``POST /v1/completions``: prompt string or list, max_tokens, temperature, top_p, top_k, seed, stop, ``n``,
  ``stream`` (+ ``stream_options.include_usage``), echo + logprobs with max_tokens=0 for scoring.
- ``POST /v1/chat/completions``: the messages go through the tokenizer's chat template when the model has one
  (``tokenizer.chat_template``); a model without one (mfllm-mini) gets the contents joined by newlines.
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.

``n > 1``: choice ``j`` of a prompt is sampled with seed ``derive_seed(seed, j)`` for ``j >= 1`` and ``seed``
itself for ``j = 0`` (so ``n=1`` and the first choice of ``n=2`` agree); choices are indexed
``prompt_index * n + j`` (vLLM's order). ``usage.prompt_tokens`` counts each prompt once.

``stream=true`` frames the finished answer as server-sent events (``data: {chunk}`` lines ending with
``data: [DONE]``): the backend generates whole batches, not token by token, so the chunks arrive together once
the completion is done. Errors are found before the first byte, so they are plain HTTP errors, never mid-stream.

Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a string (or null) code.
A prompt longer than the model's context is ``400 context_length_exceeded`` (not retried by clients).

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
from urllib.parse import unquote

from mfllm.backends.base import Backend, Completion, GenerationRequest, SamplingParams
from mfllm.backends.openai_wire import choice_seeds, error_body, stream_chunks, usage
from mfllm.errors import BackendError, MfllmError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 4 * 1024 * 1024
MAX_TOKENS_LIMIT = 8192
MAX_N = 128
DRAIN_LIMIT = 16 * 1024 * 1024


class _HTTPError(Exception):
    """An answer other than 200: status, and the fields of OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        etype: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.etype, self.code, self.param = status, message, etype, code, param


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
        self.created = int(time.time())
        self._strip_bos: bool | None = None

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def adapter_names(self) -> list[str]:
        return sorted(getattr(self.backend, "adapters", {}) or {})

    def model_cards(self) -> list[dict]:
        """``/v1/models`` entries; an adapter names its base model in ``parent`` (vLLM's convention), so a
        client looking for "the server's only model" can tell the base model from its LoRA adapters."""
        base = {"object": "model", "created": self.created, "owned_by": "mfllm", "root": self.model_name}
        cards = [{"id": self.model_name, **base, "parent": None}]
        return cards + [{"id": a, **base, "parent": self.model_name} for a in self.adapter_names()]

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt for chat ``messages``: the tokenizer's chat template when it has one, else the contents
        joined by newlines."""
        tok = getattr(self.backend, "tokenizer", None)
        if not getattr(tok, "chat_template", None):
            return "\n".join(m["content"] for m in messages)
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception() (jinja2) or a bad message
            raise _HTTPError(
                400, f"the model's chat template refused the messages: {e}", param="messages"
            ) from None
        if self._strip_bos is None:  # the backend tokenizes with special tokens: don't send BOS twice
            ids = tok("x", add_special_tokens=True)["input_ids"]
            self._strip_bos = bool(tok.bos_token) and ids[:1] == [tok.bos_token_id]
        if self._strip_bos and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token) :]
        return text


class _Handler(BaseHTTPRequestHandler):
    server: MfllmHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "mfllm-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    # -------------------------------------------------------------- plumbing

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if content_type.startswith("text/event-stream"):
            self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._send_bytes(status, body, "application/json; charset=utf-8")

    def _send_stream(self, chunks: list[dict]) -> None:
        """Server-sent events, one ``data:`` line per chunk, then ``data: [DONE]``."""
        events = [f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
        self._send_bytes(200, "".join(events).encode("utf-8"), "text/event-stream; charset=utf-8")

    def _error(self, e: _HTTPError) -> None:
        self._send(e.status, error_body(e.message, e.etype, e.code, e.param))

    def _authorized(self) -> bool:
        key = self.server._api_key
        if not key:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {key}".encode())

    def _unauthorized(self) -> _HTTPError:
        return _HTTPError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

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
        try:
            if path == "/health":
                self._send(200, {"status": "ok"})
                return
            if not self._authorized():
                raise self._unauthorized()
            cards = self.server.model_cards()
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": cards})
                return
            if path.startswith("/v1/models/"):
                name = unquote(path[len("/v1/models/") :])
                card = next((c for c in cards if c["id"] == name), None)
                if card is None:
                    raise _HTTPError(404, f"the model {name!r} does not exist", code="model_not_found")
                self._send(200, card)
                return
            raise _HTTPError(404, f"no such endpoint: GET {path}", "not_found_error")
        except _HTTPError as e:
            self._error(e)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if not self._authorized():
                raise self._unauthorized()
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise _HTTPError(404, f"no such endpoint: POST {path}", "not_found_error")
            body = self._read_json()
            stream, include_usage = self._stream_options(body)
            payload = self._completions(body) if path == "/v1/completions" else self._chat(body)
            self.server.requests_served += 1
            if stream:
                self._send_stream(stream_chunks(payload, include_usage))
            else:
                self._send(200, payload)
        except _HTTPError as e:
            self._error(e)
        except BackendError as e:
            if e.kind == "context_length":  # the request's fault, and retrying cannot help
                param = "messages" if path.endswith("chat/completions") else "prompt"
                self._error(_HTTPError(400, str(e), code="context_length_exceeded", param=param))
            else:
                self._error(_HTTPError(500, str(e), "server_error"))
        except MfllmError as e:
            self._error(_HTTPError(400, str(e)))
        except Exception as e:  # noqa: BLE001 - never kill the connection without an answer
            log.exception("internal error")
            self._error(_HTTPError(500, f"internal error: {type(e).__name__}", "server_error"))

    # -------------------------------------------------------------- request parsing

    def _adapter_for(self, model: Any) -> str | None:
        if model is None or model == self.server.model_name:
            return None
        if isinstance(model, str) and model in self.server.adapter_names():
            return model
        raise _HTTPError(
            404, f"unknown model {model!r} (see GET /v1/models)", code="model_not_found", param="model"
        )

    @staticmethod
    def _num(body: dict, key: str, default: float, lo: float, hi: float) -> float:
        v = body.get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _HTTPError(400, f"'{key}' must be a number", param=key)
        if not lo <= float(v) <= hi:
            raise _HTTPError(400, f"'{key}' must be in [{lo}, {hi}]", param=key)
        return float(v)

    @staticmethod
    def _stream_options(body: dict) -> tuple[bool, bool]:
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _HTTPError(400, "'stream' must be a boolean", param="stream")
        opts = body.get("stream_options")
        if opts is None:
            return bool(stream), False
        if not stream:
            raise _HTTPError(400, "'stream_options' is only allowed with stream=true", param="stream_options")
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise _HTTPError(
                400,
                "'stream_options' must be an object like {\"include_usage\": true}",
                param="stream_options",
            )
        return True, bool(opts.get("include_usage", False))

    def _params(self, body: dict) -> tuple[SamplingParams, int, int]:
        """The sampling parameters, the seed and ``n``."""
        n = int(self._num(body, "n", 1, 1, MAX_N))
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
            raise _HTTPError(400, "'stop' must be a string or a list of strings", param="stop")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(31)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise _HTTPError(400, "'seed' must be an integer", param="seed")
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=max(0, top_k), max_new_tokens=max_tokens, stop=stops
        )
        return params, int(seed), n

    def _generate(self, prompts: list[str], body: dict, adapter: str | None) -> tuple[list[Completion], int]:
        """``n`` completions per prompt (prompt-major order) through the batcher, and ``n``."""
        params, seed, n = self._params(body)
        seeds = choice_seeds(seed, n)
        reqs = [
            GenerationRequest(prompt=p, seed=s, params=params, adapter=adapter)
            for p in prompts
            for s in seeds
        ]
        return self.server.batcher.submit(reqs), n

    # -------------------------------------------------------------- endpoints

    def _completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise _HTTPError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        adapter = self._adapter_for(body.get("model"))
        echo = bool(body.get("echo", False))
        model = body.get("model") or self.server.model_name
        if body.get("logprobs") is not None:
            params, _, n = self._params(body)
            if not (echo and params.max_new_tokens == 0 and n == 1):
                raise _HTTPError(
                    400,
                    "logprobs are only supported with echo=true, max_tokens=0 and n=1 (scoring)",
                    param="logprobs",
                )
            return self._score_echo(prompts, model, adapter)
        outs, n = self._generate(prompts, body, adapter)
        choices = [
            {
                "index": k,
                "text": (prompts[k // n] + c.text) if echo else c.text,
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for k, c in enumerate(outs)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage(outs, n),
        }

    def _score_echo(self, prompts: list[str], model: str, adapter: str | None) -> dict:
        backend = self.server.backend
        fn = getattr(backend, "token_logprobs", None)
        if fn is None:
            raise _HTTPError(400, "this backend cannot return prompt logprobs")
        if adapter is not None:
            raise _HTTPError(400, "scoring with a LoRA adapter is not supported by this server")
        limit = getattr(backend, "max_context", 0) or 0
        encode = getattr(backend, "encode", None)
        if limit and encode is not None:
            longest = max(len(ids) for ids in encode(prompts))
            if longest > limit:
                raise _HTTPError(
                    400,
                    f"a text of {longest} tokens is longer than the model's context of {limit} tokens",
                    code="context_length_exceeded",
                    param="prompt",
                )
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

    @staticmethod
    def _messages(body: dict) -> list[dict]:
        """The chat messages as ``{"role", "content"}`` with string contents (text parts joined)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "'messages' must be a non-empty list", param="messages")
        out = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role", "user"), str):
                raise _HTTPError(400, "each message must be an object with a string 'role'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise _HTTPError(400, "message content must be a string", param="messages")
            out.append({"role": m.get("role", "user"), "content": content})
        return out

    def _chat(self, body: dict) -> dict:
        messages = self._messages(body)
        adapter = self._adapter_for(body.get("model"))
        if body.get("logprobs"):
            raise _HTTPError(400, "logprobs are not supported on chat completions", param="logprobs")
        prompt = self.server.chat_prompt(messages)
        outs, n = self._generate([prompt], body, adapter)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.server.model_name,
            "choices": [
                {
                    "index": j,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for j, c in enumerate(outs)
            ],
            "usage": usage(outs, n),
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
    model: str | None = None,
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
    """Load ``model`` (default: the shipped paths.DEFAULT_MODEL) with HFBackend and serve it until interrupted."""
    from mfllm.backends.hf import HFBackend  # torch + transformers: loaded only to serve
    from mfllm.paths import DEFAULT_MODEL

    backend = HFBackend(
        str(model or DEFAULT_MODEL), device=device, dtype=dtype, batch_size=batch_size, adapters=adapters
    )
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
