"""The compact stats mean field: the same statistics as ``stats``, written as label-share tokens.

Same state and update as StatsMeanField (decayed label shares, keywords, example comments); only the
text differs: every category's share as a one-character label followed by its percentage, with the
same label characters a decide policy writes in its decision header (``prompts/<lang>/decision.json``),
e.g. ``已有64人：转39评61|支50反10中40|...``. A small model reads these shares better than the prose
of the default template (issue 14: context gain 0.192 against 0.125 at the same budget). Selected as
the mean field ``stats-compact``; the default ``stats`` template is unchanged.
"""

from __future__ import annotations

from collections import Counter

from mfllm.labels.dimensions import DIMENSIONS
from mfllm.prompts.templates import strings, template
from mfllm.simulation.meanfield import StatsMeanField, _pct

NAME = "stats-compact"
# template field -> (dimension, category)
FIELDS = {"share": ("behavior_type", "share"), "comment": ("behavior_type", "comment"),
          "support": ("stance", "support"), "oppose": ("stance", "oppose"), "neutral": ("stance", "neutral"),
          "believe": ("belief_degree", "believe"), "doubt": ("belief_degree", "doubt"),
          "counter": ("rumor", "counter"),
          **{e: ("sentiment_state", e) for e in DIMENSIONS["sentiment_state"]},
          "question": ("intent", "question"), "opinion": ("intent", "opinion")}


class CompactStatsMeanField(StatsMeanField):
    name = NAME

    def render(self, data: dict) -> str:
        s = strings(self.lang)
        if data["n"] == 0:
            return s["empty_meanfield"]
        share = {}
        for dim, cats in DIMENSIONS.items():
            counts = data["counts"].get(dim, {})
            tot = sum(counts.values()) or 1.0
            share[dim] = {c: _pct(counts.get(c, 0.0) / tot) for c in cats}
        fields = {f: share[dim][cat] for f, (dim, cat) in FIELDS.items()}
        q = s["quote_open"], s["quote_close"]
        return template("stats_meanfield_compact", self.lang).format(
            n=data["n"],
            keywords=s["list_sep"].join(k for k, _ in Counter(data["keywords"]).most_common(self.n_keywords)) or s["none"],
            examples="".join(f"{q[0]}{e}{q[1]}" for e in data["examples"]) or s["none"],
            **fields,
        )
