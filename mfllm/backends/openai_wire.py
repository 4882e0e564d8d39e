"""The OpenAI wire format that ``mfllm serve`` writes: error objects, usage, per-choice seeds, stream chunks.

Pure functions over plain dicts (no HTTP), in the shapes the official ``openai`` SDK parses.
"""

from __future__ import annotations

from mfllm.backends.base import Completion
from mfllm.seeds import derive_seed


def error_body(message: str, etype: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object (the SDK reads ``code`` as a string or null)."""
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def choice_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a prompt's ``n`` choices: the request's seed first, then one derived seed per extra choice."""
    return [seed] + [derive_seed(seed, j) for j in range(1, n)]


def usage(outs: list[Completion], n: int = 1) -> dict:
    """OpenAI's usage for ``outs`` (``n`` consecutive choices per prompt): each prompt is counted once."""
    firsts = outs[::n]
    pt = sum(c.prompt_tokens for c in firsts)
    ct = sum(c.generated_tokens for c in outs)
    return {
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "total_tokens": pt + ct,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_prompt_tokens for c in firsts)},
    }


def stream_chunks(payload: dict, include_usage: bool) -> list[dict]:
    """A finished ``text_completion`` / ``chat.completion`` payload as the chunks a stream of it sends.

    Completions: one chunk per choice (text and finish_reason). Chat: per choice a delta with the role and the
    content, then an empty delta with the finish_reason. With ``include_usage`` every chunk has ``usage: null``
    and a last chunk with no choices carries the usage (OpenAI's ``stream_options.include_usage``)."""
    chat = payload["object"] == "chat.completion"
    head = {
        "id": payload["id"],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": payload["created"],
        "model": payload["model"],
    }
    tail = {"usage": None} if include_usage else {}
    chunks = []
    for ch in payload["choices"]:
        if chat:
            delta = {"role": "assistant", "content": ch["message"]["content"]}
            first = {"index": ch["index"], "delta": delta, "logprobs": None, "finish_reason": None}
            last = {"index": ch["index"], "delta": {}, "logprobs": None, "finish_reason": ch["finish_reason"]}
            chunks += [{**head, "choices": [first], **tail}, {**head, "choices": [last], **tail}]
        else:
            chunks.append({**head, "choices": [ch], **tail})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": payload["usage"]})
    return chunks
