"""Loader for the Rumdect Weibo format (Ma et al., IJCAI 2016), as the MF-LLM paper uses it.

A file `<event id>.json` is a JSON list of posts in time order; the first is the source post (`parent`
null), the rest are reposts/comments. Every post carries its author's full profile. The event id is the
source post's `mid`. The action text is `text` (the user's own words; `original_text` adds the
`//@user:` repost chain and is not used).

A post after the first with a fault of its own (a bad time, a missing or mistyped field, including its
author's profile fields) is dropped and counted on `Event.dropped`; the event is kept.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path

from mfllm.data._common import (
    Drops,
    Entry,
    Fault,
    check_text_values,
    check_time,
    compute_depths,
    count_uids,
    decode_utf8,
    get_bool,
    get_id,
    get_int,
    get_str,
    list_files,
    may_hold_lone_surrogate,
    parse_json_text,
    read_bytes,
    short,
    type_name,
)
from mfllm.data.schema import Action, Event, Profile, SourcePost
from mfllm.errors import DataError

_FIRST_MID = re.compile(rb'"m?id"\s*:\s*"?(\w+)"?')


def _profile(r: dict, path: str, where: str) -> Profile:
    def f(name: str) -> str:
        return f"{where}.{name}"

    desc = get_str(r, "user_description", path, f("user_description"), required=False)
    created = r.get("user_created_at")
    loc = get_str(r, "user_location", path, f("user_location"), required=False)
    reason = get_str(r, "verified_reason", path, f("verified_reason"), required=False)
    gender = get_str(r, "gender", path, f("gender"), required=False)
    return Profile(
        uid=get_id(r, "uid", path, f("uid")),
        screen_name=get_str(r, "screen_name", path, f("screen_name"), required=False) or None,
        gender=gender or None,
        location=(loc or "").strip() or None,
        description=(desc or "").strip() or None,
        has_description=None if desc is None else bool(desc.strip()),
        followers=get_int(r, "followers_count", path, f("followers_count")),
        friends=get_int(r, "friends_count", path, f("friends_count")),
        statuses=get_int(r, "statuses_count", path, f("statuses_count")),
        favourites=get_int(r, "favourites_count", path, f("favourites_count")),
        verified=get_bool(r, "verified", path, f("verified")),
        verified_type=get_int(r, "verified_type", path, f("verified_type")),
        verified_reason=(reason or "").strip() or None,
        created_at=None if created is None else check_time(created, path, f("user_created_at")),
    )


def _post_mid(r: dict, path: str, where: str) -> str:
    if r.get("mid") is not None:
        return get_id(r, "mid", path, f"{where}.mid")
    return get_id(r, "id", path, f"{where}.mid")


def _action_row(r: dict, i: int, path: str, st: float, check_text: bool):
    """Post i (> 0) -> (time, text, parent, profile); a DataError names what is wrong with it."""
    where = f"[{i}]"
    if check_text:
        check_text_values(r, path, where)
    if "t" not in r:
        raise Fault(path, "missing", f"{where}.t", kind="missing_field")
    t = check_time(r["t"], path, f"{where}.t", after=st)
    if "parent" not in r:
        raise Fault(path, "missing", f"{where}.parent", kind="missing_field")
    parent = get_id(r, "parent", path, f"{where}.parent", required=False)
    text = get_str(r, "text", path, f"{where}.text", null_as="")
    return t, text, parent, _profile(r, path, where)


def parse_rumdect(posts, path: str, activity: Counter | None = None, *, check_text: bool = True) -> Event:
    """Build an Event from the parsed JSON of one Rumdect file. `check_text`: check every string can be
    written as UTF-8 (a post with a lone surrogate is dropped); the caller may pass False when the raw
    text cannot hold one (see `may_hold_lone_surrogate`)."""
    if not isinstance(posts, list):
        raise DataError(path, f"expected a JSON list of posts (Rumdect format), got {type_name(posts)}")
    if not posts:
        raise DataError(path, "empty list: expected the source post followed by its reposts/comments")
    src = posts[0]
    if not isinstance(src, dict):
        raise DataError(path, f"expected an object, got {type_name(src)}", "[0]")
    if check_text:
        check_text_values(src, path, "[0]")
    if "date" in src and "kids" in src and "t" not in src:
        raise DataError(
            path, "this looks like a CED repost file; pass the CED root folder (holding original-microblog/)"
        )
    if src.get("parent") is not None:
        raise DataError(path, "the first post must be the source post (parent null)", "[0].parent")
    event_id = _post_mid(src, path, "[0]")
    if "t" not in src:
        raise DataError(path, "missing", "[0].t")
    st = check_time(src["t"], path, "[0].t")
    source = SourcePost(
        text=get_str(src, "text", path, "[0].text", null_as=""),
        time=st,
        author=_profile(src, path, "[0]"),
    )
    if len(posts) == 1:
        raise DataError(
            path, "no reposts or comments after the source post: an event needs at least one action"
        )

    rows = []
    seen: set[str] = set()
    drops = Drops(path)
    for i in range(1, len(posts)):
        r = posts[i]
        try:
            if not isinstance(r, dict):
                raise Fault(path, f"expected an object, got {type_name(r)}", f"[{i}]")
            mid = _post_mid(r, path, f"[{i}]")
            if mid in seen or mid == event_id:
                continue  # the same post listed twice
            t, text, parent, prof = _action_row(r, i, path, st, check_text)
        except DataError as e:  # this post only: the event keeps its other actions
            drops.add(e)
            continue
        seen.add(mid)
        if parent == event_id or parent == "":
            parent = None
        rows.append((mid, t, text, parent, prof))

    depths, broken = compute_depths({row[0]: row[3] for row in rows})
    rows.sort(key=lambda row: row[1])
    actions = []
    for mid, t, text, parent, prof in rows:
        prof.extra = {"reposts_source": parent is None, "minutes_after_source": round((t - st) / 60.0, 1)}
        if mid in broken:
            prof.extra["parent_missing"] = True
        if activity is not None:
            prof.corpus_activity = max(1, activity.get(prof.uid, 0))
        actions.append(Action(mid, prof.uid, t, text, parent, prof, depths[mid]))
    if activity is not None:
        source.author.corpus_activity = max(1, activity.get(source.author.uid, 0))
    return Event(event_id=event_id, source=source, actions=actions, label=None, platform="weibo", origin=path,
                 dropped=drops.result(len(actions)))


def load_rumdect_file(path: Path | str, activity: Counter | None = None) -> Event:
    p = str(path)
    text = decode_utf8(read_bytes(p), p)
    posts = parse_json_text(text, p, check_text=False)  # checked per post: a bad one is dropped
    return parse_rumdect(posts, p, activity, check_text=may_hold_lone_surrogate(text))


def peek_event_id(path: Path | str) -> str | None:
    """The source post's mid, read from the start of the file without parsing it all."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return None
    m = _FIRST_MID.search(head)
    return m.group(1).decode("ascii") if m else None


def rumdect_files(path: Path | str) -> list[Path]:
    p = Path(path)
    return [p] if p.is_file() else list_files(p, ".json")


def rumdect_activity(files: list[Path]) -> Counter:
    total: Counter = Counter()
    for f in files:
        try:
            data = read_bytes(f)
        except DataError:
            continue
        c = count_uids(data)
        if c is not None:
            total.update(c)
    return total


def rumdect_entries(path: Path | str) -> list[Entry]:
    """One entry per Rumdect file under `path` (a file, or a folder searched recursively)."""
    files = rumdect_files(path)
    activity = functools.cache(lambda: rumdect_activity(files))  # counted once, on the first event loaded

    def make(f: Path) -> Entry:
        eid = peek_event_id(f)

        def load() -> Event:
            ev = load_rumdect_file(f, activity())
            if eid is not None and ev.event_id != eid:
                raise DataError(
                    str(f), f"the source post's mid {short(ev.event_id)} is not the first mid", "mid"
                )
            return ev

        return Entry(eid, str(f), load)

    return [make(f) for f in files]
