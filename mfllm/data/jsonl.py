"""The generic JSONL event format: how users bring data from any platform (see docs/data.md).

One event per line::

    {"event_id": "e1", "label": "rumor", "domain": null, "platform": "weibo",
     "source": {"text": "...", "time": 1347334462.0, "author": {"uid": "u0", "followers": 1200}},
     "actions": [{"action_id": "a1", "agent_id": "u1", "time": 1347334500.0, "text": "...",
                  "parent": null, "depth": 1, "profile": {"uid": "u1", "gender": "f"}}]}

Profile keys are the field names of `mfllm.data.schema.Profile`. Times are unix seconds (an ISO 8601
string with a UTC offset is accepted on input). Reading is the exact inverse of `write_jsonl`.
An action with a fault of its own (a bad or impossible time, a missing or mistyped field, an unknown key,
a duplicate action id) is dropped and counted on `Event.dropped`; the event is kept.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mfllm.data._common import (
    Drops,
    Entry,
    Fault,
    check_text_values,
    check_time,
    compute_depths,
    decode_utf8,
    get_id,
    get_str,
    list_files,
    may_hold_lone_surrogate,
    parse_json_text,
    raiser,
    short,
    type_name,
)
from mfllm.data.schema import Action, Event, Profile, SourcePost
from mfllm.errors import DataError
from mfllm.files import atomic_open

PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(Profile))
_STR = {"uid", "screen_name", "gender", "location", "description", "verified_reason"}
_INT = {"followers", "friends", "statuses", "favourites", "verified_type", "corpus_activity"}
_BOOL = {"has_description", "verified"}
EVENT_KEYS = ("event_id", "label", "domain", "platform", "source", "actions")
SOURCE_KEYS = ("text", "time", "author")
ACTION_KEYS = ("action_id", "agent_id", "time", "text", "parent", "depth", "profile")


# ---------------------------------------------------------------- writing


def event_to_dict(ev: Event) -> dict[str, Any]:
    d: dict[str, Any] = {"event_id": ev.event_id}
    if ev.label is not None:
        d["label"] = ev.label
    if ev.domain is not None:
        d["domain"] = ev.domain
    d["platform"] = ev.platform
    d["source"] = {"text": ev.source.text, "time": ev.source.time, "author": ev.source.author.to_dict()}
    d["actions"] = [a.to_dict() for a in ev.actions]
    return d


def dumps_event(ev: Event) -> str:
    """One JSONL line (no newline): compact, UTF-8 text kept readable (ensure_ascii=False)."""
    return json.dumps(event_to_dict(ev), ensure_ascii=False, separators=(",", ":"))


def write_jsonl(events: Iterable[Event], path: Path | str) -> int:
    """Write events to `path` atomically (a temp file renamed into place). Returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_open(path, "w") as fh:
        for ev in events:
            fh.write(dumps_event(ev))
            fh.write("\n")
            n += 1
    return n


# ---------------------------------------------------------------- reading


def _time(v: Any, path: str, field: str, after: float | None = None) -> float:
    if isinstance(v, str):
        try:
            d = _dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Fault(
                path, f"expected unix seconds or an ISO 8601 date, got {short(v)}", field, kind="bad_time"
            ) from None
        if d.tzinfo is None:
            raise Fault(path, f"ISO date {short(v)} has no UTC offset; add one (e.g. +08:00)", field,
                        kind="bad_time")
        v = d.timestamp()
    return check_time(v, path, field, after=after)


def _check_keys(d: dict, allowed: tuple[str, ...], path: str, where: str) -> None:
    for k in d:
        if k not in allowed:
            field = f"{where}.{k}" if where else k
            raise Fault(path, f"unknown key; allowed: {', '.join(allowed)}", field, kind="unknown_key")


def profile_from_dict(d: Any, path: str, where: str, default_uid: str | None = None) -> Profile:
    if not isinstance(d, dict):
        raise DataError(path, f"expected an object (a profile), got {type_name(d)}", where)
    _check_keys(d, PROFILE_FIELDS, path, where)
    kw: dict[str, Any] = {}
    for k, v in d.items():
        field = f"{where}.{k}"
        if v is None:
            continue
        if k == "uid":
            kw[k] = get_id(d, k, path, field)
        elif k in _STR:
            kw[k] = get_str(d, k, path, field)
        elif k in _INT:
            if isinstance(v, bool) or not isinstance(v, int):
                raise DataError(path, f"expected an integer, got {type_name(v)} {short(v)}", field)
            kw[k] = v
        elif k in _BOOL:
            if not isinstance(v, bool):
                raise DataError(path, f"expected true/false, got {type_name(v)} {short(v)}", field)
            kw[k] = v
        elif k == "created_at":
            kw[k] = _time(v, path, field)
        elif k == "extra":
            if not isinstance(v, dict):
                raise DataError(path, f"expected an object, got {type_name(v)}", field)
            kw[k] = dict(v)
    if "uid" not in kw:
        if default_uid is None:
            raise DataError(path, "missing", f"{where}.uid")
        kw["uid"] = default_uid
    elif default_uid is not None and kw["uid"] != default_uid:
        raise DataError(
            path,
            f"uid {short(kw['uid'])} differs from the action's agent_id {short(default_uid)}",
            f"{where}.uid",
        )
    return Profile(**kw)


def _action(a: Any, i: int, path: str, st: float, seen: set[str], check_text: bool) -> tuple[Action, int | None]:
    """actions[i] -> (the Action, its given depth or None); a DataError names what is wrong with it."""
    w = f"actions[{i}]"
    if not isinstance(a, dict):
        raise Fault(path, f"expected an object, got {type_name(a)}", w)
    if check_text:
        check_text_values(a, path, w)
    _check_keys(a, ACTION_KEYS, path, w)
    aid = get_id(a, "action_id", path, f"{w}.action_id", required=False) or str(i)
    if aid in seen:
        raise Fault(path, f"duplicate action id {short(aid)}", f"{w}.action_id", kind="duplicate_id")
    agent = get_id(a, "agent_id", path, f"{w}.agent_id")
    if "time" not in a:
        raise Fault(path, "missing", f"{w}.time", kind="missing_field")
    t = _time(a["time"], path, f"{w}.time", after=st)
    if "text" not in a:
        raise Fault(path, "missing", f"{w}.text", kind="missing_field")
    text = get_str(a, "text", path, f"{w}.text", null_as="")
    parent = get_id(a, "parent", path, f"{w}.parent", required=False) or None
    depth = a.get("depth")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise Fault(path, f"expected an integer >= 1, got {short(depth)}", f"{w}.depth")
    prof = profile_from_dict(a.get("profile") or {}, path, f"{w}.profile", default_uid=agent)
    return Action(aid, agent, t, text, parent, prof, 1), depth


def event_from_dict(d: Any, path: str, *, check_text: bool = True) -> Event:
    """Validate one parsed JSONL line and build the Event. `path` names it in errors (file:line).

    `check_text`: check every string can be written as UTF-8 (an action with a lone surrogate is dropped);
    the caller may pass False when the raw line cannot hold one (see `may_hold_lone_surrogate`)."""
    if not isinstance(d, dict):
        raise DataError(path, f"expected a JSON object (one event per line), got {type_name(d)}")
    if check_text:
        for k, v in d.items():
            if k != "actions":
                check_text_values({k: v}, path, "")
    _check_keys(d, EVENT_KEYS, path, "")
    event_id = get_id(d, "event_id", path, "event_id")
    label = get_str(d, "label", path, "label", required=False)
    domain = get_str(d, "domain", path, "domain", required=False)
    platform = get_str(d, "platform", path, "platform", required=False) or "weibo"
    src = d.get("source")
    if src is None:
        raise DataError(path, "missing", "source")
    if not isinstance(src, dict):
        raise DataError(path, f"expected an object, got {type_name(src)}", "source")
    _check_keys(src, SOURCE_KEYS, path, "source")
    if "time" not in src:
        raise DataError(path, "missing", "source.time")
    st = _time(src["time"], path, "source.time")
    author = src.get("author")
    source = SourcePost(
        text=get_str(src, "text", path, "source.text", null_as=""),
        time=st,
        author=Profile(uid=f"{event_id}:author")
        if author is None
        else profile_from_dict(author, path, "source.author"),
    )
    acts = d.get("actions")
    if acts is None:
        raise DataError(path, "missing", "actions")
    if not isinstance(acts, list):
        raise DataError(path, f"expected a list, got {type_name(acts)}", "actions")
    if not acts:
        raise DataError(path, "no actions: an event needs at least one repost/comment", "actions")
    actions: list[Action] = []
    given_depth: dict[str, int] = {}
    seen: set[str] = set()
    drops = Drops(path)
    for i, a in enumerate(acts):
        try:
            act, depth = _action(a, i, path, st, seen, check_text)
        except DataError as e:  # this action only: the event keeps the others
            drops.add(e)
            continue
        seen.add(act.action_id)
        if depth is not None:
            given_depth[act.action_id] = depth
        actions.append(act)
    dropped = drops.result(len(actions))
    if len(given_depth) < len(actions):
        depths, _ = compute_depths({x.action_id: x.parent for x in actions})
    else:
        depths = given_depth
    for x in actions:
        x.depth = given_depth.get(x.action_id) or depths[x.action_id]
    actions.sort(key=lambda x: x.time)
    return Event(
        event_id=event_id,
        source=source,
        actions=actions,
        label=label,
        domain=domain,
        platform=platform,
        origin=path,
        dropped=dropped,
    )


def parse_jsonl_line(line: bytes | str, path: str) -> Event:
    text = decode_utf8(line, path) if isinstance(line, bytes) else line
    d = parse_json_text(text, path, check_text=False)  # checked per action: a bad one is dropped
    return event_from_dict(d, path, check_text=may_hold_lone_surrogate(text))


_EVENT_ID = re.compile(rb'^\s*\{\s*"event_id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def _line_event_id(line: bytes) -> str | None:
    """The event id of a line, cheaply when it comes first (as write_jsonl puts it); None if unknown."""
    m = _EVENT_ID.match(line)
    try:
        if m:
            return str(json.loads(m.group(1)))
        d = json.loads(line)
    except (ValueError, RecursionError):
        return None
    v = d.get("event_id") if isinstance(d, dict) else None
    return str(v) if isinstance(v, str | int) and not isinstance(v, bool) else None


def jsonl_files(path: Path | str) -> list[Path]:
    p = Path(path)
    return [p] if p.is_file() else list_files(p, ".jsonl")


def _file_entries(f: Path) -> list[Entry]:
    out: list[Entry] = []
    try:
        fh = open(f, "rb")
    except OSError as e:
        msg = f"cannot read the file: {e.strerror or e}"
        return [Entry(None, str(f), raiser(str(f), msg))]
    with fh:
        offset = 0
        for lineno, line in enumerate(fh, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{f}:{lineno}"
            eid = _line_event_id(line)
            out.append(Entry(eid, where, _line_loader(f, start, where)))
    if not out:
        out.append(Entry(None, str(f), raiser(str(f), "the file is empty")))
    return out


def _line_loader(f: Path, offset: int, where: str):
    def load() -> Event:
        try:
            with open(f, "rb") as fh:
                fh.seek(offset)
                line = fh.readline()
        except OSError as e:
            raise DataError(where, f"cannot read the file: {e.strerror or e}") from None
        return parse_jsonl_line(line, where)

    return load


def jsonl_entries(path: Path | str) -> list[Entry]:
    """One entry per non-blank line of a .jsonl file, or of every .jsonl file under a folder."""
    out: list[Entry] = []
    for f in jsonl_files(path):
        out.extend(_file_entries(f))
    return out


def read_jsonl(path: Path | str) -> list[Event]:
    """All events of one JSONL file, in file order; the first bad line raises DataError."""
    return [e.load() for e in _file_entries(Path(path))]
