"""Loader for CED (Song et al., 2018): Chinese Weibo rumor cascades.

Layout of a CED root folder::

    original-microblog/<event>.json   the source post + its author's full profile
    rumor-repost/<event>.json         or non-rumor-repost/<event>.json (the folder is the label):
                                      a JSON list of reposts/comments, NOT time-sorted, with fields
                                      mid, uid, text, date ("YYYY-MM-DD HH:MM:SS", Beijing time),
                                      parent ("" = reposts the source), kids

Reposters only have a uid, so their profile holds what the data honestly gives (see docs/data.md):
repost depth (on the Action), corpus activity (posts by that uid across the whole CED folder being
loaded), and in `Profile.extra`: reposts_source, minutes_after_source (and parent_missing when the
parent post is not in the event).

Known quirks of the real data, handled here:
- 69 reposts (37 events) carry a Weibo "current year" date such as "07月23日 11:47" with no year. CED was
  crawled in 2016 (its latest full date is 2015-12-31 15:57:39) and Weibo omits the year only for posts of
  the current year, so these are read as 2016 (`CED_SHORT_DATE_YEAR`), seconds = 0.
- 316 events list the same post (same mid) twice; it is kept once (a non-empty parent wins).
- 77 source posts give `time` as "Mon May 27 12:07:05 +0800 2013" and `user` as "empty" (profile unknown).
- A repost/comment row with a fault of its own (a date more than a day before the source post, a
  missing or mistyped field, ...) is dropped and counted on `Event.dropped`; the event is kept. In the
  3,050 events of the copy used here no row has one; among the events kept aside, one repost is dated
  42.3 hours before its source post.
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
from collections import Counter
from pathlib import Path

from mfllm.data._common import (
    MAX_TIME,
    Drops,
    Entry,
    Fault,
    check_text_values,
    check_time,
    compute_depths,
    count_uids,
    decode_utf8,
    get_bool,
    get_int,
    may_hold_lone_surrogate,
    parse_json_text,
    raiser,
    read_bytes,
    read_json,
    short,
    type_name,
)
from mfllm.data.schema import Action, Event, Profile, SourcePost
from mfllm.errors import DataError

SOURCE_DIR = "original-microblog"
LABEL_DIRS = {"rumor-repost": "rumor", "non-rumor-repost": "non-rumor"}
CED_SHORT_DATE_YEAR = 2016
_BEIJING = _dt.timezone(_dt.timedelta(hours=8))
_BEIJING_OFFSET = 8 * 3600
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()
_SHORT_DATE = re.compile(r"(\d{1,2})月(\d{1,2})日 (\d{1,2}):(\d{2})")
_DATE_HINT = 'not a "YYYY-MM-DD HH:MM:SS" date'


def is_ced_root(path: Path | str) -> bool:
    return (Path(path) / SOURCE_DIR).is_dir()


_day_cache: dict[str, float] = {}


def _day_start(day: str) -> float | None:
    """Unix seconds of 00:00 Beijing time on 'YYYY-MM-DD' (cached: a corpus has a few thousand days)."""
    v = _day_cache.get(day)
    if v is None:
        if not (day.isascii() and day[:4].isdigit() and day[5:7].isdigit() and day[8:10].isdigit()):
            return None
        try:
            d = _dt.date(int(day[:4]), int(day[5:7]), int(day[8:10]))
        except ValueError:
            return None
        v = (d.toordinal() - _EPOCH_ORDINAL) * 86400.0 - _BEIJING_OFFSET
        _day_cache[day] = v
    return v


def parse_ced_date(s: str) -> float | None:
    """'YYYY-MM-DD HH:MM:SS' (Beijing time) -> unix seconds; None when it is not such a date.

    Also reads Weibo's year-less 'MM月DD日 HH:MM' as year `CED_SHORT_DATE_YEAR` (see the module doc).
    """
    if len(s) == 19 and s[4] == "-" and s[7] == "-" and s[10] == " " and s[13] == ":" and s[16] == ":":
        base = _day_start(s[:10])
        hh, mm, ss = s[11:13], s[14:16], s[17:19]
        if base is None or not (hh.isdigit() and mm.isdigit() and ss.isdigit() and (hh + mm + ss).isascii()):
            return None
        h, m, sec = int(hh), int(mm), int(ss)
        if h > 23 or m > 59 or sec > 60:
            return None
        return base + h * 3600 + m * 60 + sec
    m = _SHORT_DATE.fullmatch(s)
    if m:
        try:
            d = _dt.datetime(CED_SHORT_DATE_YEAR, int(m[1]), int(m[2]), int(m[3]), int(m[4]), tzinfo=_BEIJING)
        except ValueError:
            return None
        return d.timestamp()
    return None


def _source_time(v, path: str) -> float:
    if isinstance(v, str):
        s = v.strip()
        for fmt in ("%a %b %d %H:%M:%S %z %Y", "%Y-%m-%d %H:%M:%S"):
            try:
                d = _dt.datetime.strptime(s, fmt)
            except ValueError:
                continue
            if d.tzinfo is None:
                d = d.replace(tzinfo=_BEIJING)
            return check_time(d.timestamp(), path, "time")
        raise DataError(path, f"expected unix seconds or a date, got {short(v)}", "time")
    return check_time(v, path, "time")


def author_uid(event_id: str) -> str:
    """CED file names are '<n>_<source mid>_<author uid>'; the author's uid is the last part."""
    parts = event_id.rsplit("_", 1)
    return parts[1] if len(parts) == 2 and parts[1] else f"{event_id}:author"


def _author_profile(user, event_id: str, path: str) -> Profile:
    uid = author_uid(event_id)
    if user is None or isinstance(user, str):  # CED writes "empty" when the profile was not crawled
        return Profile(uid=uid)
    if not isinstance(user, dict):
        raise DataError(path, f"expected an object (the author's profile), got {type_name(user)}", "user")
    gender = user.get("gender")
    if gender is not None and not isinstance(gender, str):
        raise DataError(path, f"expected a string, got {type_name(gender)}", "user.gender")
    location = user.get("location")
    if location is not None and not isinstance(location, str):
        raise DataError(path, f"expected a string, got {type_name(location)}", "user.location")
    created = user.get("time")
    created_at = None if created is None else check_time(created, path, "user.time")
    return Profile(
        uid=uid,
        gender=gender or None,
        location=(location or "").strip() or None,
        followers=get_int(user, "followers", path, "user.followers"),
        friends=get_int(user, "friends", path, "user.friends"),
        statuses=get_int(user, "messages", path, "user.messages"),
        verified=get_bool(user, "verified", path, "user.verified"),
        verified_type=get_int(user, "verified_type", path, "user.verified_type"),
        has_description=get_bool(user, "description", path, "user.description"),
        created_at=created_at,
    )


def _post_error(path: str, i: int, rec: dict, message: str, field: str | None, kind: str = "bad_field") -> Fault:
    mid = rec.get("mid") if isinstance(rec, dict) else None
    where = f"post {i}" + (f", mid {mid}" if isinstance(mid, str) else "")
    return Fault(path, f"{message} ({where})", field, kind=kind)


def _row(r, i: int, rp: str, st: float, low: float, check_text: bool) -> tuple[str, str, str, float, str]:
    """One repost/comment record -> (mid, uid, text, time, parent); a Fault names what is wrong with it."""
    if type(r) is not dict:
        raise Fault(rp, f"post {i}: expected an object, got {type_name(r)}")
    try:
        mid, uid, text, date, parent = r["mid"], r["uid"], r["text"], r["date"], r["parent"]
    except KeyError as e:
        raise _post_error(rp, i, r, "missing", str(e.args[0]), "missing_field") from None
    if type(mid) is not str or not mid:
        raise _post_error(rp, i, r, f"expected a non-empty string id, got {short(mid)}", "mid")
    if type(uid) is not str:
        if type(uid) is int:
            uid = str(uid)
        else:
            raise _post_error(rp, i, r, f"expected a string id, got {type_name(uid)}", "uid")
    if type(text) is not str:
        if text is None:
            text = ""
        else:
            raise _post_error(rp, i, r, f"expected a string, got {type_name(text)}", "text")
    if parent is None:
        parent = ""
    elif type(parent) is not str:
        raise _post_error(rp, i, r, f'expected a string mid or "", got {type_name(parent)}', "parent")
    t = parse_ced_date(date) if type(date) is str else None
    if t is None:
        raise _post_error(rp, i, r, f"{_DATE_HINT}: {short(date)}", "date", "bad_time")
    if t < low or t > MAX_TIME:
        try:
            check_time(t, rp, "date", after=st)
        except Fault as e:  # the same message, naming the post
            raise _post_error(rp, i, r, e.message, "date", e.kind) from None
    if check_text:
        try:
            check_text_values(r, rp, "")
        except DataError as e:
            raise _post_error(rp, i, r, e.message, e.field) from None
    return mid, uid, text, t, parent


def load_ced_event(
    source_path: Path | str,
    repost_path: Path | str,
    label: str | None = None,
    activity: Counter | None = None,
) -> Event:
    """One CED event from its source file and its repost file. `activity`: posts per uid in the corpus."""
    sp, rp = str(source_path), str(repost_path)
    event_id = Path(sp).stem
    src = read_json(sp)
    if not isinstance(src, dict):
        raise DataError(sp, f"expected a JSON object (the source post), got {type_name(src)}")
    if "text" not in src:
        raise DataError(sp, "missing", "text")
    stext = src["text"]
    if stext is None:
        stext = ""
    if not isinstance(stext, str):
        raise DataError(sp, f"expected a string, got {type_name(stext)}", "text")
    if "time" not in src:
        raise DataError(sp, "missing", "time")
    st = _source_time(src["time"], sp)
    author = _author_profile(src.get("user"), event_id, sp)
    if activity is not None:
        author.corpus_activity = max(1, activity.get(author.uid, 0))

    raw = decode_utf8(read_bytes(rp), rp)
    records = parse_json_text(raw, rp, check_text=False)  # text is checked per post: a bad one is dropped
    check_text = may_hold_lone_surrogate(raw)
    del raw
    if not isinstance(records, list):
        raise DataError(rp, f"expected a JSON list of reposts/comments, got {type_name(records)}")
    if not records:
        raise DataError(rp, "no reposts or comments (empty list): an event needs at least one action")

    rows: list[list] = []  # [mid, uid, text, time, parent]
    index: dict[str, int] = {}
    low = st - 86400.0
    drops = Drops(rp)
    for i, r in enumerate(records):
        try:
            mid, uid, text, t, parent = _row(r, i, rp, st, low, check_text)
        except DataError as e:  # this row only: the event keeps its other actions
            drops.add(e)
            continue
        j = index.get(mid)
        if j is not None:  # the same post listed twice: keep it once
            if not rows[j][4] and parent:
                rows[j][4] = parent
            continue
        index[mid] = len(rows)
        rows.append([mid, uid, text, t, parent])

    depths, broken = compute_depths({row[0]: (row[4] or None) for row in rows})
    rows.sort(key=lambda row: row[3])  # stable: equal times keep file order
    actions = []
    for mid, uid, text, t, parent in rows:
        extra = {"reposts_source": not parent, "minutes_after_source": round((t - st) / 60.0, 1)}
        if mid in broken:
            extra["parent_missing"] = True
        prof = Profile(uid=uid, extra=extra)
        if activity is not None:
            prof.corpus_activity = max(1, activity.get(uid, 0))
        actions.append(Action(mid, uid, t, text, parent or None, prof, depths[mid]))
    return Event(
        event_id=event_id,
        source=SourcePost(text=stext, time=st, author=author),
        actions=actions,
        label=label,
        platform="weibo",
        origin=sp,
        dropped=drops.result(len(actions)),
    )


_activity_cache: dict[tuple, Counter] = {}


def corpus_activity(root: Path | str) -> Counter:
    """Posts per uid over the whole CED folder (reposts/comments + source posts), one cheap pass.

    Unreadable files are left out here (the loader reports them). Cached for the last folder seen.
    """
    root = Path(root).resolve()
    files: list[Path] = []
    for d in LABEL_DIRS:
        if (root / d).is_dir():
            files.extend(sorted((root / d).glob("*.json")))
    sources = sorted((root / SOURCE_DIR).glob("*.json"))
    key = (str(root), len(files), len(sources), *(f.stat().st_mtime_ns for f in (root / SOURCE_DIR, *files)))
    if key in _activity_cache:
        return _activity_cache[key]
    total: Counter = Counter()
    for f in files:
        try:
            data = read_bytes(f)
        except DataError:
            continue
        c = count_uids(data)
        if c is None:  # fall back to a full parse
            try:
                recs = read_json(f)
            except DataError:
                continue
            seen = set()
            c = Counter()
            for r in recs if isinstance(recs, list) else ():
                if isinstance(r, dict) and r.get("mid") not in seen:
                    seen.add(r.get("mid"))
                    c[str(r.get("uid"))] += 1
        total.update(c)
    for s in sources:
        total[author_uid(s.stem)] += 1
    _activity_cache.clear()
    _activity_cache[key] = total
    return total


def ced_entries(root: Path | str) -> list[Entry]:
    """All events of a CED root folder (cheap: lists files only). Each entry loads one event on demand."""
    root = Path(root)
    sources = {p.stem: p for p in (root / SOURCE_DIR).glob("*.json") if p.is_file()}
    reposts: dict[str, list[tuple[Path, str]]] = {}
    for d, label in LABEL_DIRS.items():
        if (root / d).is_dir():
            for p in (root / d).glob("*.json"):
                if p.is_file():
                    reposts.setdefault(p.stem, []).append((p, label))
    activity = functools.cache(lambda: corpus_activity(root))  # counted once, on the first event loaded

    def make(eid: str) -> Entry:
        sp = sources.get(eid)
        found = reposts.get(eid, [])
        if sp is None:
            rp = found[0][0]
            return Entry(eid, str(rp), raiser(str(rp), f"no source post: expected {SOURCE_DIR}/{eid}.json"))
        if not found:
            msg = f"no repost file: expected rumor-repost/{eid}.json or non-rumor-repost/{eid}.json"
            return Entry(eid, str(sp), raiser(str(sp), msg))
        if len(found) > 1:
            msg = "both rumor-repost/ and non-rumor-repost/ hold this event; the label is ambiguous"
            return Entry(eid, str(sp), raiser(str(sp), msg))
        rp, label = found[0]
        return Entry(eid, str(sp), lambda: load_ced_event(sp, rp, label, activity()))

    return [make(eid) for eid in sorted(set(sources) | set(reposts))]
