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
