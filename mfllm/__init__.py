"""mfllm: simulate population reactions to an event with mean-field LLM agents (MF-LLM).

    import mfllm
    run = mfllm.simulate("runs/demo", limit=1, max_agents=16)
    mfllm.evaluate(run, plots=False, report=False)
    df = mfllm.load_run(run)   # a pandas DataFrame: one row per action, with its 9 labels

The API (mfllm/api.py) loads on first use, so `import mfllm` stays light (no torch, no pandas).
"""

import importlib

__version__ = "0.1.0"

_API = ("simulate", "resume", "evaluate", "load_run", "Run", "SimConfig")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    # The package root only forwards to the API module, which sits above every layer (see test_architecture).
    if name in _API:
        value = getattr(importlib.import_module("mfllm.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mfllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
