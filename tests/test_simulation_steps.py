from mfllm.data.schema import Action, Profile
from mfllm.simulation.steps import plan_steps


def acts(n, dt=60.0):
    return [Action(f"a{i}", f"u{i}", 1000.0 + i * dt, "" if i % 3 else f"评论{i}", None, Profile(f"u{i}")) for i in range(n)]


def test_warmup_is_exact_when_not_a_multiple_of_the_step():
    steps = list(plan_steps(acts(100), step_size=16, warmup=40))
    warm = [a for s in steps if s.phase == "warmup" for a in s.actions]
    assert len(warm) == 40
    assert [len(s.actions) for s in steps][:4] == [16, 16, 8, 16]
    assert all(s.phase == "rollout" for s in steps[3:])
    assert [s.index for s in steps] == list(range(len(steps)))
    assert sum(len(s.actions) for s in steps) == 100


def test_zero_warmup_and_warmup_longer_than_event():
    assert all(s.phase == "rollout" for s in plan_steps(acts(20), step_size=8, warmup=0))
    steps = list(plan_steps(acts(20), step_size=8, warmup=48))
    assert all(s.phase == "warmup" for s in steps) and sum(len(s.actions) for s in steps) == 20


def test_time_windows_cut_by_time_and_at_the_warmup_boundary():
    steps = list(plan_steps(acts(30, dt=60), step_size=16, warmup=10, time_window=300))
    assert sum(len(s.actions) for s in steps) == 30
    assert sum(len(s.actions) for s in steps if s.phase == "warmup") == 10
    for s in steps:
        assert s.actions[-1].time - s.actions[0].time < 300


def test_works_on_a_generator():
    gen = (a for a in acts(50))
    assert sum(len(s.actions) for s in plan_steps(gen, step_size=7, warmup=5)) == 50


def test_resume_keeps_only_a_window_yet_rebuilds_the_same_history():
    """A resumed event replays only its last HISTORY_WINDOW actions; its history (texts, order, repost
    counts that `popular` ranks by) must equal a replay of every action."""
    from mfllm.data.load import load_events
    from mfllm.paths import SAMPLE_DATA
    from mfllm.simulation.engine import HISTORY_WINDOW, SimConfig, Simulator, fold_records
    from mfllm.simulation.history import History
    from mfllm.store.records import ActionRecord, StepRecord

    events = load_events(SAMPLE_DATA / "events.jsonl", split="all", limit=10).events
    ev = max(events, key=lambda e: sum(a.parent is not None for a in e.actions[:400]))
    acts = ev.actions[:400]
    assert sum(a.parent is not None for a in acts) > 10  # a real cascade with reposts of reposts
    sim = Simulator(None, SimConfig(method="popular", step_size=16, warmup=len(acts)))
    records = [StepRecord(ev.event_id, st.index, st.phase, f"m{st.index}", {"text": f"m{st.index}", "data": {}},
                          [ActionRecord(a.agent_id, a.action_id, a.time, "", a.text, parent=a.parent,
                                        followers=a.profile.followers) for a in st.actions])
               for st in plan_steps(acts, 16, len(acts))]
    point = fold_records(records, teacher_forcing=False)[ev.event_id]
    assert len(point.tail) == HISTORY_WINDOW < len(acts)
    run = sim.restore(ev, point)

    full = History(HISTORY_WINDOW)
    for a in acts:
        full.add(a.action_id, a.text, a.parent, a.profile.followers, a.time)
    assert [(i.action_id, i.text, i.order) for i in run.history.items] == [(i.action_id, i.text, i.order) for i in full.items]
    assert run.history.reposts_received == full.reposts_received and run.history.total == full.total == len(acts)
    assert any(v > 0 for v in full.reposts_received.values())
    assert run.next_step == records[-1].step + 1 and run.agents == len(acts)
    assert run.meanfield.text == records[-1].meanfield_state["text"]
