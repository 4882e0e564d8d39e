"""Print the endpoint fault matrix of docs/reliability.md: every fault kind the tests inject, against
OpenAIBackend over real HTTP on 127.0.0.1 (tests/helpers/fake_openai.py), as a transient fault (twice,
then a good answer) and as a permanent one (until the retry budget is spent).

    .venv/bin/python scripts/fault_matrix.py            # a markdown table on stdout (~30 s)

Columns: recovered (the transient fault was retried and the call succeeded), attempts, reported as (the
BackendError kind after the budget), seconds (wall time of the permanent case: bounded, nothing hangs),
leaked (whether the injected error text reached a completion: must be "no").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from helpers.fake_openai import FakeOpenAI, ok_payload  # noqa: E402
from test_reliability_faults import FAULTS, MARK, _backend, _req  # noqa: E402

from mfllm.errors import BackendError  # noqa: E402


def transient(answer) -> tuple[bool, int, bool]:
    def script(n, body, headers):
        return answer if n < 2 else (200, ok_payload("fine"), {})

    with FakeOpenAI(script) as srv:
        try:
            out = _backend(srv.url).generate([_req()])
        except BackendError:
            return False, srv.count, False
        return out[0].text == "fine", srv.count, any(MARK in c.text for c in out)


def permanent(answer) -> tuple[str, int, float]:
    with FakeOpenAI(lambda n, b, h: answer) as srv:
        t0 = time.monotonic()
        try:
            _backend(srv.url, retries=1).generate([_req()])
            kind = "(no error!)"
        except BackendError as e:
            kind = e.kind
        return kind, srv.count, time.monotonic() - t0


def main() -> None:
    print("| fault | transient: recovered | attempts | permanent: reported as | attempts | seconds | leaked |")
    print("|---|---|---|---|---|---|---|")
    for name, (answer, expected) in FAULTS.items():
        ok, n1, leaked = transient(answer)
        kind, n2, secs = permanent(answer)
        flag = "" if kind == expected else f" (expected {expected})"
        print(f"| {name} | {'yes' if ok else 'NO'} | {n1} | {kind}{flag} | {n2} | {secs:.1f} | "
              f"{'YES' if leaked else 'no'} |")


if __name__ == "__main__":
    main()
