"""Shared test options and fixtures.

``--runslow`` runs the tests marked ``slow`` (long kill / fuzz loops); by default they are skipped.

Fixtures for the reliability tests (tests/test_reliability_*.py, tests/test_security.py):

- ``cli``: run ``mfllm`` as a real subprocess (``cli.run(...)`` waits, ``cli.start(...)`` returns the Popen).
- ``mini_reference``: an uninterrupted run of the shipped default model with ``SIM_ARGS`` (made in-process,
  once per session): the result every interrupted-and-resumed run must equal.
- ``mini_server``: ``mfllm serve`` of the shipped default model in a subprocess (requires the API key ``SERVE_KEY``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("mfllm")
MFLLM = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-c", "from mfllm.cli import main; main()"]

# A small real run: 2 shipped events, 4 warm-up + 12 rollout agents each, 2 agents per step (16 records).
SIM_ARGS = ["--limit", "2", "--step-size", "2", "--warmup", "4", "--max-agents", "12", "--seed", "7"]
SERVE_KEY = "sk-serve-PLANTED-7f3a9c1e5b"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ subprocesses


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1",
               TERM="dumb", COLUMNS="200")
    env.update(extra)
    return env


class Cli:
    """`mfllm ...` as a subprocess of this test, in the repository root."""

    def start(self, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen([*MFLLM, *map(str, args)], cwd=REPO, env=env or cli_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)

    def run(self, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*MFLLM, *map(str, args)], cwd=REPO, env=env or cli_env(), text=True,
                              capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


def cli_inproc(*args) -> subprocess.CompletedProcess:
    """`mfllm ...` in this process (typer's runner: no interpreter start-up). An exception that escapes
    the command (what a user would see as a traceback) is reported in stderr as "Traceback"."""
    import traceback

    from typer.testing import CliRunner

    from mfllm.cli import app

    argv = [str(a) for a in args]
    r = CliRunner().invoke(app, argv)
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "\nTraceback (in-process):\n" + "".join(traceback.format_exception(r.exception))
        return subprocess.CompletedProcess(argv, 1, r.stdout, err)
    return subprocess.CompletedProcess(argv, r.exit_code, r.stdout, err)


def assert_clean_failure(res: subprocess.CompletedProcess, *words: str, code: int | None = None) -> str:
    """A user-facing failure: non-zero exit, no traceback, one `error:` line naming what is wrong."""
    assert res.returncode != 0, (res.stdout, res.stderr)
    if code is not None:
        assert res.returncode == code, res.stderr
    err = res.stderr
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ run comparison


def load_records(run_dir: Path) -> dict[tuple[str, int], dict]:
    """(event, step) -> record (without its wall time); fails on a lost, duplicated or corrupt line."""
    from mfllm.store.run import decode_line

    out: dict[tuple[str, int], dict] = {}
    raw = (Path(run_dir) / "steps.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    for line in raw.decode("utf-8").splitlines():
        rec = decode_line(line)
        assert rec is not None, f"corrupt line in {run_dir}: {line[:80]!r}"
        key = (rec["event_id"], rec["step"])
        assert key not in out, f"duplicated step {key} in {run_dir}"
        rec.pop("seconds", None)
        out[key] = rec
    return out


def assert_same_run(run_dir: Path, ref: dict[tuple[str, int], dict]) -> None:
    got = load_records(run_dir)
    assert sorted(got) == sorted(ref), "steps lost or added"
    for key in ref:
        assert got[key]["actions"] == ref[key]["actions"], key
        assert got[key]["meanfield"] == ref[key]["meanfield"], key
        assert got[key] == ref[key], key
    for (ev, step) in ref:  # steps of an event in order
        assert step == 0 or (ev, step - 1) in ref
    assert (Path(run_dir) / "done.json").is_file()


@pytest.fixture(scope="session")
def mini_reference(tmp_path_factory):
    """The uninterrupted run (library API, the CLI's code path: the default model's policy applies) every
    resumed run must equal."""
    import mfllm

    out = tmp_path_factory.mktemp("reference") / "run"
    mfllm.simulate(out, limit=2, step_size=2, warmup=4, max_agents=12, seed=7)
    ref = load_records(out)
    assert len(ref) == 16
    return ref


# ------------------------------------------------------------------------------------------ mfllm serve


@pytest.fixture(scope="session")
def mini_server(cli):
    """`mfllm serve --model DEFAULT_MODEL --port 0` (default host), requiring SERVE_KEY. Yields its URL."""
    from mfllm.paths import DEFAULT_MODEL

    p = cli.start("serve", "--model", DEFAULT_MODEL, "--port", "0", "--device", "cpu",
                  env=cli_env(MFLLM_SERVE_API_KEY=SERVE_KEY))
    url = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        line = p.stdout.readline()
        if not line:
            break
        m = re.search(r"on (http://\S+/v1)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        p.kill()
        pytest.fail(f"mfllm serve did not start: {p.stderr.read()[-2000:]}")
    try:
        yield url
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def grep_tree(root: Path, needles: list[str]) -> list[str]:
    """Files under `root` whose bytes contain one of the needles (as UTF-8 or JSON-escaped)."""
    hits = []
    forms = set()
    for n in needles:
        forms.add(n.encode())
        forms.add(json.dumps(n).strip('"').encode())
    for f in Path(root).rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {n!r}" for n in forms if n in data]
    return hits
