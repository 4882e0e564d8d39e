"""A new event (no data set needed): its source post and the reactions seen so far, as a small JSON file.

    from mfllm.data.new_event import load_new_event
    ev = load_new_event("water.json")      # an Event: the early reactions are its actions

`mfllm forecast --new-event FILE` reads it (docs/whatif.md, "A new event").
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

from mfllm.data.jsonl import profile_from_dict
from mfllm.data.schema import Action, Event, Profile, SourcePost
from mfllm.errors import DataError

NEW_EVENT_KEYS = ("event_id", "label", "source", "early")


def _time(v: Any, path: str, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise DataError(path, f"expected unix seconds or an ISO 8601 date, got {type(v).__name__}", field)
    if isinstance(v, str):
        try:
            d = _dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            raise DataError(path, f"expected unix seconds or an ISO 8601 date, got {v[:40]!r}", field) from None
        if d.tzinfo is None:
            raise DataError(path, f"ISO date {v[:40]!r} has no UTC offset; add one (e.g. +08:00)", field)
        return d.timestamp()
    if not math.isfinite(v):
        raise DataError(path, "time must be finite", field)
    return float(v)


def load_new_event(path: str | Path) -> Event:
    """A new event from a small JSON file (no data set needed)::

        {"event_id": "my-event",                      (optional; default: the file name)
         "source": {"text": "...", "time": 1700000000, "author": {...profile...}},   (author optional)
         "early": [{"text": "...", "time": "2023-11-14T22:20:00+08:00", "profile": {"followers": 120}}]}

    Times are unix seconds or ISO 8601 with a UTC offset. ``early`` are the first reactions seen so far
    (time-ordered on load; ``text`` "" = a plain repost; ``profile`` keys are those of the JSONL format's
    profiles, all optional). They become the warm-up; the agents after them are resampled from them.
    """
    p = str(path)
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(p, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(p, f"cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(p, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise DataError(p, "expected a JSON object with 'source' and 'early'")
    for k in d:
        if k not in NEW_EVENT_KEYS:
            raise DataError(p, f"unknown key; allowed: {', '.join(NEW_EVENT_KEYS)}", k)
    src = d.get("source")
    if not isinstance(src, dict):
        raise DataError(p, "expected an object with 'text' and 'time'", "source")
    for k in src:
        if k not in ("text", "time", "author"):
            raise DataError(p, "unknown key; allowed: text, time, author", f"source.{k}")
    if not isinstance(src.get("text"), str) or not src["text"].strip():
        raise DataError(p, "expected the source post's text (a non-empty string)", "source.text")
    if "time" not in src:
        raise DataError(p, "missing (unix seconds or ISO 8601)", "source.time")
    t0 = _time(src["time"], p, "source.time")
    author = profile_from_dict({"uid": "source", **src["author"]}, p, "source.author") \
        if isinstance(src.get("author"), dict) else Profile(uid="source")
    early = d.get("early", [])
    if not isinstance(early, list):
        raise DataError(p, "expected a list of reactions", "early")
    acts = []
    for i, a in enumerate(early):
        where = f"early[{i}]"
        if not isinstance(a, dict):
            raise DataError(p, "expected an object with text, time (and profile)", where)
        for k in a:
            if k not in ("text", "time", "profile", "agent_id", "depth"):
                raise DataError(p, "unknown key; allowed: text, time, profile, agent_id, depth", f"{where}.{k}")
        if not isinstance(a.get("text", ""), str):
            raise DataError(p, "expected a string (\"\" = a plain repost)", f"{where}.text")
        if "time" not in a:
            raise DataError(p, "missing (unix seconds or ISO 8601)", f"{where}.time")
        t = _time(a["time"], p, f"{where}.time")
        if t < t0:
            raise DataError(p, "earlier than the source post", f"{where}.time")
        agent = str(a.get("agent_id") or f"early{i + 1}")
        prof = profile_from_dict({"uid": agent, **(a.get("profile") or {})}, p, f"{where}.profile")
        depth = a.get("depth", 1)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise DataError(p, "expected an integer >= 1", f"{where}.depth")
        extra = dict(prof.extra)
        extra.setdefault("reposts_source", depth == 1)
        extra.setdefault("minutes_after_source", round((t - t0) / 60.0, 1))
        prof.extra = extra
        acts.append(Action(f"early{i + 1}", agent, t, a.get("text", ""), None, prof, depth))
    acts.sort(key=lambda x: x.time)
    eid = d.get("event_id") or Path(path).stem
    if not isinstance(eid, str) or not eid:
        raise DataError(p, "expected a non-empty string", "event_id")
    label = d.get("label")
    if label is not None and not isinstance(label, str):
        raise DataError(p, "expected a string", "label")
    return Event(eid, SourcePost(src["text"], t0, author), acts, label=label, origin=p)
