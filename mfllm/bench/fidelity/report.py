"""results.md, rendered from results.json alone."""

from __future__ import annotations

from mfllm.evaluation.distributions import HORIZONS

HIGHER_IS_BETTER = frozenset({"micro_f1"})
TABLE_METRICS: tuple[str, ...] = ("kl", "js", "wasserstein", "dtw", "micro_f1")
NAMES = {"kl": "KL ↓", "js": "JS ↓", "wasserstein": "W1 ↓", "dtw": "DTW ↓", "micro_f1": "F1 ↑ (majority-biased)"}


def _f(x: float | None, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def _ci_pct(ci) -> str:
    return "–" if not ci else f"[{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]"


def _rel_cell(c: dict | None, name: bool = False) -> str:
    if not c:
        return "–"
    s = f"{_pct(c.get('change'))} {_ci_pct(c.get('change_ci95'))}"
    if c.get("wins") is not None:
        s += f", wins {round(100 * c['wins'])}%"
    return (f"{c['against']}: " if name and c.get("against") else "") + s


def _relative_rows(rel: dict) -> list[str]:
    """One table line per mean-field row and horizon: KL, then against the best non-MF row and the baselines."""
    lines = []
    for row, per_h in rel.items():
        for h in HORIZONS:
            e = per_h[h]
            lines.append(f"| {row} | {h} | {_f(e['kl'])} | {_rel_cell(e['vs_best_non_mf'], True)} | "
                         f"{_rel_cell(e['vs_persistence'])} | {_rel_cell(e['vs_marginal'])} | "
                         f"{_rel_cell(e.get('vs_persistence-sampled'))} | {_rel_cell(e.get('vs_marginal-sampled'))} |")
    return lines


def _cell(block: dict, row: str, m: str, h: str, bold: bool) -> str:
    mean, sp = block["methods"][row][m][h], block["spread"][row][m][h]
    c = _f(mean) + (f" ± {_f(sp['std'])}" if sp.get("std") is not None else "")
    return f"**{c}**" if bold else c


def _best(block: dict, rows, m: str, h: str) -> str | None:
    v = {row: block["methods"][row][m][h] for row in rows if block["methods"][row][m][h] is not None}
    if not v:
        return None
    return (max if m in HIGHER_IS_BETTER else min)(v, key=v.get)


def _ceiling_line(c: dict | None) -> str:
    if not c:
        return ""
    return ("oracle-sampled has the lowest long-horizon KL on "
            f"{c['kl']['events']}/{c['kl']['n']} events ({_pct(c['kl']['share'])[1:]}) and the lowest JS on "
            f"{c['js']['events']}/{c['js']['n']} ({_pct(c['js']['share'])[1:]}).")


def render_markdown(r: dict) -> str:
    st = r["settings"]
    sc = r.get("scoring") or {}
    rows = r["rows"]
    nk = r["without_keywords"]
    L: list[str] = []
    title = "Fidelity benchmark" + (f" — {r['label']}" if r.get("label") else "")
    L += [f"# {title}", "",
          f"- command: `{r['command']}`",
          f"- date: {r['created']}; bench wall time (this invocation): {r.get('seconds', 0):.0f} s",
          f"- machine: {r['machine']['cpu']} ({r['machine']['cpus_usable']} usable CPUs, load "
          f"{r['machine']['load_avg']}), device {r['machine']['device']}, {r['machine']['platform']}",
          f"- data: {st['data']} (split {st['split']}): {r['n_events']} events scored "
          f"({st['events_selection']['in_split']} in split, {st['events_selection']['too_short']} too short "
          f"for warm-up + rollout)",
          f"- model: {st['model']} (backend {st['backend']}"
          + (f", weights sha256 {st['model_sha256'][:16]}…" if st.get("model_sha256") else "")
          + f"); seed {st['seed']}; warm-up {st['warmup']} real actions; rollout capped at "
          f"{st['max_agents'] or 'all'} agents/event; step {st['step_size']} agents",
          f"- labeler: {st['labeler'].get('name')} v{st['labeler'].get('version')}; bins: {st['binning']}; "
          f"marginal: {st['marginal']}",
          f"- scoring (default rule): {sc.get('replicas')} replica crowd(s) per row pooled per bin, additive "
          f"smoothing of the counts on both sides with alpha = {sc.get('alpha')} (KL, JS); W1 / DTW on the "
          "pooled shares; micro-F1 over every crowd (majority-biased). The paper's rule (eps = 1e-6, one "
          "crowd) is the `paper` table below.",
          "",
          "Metrics are per event, then mean ± std over events (95% CI of the mean in results.json). KL/JS/W1/DTW: "
          "lower is better; F1: higher is better, but it rewards predicting every agent's majority label, so a "
          "sampled crowd scores below a constant predictor. Horizons: short = first third of the rollout bins, "
          "mid = first two thirds, long = all.", ""]
    L += ["## Headline: 8 label dimensions (macro without keywords)", "",
          "| row | " + " | ".join(f"{NAMES[m]} {h}" for h in HORIZONS for m in ("kl", "js")) + " |",
          "|---|" + "---:|" * (2 * len(HORIZONS))]
    best = {(m, h): _best(nk, rows, m, h) for h in HORIZONS for m in ("kl", "js")}
    for row in rows:
        L.append(f"| {row} | " + " | ".join(_cell(nk, row, m, h, best[(m, h)] == row)
                                            for h in HORIZONS for m in ("kl", "js")) + " |")
    L += ["", _ceiling_line(nk.get("ceiling")), ""]
    for h in HORIZONS:
        L += [f"## All 9 dimensions, {h} horizon", "", "| row | " + " | ".join(NAMES[m] for m in TABLE_METRICS) + " |",
              "|---|" + "---:|" * len(TABLE_METRICS)]
        best9 = {m: _best(r, rows, m, h) for m in TABLE_METRICS}
        for row in rows:
            L.append(f"| {row} | " + " | ".join(_cell(r, row, m, h, best9[m] == row) for m in TABLE_METRICS) + " |")
        L.append("")
    L += [_ceiling_line(r.get("ceiling")) + " (9 dimensions)", ""]
    if r["relative_kl"]:
        L += ["## Relative KL change of the mean-field rows", "",
              "`(KL_mf − KL_other) / KL_other` on the mean KL over events (negative = mf better); "
              "[95% paired bootstrap interval over events]; wins = share of events where the mf row's KL is lower.",
              "", "8 label dimensions:", "",
              "| row | horizon | KL (8 dims) | vs best non-MF | vs persistence | vs marginal | vs persistence-sampled | "
              "vs marginal-sampled |", "|---|---|---:|---|---|---|---|---|"]
        L += _relative_rows(nk["relative_kl"])
        L += ["", "9 dimensions:", "", "| row | horizon | KL | vs best non-MF | vs persistence | vs marginal | "
              "vs persistence-sampled | vs marginal-sampled |", "|---|---|---:|---|---|---|---|---|"]
        L += _relative_rows(r["relative_kl"]) + [""]
    ref = st.get("reference", "mf")
    abl = {row: per_h for row, per_h in nk["relative_kl"].items()
           if row != ref and (per_h["long"].get("vs_reference") or per_h["long"].get("vs_mf"))}
    if abl:
        L += [f"## Mean-field ablations and diagnostics against `{ref}` (8 label dimensions)", "",
              f"`(KL_row − KL_ref) / KL_ref` with ref = `{ref}` [95% paired bootstrap]; wins = share of events "
              "where the row's KL is lower than the reference's. A policy that reads m_t should lose with "
              "`mf-empty` / `mf-shuffled` and gain with `mf-tf`.", "", "| row | short | mid | long |",
              "|---|---|---|---|"]
        for row, per_h in abl.items():
            L.append(f"| {row} | " + " | ".join(_rel_cell(per_h[h].get("vs_reference") or per_h[h].get("vs_mf"))
                                                 for h in HORIZONS) + " |")
        L.append("")
    pap = r.get("paper")
    if pap:
        L += ["## The paper's rule (biased against sampled crowds)", "",
              "KL with eps = 1e-6 added to the shares, one crowd (replica 0) per row, as in the paper. With ~16 "
              "actions per bin a sampled crowd misses categories by chance and each miss costs ~p ln(p/eps): "
              "this rule ranks smooth predictors above any sampler, even one drawing from the true rollout.", "",
              "| row | " + " | ".join(f"KL ↓ {h} (8 dims)" for h in HORIZONS) + " | KL ↓ long (9 dims) | JS ↓ long | F1 ↑ long |",
              "|---|" + "---:|" * (len(HORIZONS) + 3)]
        for row in rows:
            L.append(f"| {row} | " + " | ".join(_f(pap["without_keywords"]["methods"][row]["kl"][h]) for h in HORIZONS)
                     + f" | {_f(pap['methods'][row]['kl']['long'])} | {_f(pap['methods'][row]['js']['long'])} | "
                     f"{_f(pap['methods'][row]['micro_f1']['long'])} |")
        L += ["", _ceiling_line((pap.get("without_keywords") or {}).get("ceiling")) + " (paper rule, 8 dimensions)", ""]
    dims = list(next(iter(r["dimensions"].values()))["long"])
    L += ["## Per dimension (long horizon, KL ↓ / F1 ↑)", "",
          "| dimension | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    for d in dims:
        L.append(f"| {d} | " + " | ".join(
            f"{_f(r['dimensions'][row]['long'][d]['kl'], 2)} / {_f(r['dimensions'][row]['long'][d]['micro_f1'], 2)}"
            for row in rows) + " |")
    L.append("")
    L += ["## Per domain (long horizon, KL ↓, 9 dimensions)", "",
          "| domain | events | " + " | ".join(rows) + " | mf vs best non-MF |",
          "|---|---:|" + "---:|" * (len(rows) + 1)]
    for dom, b in r["domains"].items():
        rel = (b["relative_kl"].get("mf") or {}).get("long", {}).get("vs_best_non_mf")
        L.append(f"| {dom} | {b['n_events']} | " + " | ".join(_f(b["methods"][row]["kl"]["long"]) for row in rows)
                 + f" | {_pct(rel)} |")
    L.append("")
    if r.get("mf_oracle"):
        mo = r["mf_oracle"]
        L += ["## mf-oracle", "", f"Fitted on {mo.get('train_events')} training events ({mo.get('n')} actions); "
              f"log-loss {_f(sum((mo.get('log_loss') or {}).values()))} vs the marginal's "
              f"{_f(sum((mo.get('marginal_log_loss') or {}).values()))} nats/action over the 8 label dimensions "
              f"(training split; gain {_f(mo.get('gain_nats_per_action'))}).", ""]
    if r["cost"]:
        L += ["## Run cost", "",
              "| row | replicas | agents | wall s | agents/s | LLM calls (batches) | LLM requests/agent | "
              "prompt tok/agent | generated tok/agent |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row, c in r["cost"].items():
            L.append(f"| {row} | {c.get('replicas', 1)} | {c['agents']} | {_f(c['wall_seconds'], 0)} | "
                     f"{_f(c['agents_per_second'], 2)} | {c['llm_calls']} | {_f(c['llm_requests_per_agent'], 2)} | "
                     f"{_f(c['prompt_tokens_per_agent'], 1)} | {_f(c['generated_tokens_per_agent'], 1)} |")
        L.append("")
    if r.get("warmup_sensitivity"):
        ws = r["warmup_sensitivity"]
        wrows = next(iter(ws.values()))["methods"].keys()
        L += ["## Warm-up sensitivity (long horizon, KL ↓, 9 dimensions)", "",
              "| warm-up | events | " + " | ".join(wrows) + " | mf vs best non-MF | mf vs persistence |",
              "|---:|---:|" + "---:|" * (len(wrows) + 2)]
        for w, b in ws.items():
            e = (b["relative_kl"].get("mf") or {}).get("long") or {}
            L.append(f"| {w} | {b['n_events']} | " + " | ".join(_f(b["methods"][row]["kl"]["long"]) for row in wrows)
                     + f" | {_rel_cell(e.get('vs_best_non_mf'), True)} | {_rel_cell(e.get('vs_persistence'))} |")
        L.append("")
    if r.get("warnings"):
        L += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    return "\n".join(L)
