"""Simulate many events in parallel on Ray actors, into ONE run directory (optional: ``pip install mfllm[ray]``).

:func:`run_events_parallel` shards *events* across N actors, each running its own ``Simulator`` with its own
backend (built from a :class:`~mfllm.backends.ray_pool.BackendSpec`) on a chunk of events; their step records
stream back to the driver, which appends them to one run directory (the layout ``mfllm simulate`` writes:
export / evaluate / resume work on it). Every request carries its own seed and ``hf`` samples
batch-invariantly, so each event's records equal a single-process run's. (:class:`RayBackend`, replicas of a
backend behind the Backend interface, is the other way to scale out; it lives with the backends.)

Usage::

    from mfllm.backends.ray_pool import BackendSpec
    from mfllm.simulation.ray_runner import run_events_parallel
    run_events_parallel(events, "runs/par", BackendSpec("vllm", {"model": "Qwen/Qwen2.5-7B-Instruct"}),
                        replicas=8, num_gpus=1)
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mfllm.backends.ray_pool import (
    BackendSpec,
    Worker,
    as_spec,
    default_replicas,
    ensure_ray,
    portable_error,
    restore_error,
    unwrap_error,
)
from mfllm.errors import ConfigError, MfllmError
from mfllm.simulation.engine import RunSummary, SimConfig, Simulator, fold_records
from mfllm.simulation.runner import public_options
from mfllm.store.run import RunStore


class SimWorker(Worker):
    """What each Ray actor runs here: one backend and a Simulator over it."""

    def simulate(self, events, config: dict, resume: dict, interventions):
        """A Simulator over this actor's backend: yields each step record as soon as its round finishes
        (a bounded queue: memory stays flat), then one ``{"__summary__": ...}`` item."""
        if self.error is not None:
            yield self.error
            return
        q: queue.Queue = queue.Queue(maxsize=64)
        done = object()
        box: dict = {}

        def work():
            try:
                sim = Simulator(self.backend, SimConfig(**config), interventions=interventions)
                box["summary"] = sim.run(events, q.put, resume=resume).to_dict()
            except MfllmError as e:
                box["error"] = portable_error(e)
            except BaseException as e:  # noqa: BLE001 - re-raised in the generator
                box["error"] = e
            finally:
                q.put(done)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        while (item := q.get()) is not done:
            yield item
        t.join()
        if isinstance(box.get("error"), dict):
            yield box["error"]
            return
        if "error" in box:
            raise box["error"]
        yield {"__summary__": box["summary"]}


def run_events_parallel(events: Iterable, out: str | os.PathLike, backend_spec: Any, config=None, *,
                        replicas: int | None = None, num_cpus: float = 1, num_gpus: float = 0,
                        address: str | None = None, resume: bool = False, data: str | None = None,
                        interventions: list | None = None, chunk: int | None = None,
                        on_record: Callable[[dict], None] | None = None):
    """Simulate `events` on `replicas` Ray actors (each with its own backend and Simulator) into ONE run
    directory `out` (config.json, steps.jsonl, done.json: the layout ``mfllm simulate`` writes).

    Events go out in chunks of ``chunk`` (default ``config.events_in_flight``) to whichever actor is free;
    each actor batches its chunk's events per round as the single-process engine does. Records stream
    back as each round finishes and are appended (sha-stamped, fsynced) by the driver, so nothing needs a
    shared file system. Records of different events interleave in another order than a single-process
    run, but each event's records are the same (per-agent seeds). ``resume=True`` continues an interrupted
    run in `out` (with this function, or single-process with ``mfllm simulate --resume`` when `data` was
    given). Returns the merged RunSummary.
    """
    config = config or SimConfig()
    events = list(events)
    if not events:
        raise ConfigError("no events to simulate")
    spec = as_spec(backend_spec)
    store = RunStore(out)
    records: dict = {}
    if resume:
        cfg = store.config()
        if store.is_done():
            raise ConfigError(f"{out} is already complete; nothing to resume")
        config = SimConfig(**cfg["sim"])
        records = fold_records(store.recover_iter(), config.teacher_forcing)  # bounded per event
    else:
        inner_name = spec.name if isinstance(spec, BackendSpec) else None
        opts = dict(spec.options) if isinstance(spec, BackendSpec) else {}
        store.create({
            "data": str(Path(data).resolve()) if data else None,
            "events": [e.event_id for e in events],
            "sim": config.model_dump(),
            "backend": {"backend": "ray", "inner": inner_name, "replicas": replicas},
            "backend_name": inner_name,
            "backend_options": {k: v for k, v in public_options(opts).items() if k != "model"},
            "model": opts.get("model") or opts.get("model_path"),
            "interventions": None,
            "parallel": {"replicas": replicas, "chunk": chunk or config.events_in_flight},
        })
    ray = ensure_ray(address)
    n_actors = int(replicas) if replicas else default_replicas(ray, num_gpus, num_cpus)
    worker = ray.remote(SimWorker)
    actors = [worker.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(spec) for _ in range(n_actors)]
    size = max(1, int(chunk or config.events_in_flight))
    chunks = [events[i:i + size] for i in range(0, len(events), size)]
    todo: queue.Queue = queue.Queue()
    for c in chunks:
        todo.put(c)
    results: queue.Queue = queue.Queue(maxsize=256)
    cfg_dict = config.model_dump()
    stop = threading.Event()

    def drive(actor) -> None:
        try:
            while not stop.is_set():
                try:
                    c = todo.get_nowait()
                except queue.Empty:
                    return
                res = {e.event_id: records[e.event_id] for e in c if e.event_id in records}
                gen = actor.simulate.remote(c, cfg_dict, res, interventions)
                for ref in gen:
                    results.put(("item", ray.get(ref)))
                    if stop.is_set():
                        return
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            results.put(("error", e))
        finally:
            results.put(("done", None))

    t0 = time.time()
    summary = RunSummary()
    threads = [threading.Thread(target=drive, args=(a,), daemon=True) for a in actors]
    for t in threads:
        t.start()
    running, error = len(threads), None
    try:
        while running:
            kind, item = results.get()
            if kind == "done":
                running -= 1
            elif kind == "error":
                error = error or item
                stop.set()
            elif "__error__" in item:
                error = error or restore_error(item)
                stop.set()
            elif "__summary__" in item:
                s = item["__summary__"]
                for k in ("events", "steps", "agents_simulated", "prompt_tokens", "generated_tokens",
                          "empty_outputs"):
                    setattr(summary, k, getattr(summary, k) + s[k])
                summary.per_event.update(s["per_event"])
            else:
                store.append(item)
                if on_record is not None:
                    on_record(item)
    finally:
        stop.set()
        store.close()
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
    if error is not None:
        raise unwrap_error(error)
    summary.seconds = round(time.time() - t0, 3)
    d = summary.to_dict()
    d["parallel"] = {"replicas": n_actors, "chunks": len(chunks)}
    store.finish(d)
    return summary
