"""A backend with no model: each request's text is a function of its seed (fast, deterministic runs)."""

from __future__ import annotations

from mfllm.backends.base import BackendStats, Completion


class Echo:
    name = "echo"

    def __init__(self):
        self.stats = BackendStats()

    def generate(self, reqs):
        return [Completion(f"回复{r.seed % 997}", 1, 1) for r in reqs]

    def describe(self):
        return {"backend": "echo"}
