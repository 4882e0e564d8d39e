"""The MF-LLM loop.

For each event, actions are cut into steps (k agents or a time window). In warm-up the mean field
and the history are fed the real actions; in rollout the policy writes each agent's action from
(event, context, state), where the context is the method's (mean field m_t, recent, popular, none),
and the mean field is updated from the step's (state, simulated action) pairs.

Several events advance together: each round takes the next step of every active event and sends all
their agents to the backend in one batched call (agents of one step share their prompt prefix).
Seeds are derived per agent and per step, so the result does not depend on batching, and a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from mfllm.backends.base import Backend, GenerationRequest
from mfllm.data.schema import Event
from mfllm.data.state import agent_state_text
from mfllm.errors import ConfigError
from mfllm.prompts.templates import policy_prefix, policy_suffix, target_to_action
from mfllm.seeds import derive_seed
from mfllm.simulation.config import SimConfig  # noqa: F401 - re-exported (its home is config.py)
from mfllm.simulation.decision import split_header
from mfllm.simulation.history import History
from mfllm.simulation.interventions import Intervention
from mfllm.simulation.meanfield import MeanFieldModel, MeanFieldState, MeanFieldUpdate, make_meanfield
from mfllm.simulation.methods import METHODS, Method, make_method
from mfllm.simulation.steps import Step, plan_steps
from mfllm.store.records import ActionRecord, StepRecord


@dataclass
class EventRun:
    """One event's simulation state (bounded: history window + mean field)."""

    event: Event
    steps: Iterator[Step]
    history: History
    meanfield: MeanFieldState
    next_step: int = 0
    rollout_done: int = 0
    done: bool = False
    pending: Step | None = None
    agents: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


# The longest history any method reads (recent 5, popular 30): what a resumed event must keep.
HISTORY_WINDOW = max(m.history_window for m in METHODS.values())


@dataclass
class ResumePoint:
    """What a resumed event needs from its finished step records, folded one record at a time so that
    resuming a run of a million agents holds a few numbers per step and the last HISTORY_WINDOW actions
    per event, not every record (the history drops older actions anyway)."""

    steps: list[int] = field(default_factory=list)
    tail: deque = field(default_factory=lambda: deque(maxlen=HISTORY_WINDOW))  # (id, fed text, parent, followers, time)
    fed: int = 0  # actions fed to the history so far
    rollout_done: int = 0
    agents: int = 0
    meanfield_state: dict | None = None

    def add(self, rec: StepRecord | dict, teacher_forcing: bool) -> None:
        rec = StepRecord.from_json(rec)
        self.steps.append(rec.step)
        for a, (_, text) in zip(rec.actions, _fed(rec.actions, rec.phase, teacher_forcing), strict=True):
            self.tail.append((a.action_id, text, a.parent, a.followers, a.time))
            self.fed += 1
            if rec.phase == "rollout" and not a.injected:
                self.rollout_done += 1
        self.agents += len(rec.actions)
        self.meanfield_state = rec.meanfield_state


def fold_records(records: Iterable[StepRecord | dict], teacher_forcing: bool) -> dict[str, ResumePoint]:
    """Finished step records (in file order) -> one ResumePoint per event."""
    out: dict[str, ResumePoint] = {}
    for rec in records:
        out.setdefault(rec["event_id"], ResumePoint()).add(rec, teacher_forcing)
    return out


@dataclass
class RunSummary:
    events: int = 0
    steps: int = 0
    agents_simulated: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    empty_outputs: int = 0
    interrupted: bool = False
    per_event: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("events", "steps", "agents_simulated", "prompt_tokens",
                                              "generated_tokens", "seconds", "empty_outputs", "interrupted", "per_event")}


class Simulator:
    def __init__(self, backend: Backend | None, config: SimConfig, meanfield: MeanFieldModel | None = None,
                 interventions: list[Intervention] | None = None):
        self.backend, self.cfg = backend, config
        if config.meanfield_header and (not config.decision_header or config.meanfield == "llm"
                                        or config.teacher_forcing):
            raise ConfigError("meanfield_header needs a decide model (decision_header), a stats mean field and no "
                              "teacher forcing", field="sim.meanfield_header")
        self.method: Method = make_method(config.method)
        if config.meanfield == "llm":
            mf_options: dict = {"adapter": config.meanfield_adapter, "max_new_tokens": config.meanfield_max_new_tokens}
        else:
            mf_options = {} if config.meanfield_decay is None else {"decay": config.meanfield_decay}
        self.meanfield = meanfield or make_meanfield(config.meanfield, lang=config.lang, backend=backend, **mf_options)
        self.interventions = interventions or []
        self.params = config.sampling()
        self.window = HISTORY_WINDOW

    # ------------------------------------------------------------------ setup / resume
    def start(self, event: Event) -> EventRun:
        return EventRun(event, plan_steps(event.actions, self.cfg.step_size, self.cfg.warmup, self.cfg.time_window),
                        History(self.window), self.meanfield.initial(self.cfg.lang))

    def restore(self, event: Event, done: ResumePoint | list[StepRecord]) -> EventRun:
        """Rebuild an event's state from its finished steps (a resumed run)."""
        if not isinstance(done, ResumePoint):
            done = fold_records(done, self.cfg.teacher_forcing).get(event.event_id, ResumePoint())
        run = self.start(event)
        for index in done.steps:
            step = next(run.steps, None)
            if step is None or step.index != index:
                raise ConfigError(f"event {event.event_id}: the stored steps do not match the data; "
                                  "was the data changed since the run started?")
            for iv in self.interventions:  # replay triggers (a one-shot inject must not fire again)
                iv.begin_step(event, step)
        # Replaying the last window of actions gives the same history as replaying all of them: an older
        # action has left the window, and with it every repost count that could still change.
        run.history.total = done.fed - len(done.tail)
        for action_id, text, parent, followers, t in done.tail:
            run.history.add(action_id, text, parent, followers, t)
        if done.meanfield_state is not None:
            run.meanfield = MeanFieldState.from_dict(done.meanfield_state)
        run.next_step = done.steps[-1] + 1 if done.steps else 0
        run.rollout_done, run.agents = done.rollout_done, done.agents
        return run

    # ------------------------------------------------------------------ the loop
    def run(self, events: Iterable[Event], sink: Callable[[StepRecord], None],
            resume: dict[str, ResumePoint | list[StepRecord]] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunSummary:
        """Simulate events; each finished step's record goes to `sink` (the run store) in order."""
        resume = resume or {}
        summary = RunSummary()
        t0 = time.time()
        queue = iter(events)
        active: list[EventRun] = []
        while True:
            while len(active) < self.cfg.events_in_flight:
                ev = next(queue, None)
                if ev is None:
                    break
                run = self.restore(ev, resume[ev.event_id]) if ev.event_id in resume else self.start(ev)
                active.append(run)
                summary.events += 1
            if not active:
                break
            for run in active:
                run.pending = self._next_step(run)
            live = [r for r in active if r.pending is not None]
            if live:
                for rec in self._round(live, summary):
                    sink(rec)
                    summary.steps += 1
                if should_stop is not None and should_stop():
                    summary.interrupted = True
                    break
            for r in active:
                if r.pending is None:
                    r.done = True
                    summary.per_event[r.event.event_id] = {"agents": r.agents, "prompt_tokens": r.prompt_tokens,
                                                           "generated_tokens": r.generated_tokens}
            active = [r for r in active if not r.done]
        summary.seconds = round(time.time() - t0, 3)
        return summary

    def _next_step(self, run: EventRun) -> Step | None:
        step = next(run.steps, None)
        if step is None:
            return None
        if step.phase == "rollout" and self.cfg.max_rollout_agents is not None:
            left = self.cfg.max_rollout_agents - run.rollout_done
            if left <= 0:
                return None
            step.actions = step.actions[:left]
        return step

    def _round(self, runs: list[EventRun], summary: RunSummary) -> list[StepRecord]:
        cfg, lang = self.cfg, self.cfg.lang
        t0 = time.time()
        requests: list[GenerationRequest] = []
        plan = []  # per run: (step, actions, states, injected, request slice)
        for run in runs:
            step = run.pending
            ev_id = run.event.event_id
            actions = step.actions
            for iv in self.interventions:
                iv.begin_step(run.event, step)
            for iv in self.interventions:
                actions = iv.agents(ev_id, step.index, actions, derive_seed(cfg.seed, ev_id, step.index, "agents"))
            injected = [inj for iv in self.interventions
                        for inj in iv.injected(ev_id, step.index, derive_seed(cfg.seed, ev_id, step.index, "inject"))]
            states = [agent_state_text(a.profile, lang, depth=a.depth) for a in actions]
            lo = len(requests)
            if step.phase == "rollout":
                mf_text = run.meanfield.text
                for iv in self.interventions:
                    mf_text = iv.meanfield_text(ev_id, step.index, mf_text)
                history = run.history
                if injected:  # the injected posts are seen by this step's agents
                    history = _with_injected(run.history, injected, ev_id, step.index)
                prefix = policy_prefix(run.event.source.text, self.method.context(history, mf_text, lang), lang)
                for a, st in zip(actions, states, strict=True):
                    extra = [x for iv in self.interventions
                             if (x := iv.instruction(ev_id, step.index, a, derive_seed(cfg.seed, ev_id, a.action_id, "instr")))]
                    suffix_state = st + "".join(f"（{x}）" if lang == "zh" else f" ({x})" for x in extra)
                    requests.append(GenerationRequest(prefix + policy_suffix(suffix_state, lang),
                                                      seed=derive_seed(cfg.seed, ev_id, a.action_id),
                                                      params=self.params, adapter=cfg.policy_adapter))
            plan.append((run, step, actions, states, injected, lo, len(requests)))

        completions = self.backend.generate(requests) if requests else []
        if len(completions) != len(requests):
            raise ConfigError(f"backend returned {len(completions)} completions for {len(requests)} requests")

        updates, records = [], []
        for run, step, actions, states, injected, lo, hi in plan:
            ev_id = run.event.event_id
            rows: list[ActionRecord] = []
            for inj in injected:
                rows.append(ActionRecord(inj.agent_id, f"inj-{step.index}-{len(rows)}", None, inj.state, inj.text,
                                         sim_text=inj.text, injected=True))
            comps = completions[lo:hi]
            for i, (a, st) in enumerate(zip(actions, states, strict=True)):
                row = ActionRecord(a.agent_id, a.action_id, a.time, st, a.text, parent=a.parent,
                                   followers=a.profile.followers)
                if step.phase == "rollout":
                    c = comps[i]
                    line = c.text.split("\n", 1)[0]
                    if not line.strip():
                        summary.empty_outputs += 1
                    if cfg.decision_header:  # the text is the action; the header's labels are kept beside it
                        dec = split_header(line, lang)
                        line, row.decision = dec.text, dec.labels or {}
                    row.sim_text = target_to_action(line, lang)
                    row.prompt_tokens, row.generated_tokens = c.prompt_tokens, c.generated_tokens
                    run.prompt_tokens += c.prompt_tokens
                    run.generated_tokens += c.generated_tokens
                    summary.prompt_tokens += c.prompt_tokens
                    summary.generated_tokens += c.generated_tokens
                    summary.agents_simulated += 1
                    run.rollout_done += 1
                rows.append(row)
            fed = _fed(rows, step.phase, cfg.teacher_forcing)
            decided = None
            if cfg.meanfield_header and step.phase == "rollout" and not cfg.teacher_forcing:
                decided = [None if r.injected else r.decision for r in rows]
            updates.append(MeanFieldUpdate(run.event.source.text, run.meanfield, fed,
                                           seed=derive_seed(cfg.seed, ev_id, step.index, "mf"), decisions=decided))
            records.append(rows)

        new_mfs = self.meanfield.update_many(updates) if updates else []
        seconds = round((time.time() - t0) / max(1, len(plan)), 4)
        out = []
        for (run, step, *_), rows, mf in zip(plan, records, new_mfs, strict=True):
            for r, (_, text) in zip(rows, _fed(rows, step.phase, cfg.teacher_forcing), strict=True):
                run.history.add(r.action_id, text, r.parent, r.followers, r.time or 0.0)
            run.meanfield = mf
            run.next_step = step.index + 1
            run.agents += len(rows)
            out.append(StepRecord(run.event.event_id, step.index, step.phase, mf.text, mf.to_dict(), rows, seconds))
        return out


def _fed(rows: list[ActionRecord], phase: str, teacher_forcing: bool) -> list[tuple[str, str]]:
    return [(r.state, r.real_text if (phase == "warmup" or teacher_forcing or r.injected) else r.sim_text)
            for r in rows]


def _with_injected(history: History, injected, ev_id: str, step: int) -> History:
    """A copy of the history with this step's injected posts appended (the original is updated later)."""
    h = History(history.window)
    for it in history.items:
        h.items.append(it)
    h.reposts_received = dict(history.reposts_received)
    h.total = history.total
    for i, inj in enumerate(injected):
        h.add(f"inj-{step}-{i}", inj.text, None, None, 0.0)
    return h
