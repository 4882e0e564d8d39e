"""Per-event scores of every row -> the results block of one warm-up: tables (9 and 8 dimensions),
spreads, relative KL, the ceiling check, per dimension and per domain."""

from __future__ import annotations

from collections.abc import Sequence

from mfllm.bench.fidelity.rows import BASELINES, ORACLE, MethodSpec
from mfllm.bench.fidelity.stats import changes, lowest_share, mean, relative_kl
from mfllm.errors import ConfigError
from mfllm.evaluation.distributions import HORIZONS
from mfllm.evaluation.metrics import METRICS, summarize
from mfllm.labels.dimensions import ALL_DIMENSIONS

LABEL_DIMS: tuple[str, ...] = tuple(d for d in ALL_DIMENSIONS if d != "keywords")

# row -> event -> horizon -> {"macro": {METRIC: v}, "dimensions": {DIM: {METRIC: v}}} (one scoring rule)
RowScores = dict[str, dict[str, dict]]


def row_scores(metrics: dict, source: str, block: str | None = None) -> dict[str, dict]:
    """One source's per-event scores out of a metrics.json dict (``block``: a further rule's, e.g. paper)."""
    events = (metrics[block] if block else metrics)["events"]
    return {e: v["scores"][source] for e, v in events.items() if source in v["scores"]}


def per_event_values(scores: RowScores, event_ids: Sequence[str], dims: Sequence[str] | None = None) -> dict:
    """vals[row][horizon][metric] = [value or None per event]: the macro over dimensions, or with
    ``dims`` the mean over those dimensions (the ones with a value)."""

    def one(sc: dict | None, met: str) -> float | None:
        if sc is None:
            return None
        if dims is None:
            return sc["macro"].get(met)
        return mean([(sc["dimensions"].get(d) or {}).get(met) for d in dims])

    return {row: {h: {met: [one((per.get(e) or {}).get(h), met) for e in event_ids] for met in METRICS}
                  for h in HORIZONS} for row, per in scores.items()}


def table(vals: dict, rows: Sequence[str]) -> tuple[dict, dict]:
    methods, spread = {}, {}
    for r in rows:
        methods[r], spread[r] = {}, {}
        for met in METRICS:
            methods[r][met], spread[r][met] = {}, {}
            for h in HORIZONS:
                s = summarize(vals[r][h][met])
                methods[r][met][h] = s["mean"]
                spread[r][met][h] = {"std": s["std"], "ci95": s["ci95"], "n": s["n"]}
    return methods, spread


def ceiling(vals: dict, rows: Sequence[str]) -> dict | None:
    """The share of events where oracle-sampled has the lowest long-horizon KL / JS of all rows."""
    if ORACLE not in rows:
        return None
    return {m: lowest_share(vals, ORACLE, rows, "long", m) for m in ("kl", "js")}


def one_rule(scores: RowScores, rows: Sequence[str], common: Sequence[str], mf_rows, non_mf, n_boot: int,
             reference: str) -> dict:
    """Tables, spread and relative KL of one scoring rule, on the 9 dimensions and on the 8 label ones."""
    vals = per_event_values(scores, common)
    methods, spread = table(vals, rows)
    vals_nk = per_event_values(scores, common, dims=LABEL_DIMS)
    nk_methods, nk_spread = table(vals_nk, rows)
    return {"vals": vals, "methods": methods, "spread": spread,
            "relative_kl": relative_kl(vals, mf_rows, non_mf, n_boot, reference=reference),
            "ceiling": ceiling(vals, rows),
            "without_keywords": {"dimensions": list(LABEL_DIMS), "methods": nk_methods, "spread": nk_spread,
                                 "relative_kl": relative_kl(vals_nk, mf_rows, non_mf, n_boot, reference=reference),
                                 "ceiling": ceiling(vals_nk, rows)},
            "vals_nk": vals_nk}


def aggregate(scores: RowScores, paper: RowScores, specs: dict[str, MethodSpec], event_meta: dict[str, dict],
              n_boot: int = 2000, reference: str = "mf") -> dict:
    """The results block of one warm-up. ``scores`` / ``paper``: every row's per-event scores under the
    default rule / the paper's; LLM rows are those in ``specs``, the others are LLM-free."""
    rows = list(scores)
    llm_rows = [r for r in rows if r in specs]
    common = [e for e in event_meta if all(e in scores[r] for r in llm_rows)]
    if not common:
        raise ConfigError("the runs have no evaluated event in common")
    mf_rows = [r for r in llm_rows if specs[r].is_mf]
    non_mf = [r for r in llm_rows if not specs[r].is_mf]
    main = one_rule(scores, rows, common, mf_rows, non_mf, n_boot, reference)
    pap = one_rule(paper, rows, common, mf_rows, non_mf, n_boot, reference)
    vals = main["vals"]

    dims: dict = {}
    for r in rows:
        dims[r] = {h: {d: {met: mean([(((scores[r].get(e) or {}).get(h) or {}).get("dimensions", {}).get(d) or {})
                                      .get(met) for e in common]) for met in METRICS}
                       for d in ALL_DIMENSIONS} for h in HORIZONS}

    domains: dict = {}
    by_dom: dict[str, list[int]] = {}
    for i, e in enumerate(common):
        by_dom.setdefault(event_meta[e]["domain"], []).append(i)
    for dom, idx in sorted(by_dom.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        sub = {r: {h: {met: [vals[r][h][met][i] for i in idx] for met in METRICS} for h in HORIZONS} for r in rows}
        dm, _ = table(sub, rows)
        domains[dom] = {"n_events": len(idx), "events": [common[i] for i in idx], "methods": dm,
                        "relative_kl": {r: {h: changes(e) for h, e in per_h.items()}
                                        for r, per_h in relative_kl(sub, mf_rows, non_mf, 0).items()}}
    return {"rows": rows, "n_events": len(common), "events": common,
            "methods": main["methods"], "spread": main["spread"], "relative_kl": main["relative_kl"],
            "without_keywords": main["without_keywords"], "ceiling": main["ceiling"],
            "paper": {"methods": pap["methods"], "spread": pap["spread"], "relative_kl": pap["relative_kl"],
                      "ceiling": pap["ceiling"], "without_keywords": pap["without_keywords"]},
            "dimensions": dims, "domains": domains,
            "per_event": {r: {h: {"kl": vals[r][h]["kl"], "js": vals[r][h]["js"],
                                  "kl_8": main["vals_nk"][r][h]["kl"], "js_8": main["vals_nk"][r][h]["js"]}
                              for h in HORIZONS} for r in rows}}


def order_rows(llm_rows: Sequence[str], label_rows: Sequence[str]) -> list[str]:
    """Table order: the LLM rows, the smooth baselines, then the sampled LLM-free rows."""
    return [*llm_rows, *BASELINES, *(r for r in label_rows if r not in BASELINES)]
