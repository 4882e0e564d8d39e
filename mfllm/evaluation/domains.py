"""Event domains, tagged from the source post by keyword rules.

Each domain has a lexicon file ``mfllm/labels/lexicons/domains/<domain>.txt`` (one term a
line, lower case, ``#`` comments). ``tag_domain`` counts the distinct terms of each domain found in the
source text (lower-cased, @mentions and URLs removed); the domain with the most wins, ties go to the one whose matched terms are
longer in total, then to the earlier domain in ``DOMAINS``. No match at all -> "News".
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

DOMAINS: tuple[str, ...] = ("News", "Sports", "Politics", "Technology", "Health", "Crime", "Culture")
DEFAULT_DOMAIN = "News"
_STRIP_RE = re.compile(r"@[\w\u4e00-\u9fff\-·]{1,30}|https?://\S*", re.IGNORECASE)  # mentions, URLs


@cache
def domain_lexicons() -> dict[str, tuple[str, ...]]:
    base = resources.files("mfllm.labels").joinpath("lexicons", "domains")
    out: dict[str, tuple[str, ...]] = {}
    for d in DOMAINS:
        text = base.joinpath(f"{d.lower()}.txt").read_text(encoding="utf-8")
        terms = [ln.strip().lower() for ln in text.splitlines()]
        out[d] = tuple(dict.fromkeys(t for t in terms if t and not t.startswith("#")))
    return out


def domain_scores(source_text: str) -> dict[str, tuple[int, int]]:
    """Per domain: (distinct terms found, their total length)."""
    t = _STRIP_RE.sub(" ", (source_text or "").lower())
    scores = {}
    for d, terms in domain_lexicons().items():
        found = [w for w in terms if w in t]
        scores[d] = (len(found), sum(map(len, found)))
    return scores


def tag_domain(source_text: str) -> str:
    """One of DOMAINS for an event's source post (default "News")."""
    scores = domain_scores(source_text)
    best = max(DOMAINS, key=lambda d: (scores[d], -DOMAINS.index(d)))
    return best if scores[best][0] > 0 else DEFAULT_DOMAIN
