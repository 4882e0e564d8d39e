"""Ray scale-out: RayBackend and run_events_parallel give the single-process results (seeded local model).

The tests that need Ray are skipped when it is not installed (it is the optional extra `mfllm[ray]`, not part of
`dev`), except under MFLLM_REQUIRE_RAY=1 (.ci/run, which installs it); the missing-Ray message is tested either way.
Uses a local Ray cluster (ray.init(num_cpus=2)) and the shipped mfllm-mini.
"""

from __future__ import annotations

import builtins
import json
import os

import pytest

from mfllm.backends.base import GenerationRequest, SamplingParams
from mfllm.data.load import load_events
from mfllm.errors import ConfigError
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.simulation.engine import SimConfig, Simulator
from mfllm.store.run import RunStore, read_steps


def test_missing_ray_is_one_clear_line(monkeypatch):
    from mfllm.backends import ray_pool

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"pip install 'mfllm\[ray\]'"):
        ray_pool.require_ray()


CFG = dict(step_size=4, warmup=4, max_rollout_agents=12, max_new_tokens=8, seed=3, events_in_flight=2)
SPEC = {"name": "hf", "model": str(DEFAULT_MODEL), "batch_size": 8, "num_threads": 1}


def _strip(records):
    """Records keyed by (event, step), without the timing field."""
    return {(r["event_id"], r["step"]): {k: v for k, v in r.items() if k not in ("seconds", "sha")} for r in records}


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("MFLLM_REQUIRE_RAY"):  # .ci/run installs mfllm[ray]: there a missing Ray fails, never skips
        import ray
    else:
        ray = pytest.importorskip("ray")  # the optional extra mfllm[ray]
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def events():
    evs = load_events(SAMPLE_DATA, limit=3).events
    return evs


@pytest.fixture(scope="module")
def local_records(events):
    from mfllm.backends.hf import HFBackend

    be = HFBackend(DEFAULT_MODEL, batch_size=8, num_threads=1)
    out: list[dict] = []
    Simulator(be, SimConfig(**CFG)).run(events, out.append)
    return be, out


def test_sim_worker_streams_the_local_records_without_ray(events, local_records):
    """What each actor of run_events_parallel runs (plain Python, no Ray needed): a Simulator over its own
    backend, streaming the single-process run's records, then a summary; a bad backend comes back as data."""
    from mfllm.backends.ray_pool import BackendSpec, restore_error
    from mfllm.simulation.ray_runner import SimWorker

    _, local_recs = local_records
    items = list(SimWorker(BackendSpec("hf", {k: v for k, v in SPEC.items() if k != "name"})).simulate(
        events, SimConfig(**CFG).model_dump(), {}, None))
    assert "__summary__" in items[-1] and items[-1]["__summary__"]["events"] == len(events)
    assert _strip(items[:-1]) == _strip(local_recs)
    bad = list(SimWorker(BackendSpec("hf", {"model": "/nonexistent-model"})).simulate(events, {}, {}, None))
    assert len(bad) == 1 and isinstance(restore_error(bad[0]), ConfigError)


def test_ray_backend_matches_local(cluster, events, local_records):
    from mfllm.backends.ray_pool import RayBackend

    local, local_recs = local_records
    with RayBackend(SPEC, replicas=2) as rb:
        assert rb.describe()["replicas"] == 2 and rb.describe()["inner"]["backend"] == "hf"
        # a plain batch: split in two shards, same texts as one local call
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, stop=("\n",))
        reqs = [GenerationRequest("【微博】今天地震了\n【你】用户" + "甲乙丙丁戊己"[i % 6], seed=i, params=params)
                for i in range(7)]
        got = rb.generate(reqs)
        want = local.generate(reqs)
        assert [(c.text, c.generated_tokens) for c in got] == [(c.text, c.generated_tokens) for c in want]
        assert rb.stats.requests == 7 and sum(s["requests"] for s in rb.replica_stats()) == 7
        assert rb.shards(7) == [(0, 4), (4, 7)] and rb.shards(1) == [(0, 1)]
        # a whole simulation through the pool: the same records as the single-process run
        recs: list[dict] = []
        Simulator(rb, SimConfig(**CFG)).run(events, recs.append)
        assert _strip(recs) == _strip(local_recs)
        assert [(r["event_id"], r["step"]) for r in recs] == [(r["event_id"], r["step"]) for r in local_recs]


def test_run_events_parallel_matches_local_and_resumes(cluster, events, local_records, tmp_path):
    from mfllm.simulation.ray_runner import run_events_parallel

    _, local_recs = local_records
    out = tmp_path / "par"
    s = run_events_parallel(events, out, SPEC, SimConfig(**{**CFG, "events_in_flight": 1}), replicas=2,
                            data=str(SAMPLE_DATA))
    recs = read_steps(out)
    assert _strip(recs) == _strip(local_recs)  # events_in_flight does not change results
    assert s.events == 3 and s.agents_simulated == sum(len(r["actions"]) for r in local_recs
                                                        if r["phase"] == "rollout")
    assert RunStore(out).is_done()
    done = json.loads((out / "done.json").read_text())
    assert done["parallel"]["replicas"] == 2

    # an interrupted parallel run (steps.jsonl cut mid-line) resumes to the same records
    part = tmp_path / "part"
    part.mkdir()
    (part / "config.json").write_text((out / "config.json").read_text())
    lines = (out / "steps.jsonl").read_text().splitlines(keepends=True)
    (part / "steps.jsonl").write_text("".join(lines[:5]) + lines[5][:40])
    run_events_parallel(events, part, SPEC, replicas=2, resume=True)
    assert _strip(read_steps(part)) == _strip(local_recs)
    assert len(read_steps(part)) == len(local_recs)


def test_registry_builds_ray_backend(cluster):
    from mfllm.backends.registry import make_backend

    be = make_backend("ray:hf", model=str(DEFAULT_MODEL), replicas=1, batch_size=4, num_threads=1)
    try:
        assert be.name == "ray:hf" and be.replicas == 1
        out = be.generate([GenerationRequest("你好", seed=1, params=SamplingParams(max_new_tokens=3))])
        assert len(out) == 1 and out[0].generated_tokens <= 3
    finally:
        be.close()


def test_backend_errors_keep_their_kind(cluster):
    from mfllm.backends.ray_pool import RayBackend
    from mfllm.errors import BackendError

    with RayBackend(SPEC, replicas=1) as rb:
        with pytest.raises(BackendError) as ei:
            rb.generate([GenerationRequest("字" * 400, seed=1, params=SamplingParams(max_new_tokens=8))])
        assert ei.value.kind == "context_length"


def test_bad_spec_is_a_config_error(cluster, tmp_path):
    from mfllm.backends.ray_pool import RayBackend

    with pytest.raises(ConfigError, match="not a model directory"):
        RayBackend({"name": "hf", "model": str(tmp_path / "nope")}, replicas=1)
