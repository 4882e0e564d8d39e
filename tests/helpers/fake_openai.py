"""A scriptable, fault-injecting OpenAI-style HTTP server (stdlib) for backend tests.

``FakeOpenAI(script)``: ``script(n, body, headers)`` returns (status, payload dict, extra headers) for the
n-th request (0-based), or a float to sleep that long first and then answer ``ok_payload``. It counts
requests and the most requests in flight at once.

Transport-level faults: the script may also return ``RESET`` (drop the connection without an answer) or a
``Raw(status, body_bytes, headers, declared=..., trickle_s=...)``: any bytes (not JSON, truncated with a
larger Content-Length than sent, or trickled a byte at a time: a slow stream).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESET = "reset"  # script answer: close the connection with a TCP reset, no HTTP answer


@dataclass
class Raw:
    """A hand-made HTTP answer: `body` as is; `declared` = the Content-Length sent (more than the body:
    a truncated answer, the connection is closed after the body); `trickle_s` = pause before each byte."""

    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    declared: int | None = None
    trickle_s: float = 0.0


def ok_payload(text: str = "好的", prompt_tokens: int = 5, completion_tokens: int = 2) -> dict:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class FakeOpenAI:
    def __init__(self, script, delay_s: float = 0.0):
        self.script = script
        self.delay_s = delay_s
        self.count = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                n_bytes = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n_bytes) or b"{}")
                with outer.lock:
                    n = outer.count
                    outer.count += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                try:
                    if outer.delay_s:
                        time.sleep(outer.delay_s)
                    res = outer.script(n, body, dict(self.headers))
                    if res == RESET:
                        self.close_connection = True
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    if isinstance(res, Raw):
                        self._raw(res)
                        return
                    if isinstance(res, (int, float)) and not isinstance(res, bool):
                        time.sleep(res)
                        res = (200, ok_payload(), {})
                    status, payload, extra = res
                    data = json.dumps(payload, ensure_ascii=False).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _raw(self, r: Raw) -> None:
                try:
                    self.send_response(r.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(r.declared if r.declared is not None else len(r.body)))
                    for k, v in r.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if r.trickle_s:
                        for i in range(len(r.body)):
                            self.wfile.write(r.body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(r.trickle_s)
                    else:
                        self.wfile.write(r.body)
                except OSError:  # the client gave up (its timeout): expected
                    pass
                if r.declared is not None and r.declared > len(r.body):
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
