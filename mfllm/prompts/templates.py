"""Prompt templates are data: one file per role and language under prompts/<lang>/.

The same functions render prompts for training (mfllm.training) and inference (mfllm.simulation),
so a model is always asked exactly what it was trained on. The policy template puts what all agents
of a step share (instructions, event, context) first and the agent's own state last, so a backend
can compute the shared prefix once per step.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from mfllm.errors import ConfigError

PROMPTS_DIR = Path(__file__).parent
LANGS = ("zh", "en")
EVENT_CHARS = 80  # source post shown to the policy (a small model's context is short)
ITEM_CHARS = 30  # one reply shown in recent / popular context
EXAMPLE_CHARS = 20  # one example comment quoted in the stats mean field


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ConfigError(f"unknown prompt language {lang!r}; choose one of {', '.join(LANGS)}")


@cache
def template(name: str, lang: str = "zh") -> str:
    _check_lang(lang)
    path = PROMPTS_DIR / lang / f"{name}.txt"
    if not path.exists():
        raise ConfigError(f"no prompt template {name!r} for language {lang!r}", path=str(path))
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


@cache
def strings(lang: str = "zh") -> dict:
    _check_lang(lang)
    return json.loads((PROMPTS_DIR / lang / "strings.json").read_text(encoding="utf-8"))


def clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def action_to_target(text: str, lang: str = "zh") -> str:
    """What the policy writes for an action: the text, or the explicit repost marker for a plain repost."""
    text = " ".join(text.split())
    return text if text else strings(lang)["repost"]


def target_to_action(output: str, lang: str = "zh") -> str:
    """Inverse of action_to_target: the repost marker (alone) becomes an empty action text."""
    out = output.strip()
    return "" if out == strings(lang)["repost"] or out == "" else out


def render_items(texts: list[str], lang: str = "zh", item_chars: int = ITEM_CHARS) -> str:
    s = strings(lang)
    return s["item_sep"].join(clip(action_to_target(t, lang), item_chars) for t in texts) or s["none"]


def render_context(method_context: str, lang: str = "zh", **fields: str) -> str:
    """A method's context block (mf / recent / popular / state), ending with a newline if non-empty."""
    body = template(f"context_{method_context}", lang)
    if not body:
        return ""
    return body.format(**fields) + "\n"


def policy_prefix(event_text: str, context: str, lang: str = "zh") -> str:
    """Everything before the agent's state: identical for all agents of a step."""
    t = template("policy", lang)
    head, _, _ = t.partition("{state}")
    return head.format(event=clip(event_text, EVENT_CHARS), context=context)


def policy_suffix(state: str, lang: str = "zh") -> str:
    """The agent's own part of the prompt: its state, then the answer cue."""
    _, _, tail = template("policy", lang).partition("{state}")
    return state + tail + "\n"


def policy_prompt(event_text: str, context: str, state: str, lang: str = "zh") -> str:
    return policy_prefix(event_text, context, lang) + policy_suffix(state, lang)


def meanfield_prompt(event_text: str, previous: str, pairs: list[tuple[str, str]], lang: str = "zh",
                     item_chars: int = ITEM_CHARS, previous_chars: int | None = None) -> str:
    """The LLM mean-field summariser's prompt: m_{t-1} plus this step's actions.

    The pairs carry each agent's state too, but only the actions are shown: the mean field
    summarises what the population did, and a step's 16 states would triple the prompt.
    `item_chars` / `previous_chars` shorten the replies / m_{t-1} where a prompt must fit a small context.
    """
    items = render_items([a for _, a in pairs], lang, item_chars)
    prev = previous if previous_chars is None else clip(previous, previous_chars)
    return template("meanfield", lang).format(event=clip(event_text, EVENT_CHARS), previous=prev, pairs=items) + "\n"
