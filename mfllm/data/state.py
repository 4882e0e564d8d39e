"""The agent's state text: the ONE function that turns a profile into words for the policy's prompt.

Training and inference both call `agent_state_text`, so a model sees exactly the same text for the same
user at both times. The text is compact (it is part of every prompt of a small model), lists known fields
only, always in the same order, and humanises numbers (12345 -> "1.2万" / "12.3K").

Field order: gender, location, followers, following, posts, verified (+ reason), bio, account year;
then corpus activity; then how the action relates to the cascade (repost depth); then the delay after the
source post. `screen_name`, `favourites` and the uid are left out on purpose (no signal worth the tokens).

    >>> agent_state_text(Profile(uid="1", corpus_activity=3, extra={"minutes_after_source": 35}), depth=1)
    '用户：资料未知；语料中发帖3次；转发原帖；原帖后35分钟'
"""

from __future__ import annotations

import datetime as _dt
import math
import re

from mfllm.data.schema import Profile
from mfllm.errors import ConfigError

LANGS = ("zh", "en")
_MAX_DESC = 20
_MAX_REASON = 14
_MAX_LOC = 12
_WS = re.compile(r"\s+")


def _clean(s: str, n: int) -> str:
    s = _WS.sub(" ", s).strip()
    return s if len(s) <= n else s[: n - 1] + "…"


def _trim(x: float) -> str:
    s = f"{x:.1f}"
    return s[:-2] if s.endswith(".0") else s


def humanize_count(n: int, lang: str = "zh") -> str:
    """12345 -> '1.2万' (zh) / '12.3K' (en); small numbers stay exact."""
    neg = "-" if n < 0 else ""
    n = abs(int(n))
    if lang == "zh":
        if n < 10_000:
            return f"{neg}{n}"
        if n < 100_000_000:
            v = n / 10_000
            return f"{neg}{_trim(v) if v < 100 else round(v)}万"
        return f"{neg}{_trim(n / 100_000_000)}亿"
    if n < 1000:
        return f"{neg}{n}"
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{neg}{_trim(v) if v < 100 else round(v)}{suf}"
    return f"{neg}{n}"  # unreachable


def humanize_minutes(m: float, lang: str = "zh") -> str:
    """A delay in minutes: '35分钟', '3.5小时', '12天', '2.1年' (zh) / '35 min', '3.5 h', '12 d', '2.1 y'."""
    m = max(0.0, float(m))
    zh = lang == "zh"
    if m < 1:
        return "不到1分钟" if zh else "<1 min"
    if m < 60:
        return f"{int(m)}分钟" if zh else f"{int(m)} min"
    h = m / 60
    if h < 48:
        v = _trim(h) if h < 10 else str(round(h))
        return f"{v}小时" if zh else f"{v} h"
    d = h / 24
    if d < 365:
        return f"{round(d)}天" if zh else f"{round(d)} d"
    y = _trim(d / 365)
    return f"{y}年" if zh else f"{y} y"


def _profile_items(p: Profile, zh: bool) -> list[str]:
    lang = "zh" if zh else "en"
    items: list[str] = []
    if p.gender in ("m", "f"):
        items.append(("男" if p.gender == "m" else "女") if zh else ("male" if p.gender == "m" else "female"))
    if p.location:
        items.append(_clean(p.location, _MAX_LOC))
    if p.followers is not None:
        c = humanize_count(p.followers, lang)
        items.append(f"粉丝{c}" if zh else f"{c} followers")
    if p.friends is not None:
        c = humanize_count(p.friends, lang)
        items.append(f"关注{c}" if zh else f"{c} following")
    if p.statuses is not None:
        c = humanize_count(p.statuses, lang)
        items.append(f"微博{c}条" if zh else f"{c} posts")
    if p.verified is not None:
        if p.verified:
            v = "认证" if zh else "verified"
            if p.verified_reason:
                r = _clean(p.verified_reason, _MAX_REASON)
                v += f"（{r}）" if zh else f" ({r})"
        else:
            v = "未认证" if zh else "not verified"
        items.append(v)
    if p.description:
        d = _clean(p.description, _MAX_DESC)
        items.append(f"简介“{d}”" if zh else f'bio "{d}"')
    elif p.has_description is not None:
        items.append(
            ("有简介" if p.has_description else "无简介")
            if zh
            else ("has bio" if p.has_description else "no bio")
        )
    if p.created_at is not None and math.isfinite(p.created_at):
        year = _dt.datetime.fromtimestamp(p.created_at, _dt.UTC).year
        items.append(f"注册于{year}年" if zh else f"joined {year}")
    return items


def agent_state_text(profile: Profile, lang: str = "zh", depth: int | None = None) -> str:
    """The agent's state text for a prompt. `depth`: the action's repost depth (Action.depth), if known.

    Without `depth`, `profile.extra["reposts_source"]` (when present) says whether it reposts the source.
    """
    if lang not in LANGS:
        raise ConfigError(f"unknown language {lang!r} for the agent state; choose one of {', '.join(LANGS)}")
    zh = lang == "zh"
    items = _profile_items(profile, zh)
    sep_items, sep = ("，", "；") if zh else (", ", "; ")
    if items:
        parts = [("用户：" if zh else "User: ") + sep_items.join(items)]
    else:
        parts = ["用户：资料未知" if zh else "User: profile unknown"]
    if profile.corpus_activity is not None:
        n = profile.corpus_activity
        parts.append(f"语料中发帖{n}次" if zh else f"{n} post{'s' if n != 1 else ''} in the corpus")
    extra = profile.extra or {}
    if depth is not None:
        if depth <= 1:
            parts.append("转发原帖" if zh else "reposts the source")
        else:
            parts.append(f"第{depth}层转发" if zh else f"repost at depth {depth}")
    elif isinstance(extra.get("reposts_source"), bool):
        if extra["reposts_source"]:
            parts.append("转发原帖" if zh else "reposts the source")
        else:
            parts.append("转发他人转发" if zh else "reposts a repost")
    mins = extra.get("minutes_after_source")
    if isinstance(mins, int | float) and not isinstance(mins, bool) and math.isfinite(mins):
        h = humanize_minutes(mins, lang)
        parts.append(f"原帖后{h}" if zh else f"{h} after the source")
    return sep.join(parts)
