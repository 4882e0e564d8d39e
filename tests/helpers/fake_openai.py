"""A scriptable, fault-injecting OpenAI-style HTTP server (stdlib) for backend tests.

``FakeOpenAI(script)``: ``script(n, body, headers)`` returns (status, payload dict, extra headers) for the
n-th request (0-based), or a float to sleep that long first and then answer ``ok_payload``. It counts
requests and the most requests in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
