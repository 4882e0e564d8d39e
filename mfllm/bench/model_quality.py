"""How good is a policy model at writing real agents' actions? (`mfllm bench model`)

For the same held-out actions, the NLL of the real action (per character, so tokenizers compare)
under each method's prompt, against the unigram (marginal) baseline of the training actions; two
controls show whether the model reads the mean field at all: `mf-empty` (no mean field yet) and
`mf-other` (another event's mean field at the same step). Then it generates for the `mf` prompts:
the share of plain reposts against the real share, sample actions, and agents per second.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.data.load import load_events
from mfllm.data.state import agent_state_text
from mfllm.prompts.templates import action_to_target, policy_prefix, policy_suffix, strings, target_to_action
from mfllm.simulation.history import History
from mfllm.simulation.meanfield import MeanFieldUpdate, StatsMeanField
from mfllm.simulation.methods import METHODS, make_method
from mfllm.simulation.steps import plan_steps
from mfllm.training.mini import UNIGRAM_FILE, unigram_nll

METHOD_ROWS = ("mf", "state", "recent", "popular", "mf-empty", "mf-other")


def _walk(event, picks: set[int], lang: str, mf_model: StatsMeanField, step_size: int):
    """Per picked action: its state, real text, mean field and the other methods' contexts at its step."""
    methods = {m: make_method(m) for m in ("state", "recent", "popular")}
    history = History(max(m.history_window for m in METHODS.values()))
    mf = mf_model.initial(lang)
    rows, mf_by_step, pos = [], [], 0
    for step in plan_steps(event.actions, step_size=step_size, warmup=0):
        ctx = {m: methods[m].context(history, mf.text, lang) for m in methods}
        mf_by_step.append(mf.text)
        pairs = []
        for a in step.actions:
            state = agent_state_text(a.profile, lang, depth=a.depth)
            pairs.append((state, a.text))
            if pos in picks:
                rows.append({"step": step.index, "state": state, "text": a.text, "mf": mf.text, "ctx": ctx})
            pos += 1
        mf = mf_model.update_many([MeanFieldUpdate(event.source.text, mf, pairs)])[0]
        for a in step.actions:
            history.add(a.action_id, a.text, a.parent, a.profile.followers, a.time)
    return rows, mf_by_step


class _Phases:
    """A bar over the report's phases on stderr (each a batched model call of a few seconds to minutes)."""

    def __init__(self, enabled: bool, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]bench model"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True),
                            transient=True, disable=not enabled)
        self.task = self.bar.add_task("loading the model", total=total)
        self.bar.start()

    def phase(self, text: str) -> None:
        """The previous phase is done; this one starts."""
        self.bar.update(self.task, advance=1, description=text)

    def close(self) -> None:
        self.bar.update(self.task, advance=1)
        self.bar.stop()


def model_report(model: str, data: str, split: str = "test", limit: int = 20, agents_per_event: int = 16,
                 seed: int = 0, lang: str = "zh", step_size: int = 16, backend=None, progress: bool = False) -> dict:
    from mfllm.backends.hf import HFBackend

    bar = _Phases(progress, total=3 + len(METHOD_ROWS) + 3 + 1 + 1)  # model, events, prompts; scores; gen
    try:
        return _report(bar, model, data, split, limit, agents_per_event, seed, lang, step_size,
                       backend or HFBackend(model))
    finally:
        bar.close()


def _report(bar: _Phases, model, data, split, limit, agents_per_event, seed, lang, step_size, be) -> dict:
    bar.phase("loading events")
    events = load_events(data, split=split, limit=limit).events
    bar.phase(f"building prompts ({len(events)} events)")
    rng = random.Random(seed)
    mf_model = StatsMeanField(lang=lang)
    walked = []
    for ev in events:
        picks = set(rng.sample(range(len(ev.actions)), min(agents_per_event, len(ev.actions))))
        walked.append((ev, *_walk(ev, picks, lang, mf_model, step_size)))
    mf_ctx = make_method("mf")
    empty = strings(lang)["empty_meanfield"]
    prompts: dict[str, list[str]] = {m: [] for m in METHOD_ROWS}
    targets: list[str] = []
    for i, (ev, rows, _) in enumerate(walked):
        other_steps = walked[(i + 1) % len(walked)][2]  # another event's mean field at the same step
        for r in rows:
            suffix = policy_suffix(r["state"], lang)
            ctx = {"mf": mf_ctx.context(None, r["mf"], lang), "mf-empty": mf_ctx.context(None, empty, lang),
                   "mf-other": mf_ctx.context(None, other_steps[min(r["step"], len(other_steps) - 1)], lang),
                   **r["ctx"]}
            for m in METHOD_ROWS:
                prompts[m].append(policy_prefix(ev.source.text, ctx[m], lang) + suffix)
            targets.append(action_to_target(r["text"], lang))
    tok = be.tokenizer
    eos = tok.eos_token or ""
    conts = [t + eos for t in targets]
    chars = sum(len(t) + 1 for t in targets)
    nll = {}
    for m in METHOD_ROWS:
        bar.phase(f"scoring {len(conts)} real actions under the {m} prompt")
        scored = be.score_tokens(prompts[m], conts)
        nll[m] = {"nll_per_char": -sum(s for s, _ in scored) / chars,
                  "nll_per_token": -sum(s for s, _ in scored) / sum(n for _, n in scored)}
    # the repost decision alone: p(repost) = p("[转发]" + end | prompt); binary log-loss against the real choice
    marker = strings(lang)["repost"] + eos
    is_repost = [t == strings(lang)["repost"] for t in targets]
    repost_decision = {}
    for m in ("mf", "mf-other", "state"):
        bar.phase(f"scoring the repost decision under the {m} prompt")
        lp = [s for s, _ in be.score_tokens(prompts[m], [marker] * len(targets))]
        p = [min(max(math.exp(x), 1e-6), 1 - 1e-6) for x in lp]
        repost_decision[m] = {
            "log_loss": -sum(math.log(pi if r else 1 - pi) for pi, r in zip(p, is_repost, strict=True)) / len(p),
            "mean_p_repost": sum(p) / len(p)}
    base = sum(is_repost) / len(is_repost)
    repost_decision["constant"] = {"log_loss": -(base * math.log(base) + (1 - base) * math.log(1 - base)),
                                   "mean_p_repost": base}
    bar.phase("unigram baseline")
    uni_path = Path(model) / UNIGRAM_FILE
    if uni_path.exists():
        counts = {int(k): v for k, v in json.loads(uni_path.read_text()).items()}
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in conts]
        u = sum(unigram_nll(counts, len(tok), x) for x in ids)
        nll["unigram"] = {"nll_per_char": u / chars, "nll_per_token": u / sum(len(x) for x in ids)}

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=48, stop=("\n",))
    reqs = [GenerationRequest(p, seed=seed * 100003 + i, params=params) for i, p in enumerate(prompts["mf"])]
    bar.phase(f"generating {len(reqs)} actions")
    t0 = time.perf_counter()
    comps = be.generate(reqs)
    dt = time.perf_counter() - t0
    sims = [target_to_action(c.text.split("\n", 1)[0], lang) for c in comps]
    real_share = sum(t == strings(lang)["repost"] for t in targets) / len(targets)
    samples, k = [], 0
    for ev, rows, _ in walked[:5]:
        for r in rows[:2]:
            samples.append({"event": ev.source.text[:60], "state": r["state"], "real": r["text"] or "[转发]",
                            "simulated": sims[k] or "[转发]"})
            k += 1
        k += max(0, len(rows) - 2)
    return {"model": str(model), "data": str(data), "split": split, "events": len(events), "actions": len(targets),
            "nll": nll, "repost_decision": repost_decision, "repost_share": {"simulated": sum(s == "" for s in sims) / len(sims), "real": real_share},
            "agents_per_s": len(reqs) / dt, "batch_seconds": dt, "samples": samples}
