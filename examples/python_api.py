"""mfllm from Python: simulate one sample event, score it, and read its actions as a table.

    python examples/python_api.py [OUT_DIR]      # about 10 s on a laptop CPU (the shipped mfllm-mini)

Run by tests/test_api.py, so it works as long as the tests pass.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mfllm


def main(out_dir: Path) -> None:
    # 1. the shipped sample events and model; the options are those of `mfllm simulate`
    run = mfllm.simulate(out_dir / "demo", limit=1, step_size=8, warmup=16, max_agents=16, seed=0, force=True)
    print(f"run: {run}  ({run.summary['agents_simulated']} agents simulated)")

    # 2. score it against the real crowd (metrics.json as a dict; no plots or report here)
    metrics = mfllm.evaluate(run, plots=False, report=False, label_cache=out_dir / "labels.sqlite")
    mf = metrics["summary"][run.config["sim"]["method"]]
    print("JS divergence, simulated vs real (lower is better):",
          {h: round(v["js"]["mean"], 3) for h, v in mf.items() if v["js"]["mean"] is not None})

    # 3. every action with its 9 labels, as a pandas DataFrame
    df = mfllm.load_run(run, label_cache=out_dir / "labels.sqlite")
    rollout = df[df.phase == "rollout"]
    print(f"{len(df)} actions ({len(rollout)} simulated); stance of the real and the simulated crowd:")
    table = (rollout[["real_stance", "sim_stance"]].apply(lambda c: c.value_counts(normalize=True))
             .fillna(0).round(2))
    print(table.to_string())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
