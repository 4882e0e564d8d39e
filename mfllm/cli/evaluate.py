"""Typer command functions for `mfllm evaluate` and `mfllm compare` (mounted by mfllm/cli/main.py):

    app.command("evaluate")(evaluate_command)
    app.command("compare")(compare_command)
    app.command("marginal")(marginal_command)   # optional: writes the marginal baseline's JSON

User mistakes (MfllmError) are printed as one line on stderr and exit with the error's code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mfllm.backends.registry import make_backend
from mfllm.cli.errors import err as _err
from mfllm.cli.errors import fail
from mfllm.data.load import iter_events
from mfllm.errors import ConfigError, DataError, MfllmError
from mfllm.files import atomic_write_text


def _cache(path: Path | None, off: bool) -> str | Path | None:
    return "" if off else path


def _labeler_options(name: str, backend: str | None, model: str | None, base_url: str | None) -> dict:
    """Options for labelers.make_labeler: the llm labeler gets a backend built from the --labeler-* options."""
    if name != "llm":
        if backend or model or base_url:
            raise ConfigError("--labeler-backend/--labeler-model/--labeler-base-url are for --labeler llm")
        return {}
    if not backend:
        raise ConfigError("--labeler llm needs --labeler-backend (and --labeler-model)", field="labeler")
    opts: dict = {}
    if model:
        opts["model"] = model
    if base_url:
        opts["base_url"] = base_url
    return {"backend": make_backend(backend, **opts)}


def evaluate_command(
    run_dir: Annotated[
        list[Path],
        typer.Argument(help="Run directory written by `mfllm simulate` (has steps.jsonl); or a folder of replica "
                       "runs (r0/, r1/, ...), or several replica runs of one method: their crowds are pooled."),
    ],
    labeler: Annotated[
        str,
        typer.Option(
            help="Labeler for the 9 dimensions: rules (offline, default) | llm (needs --labeler-backend)."
        ),
    ] = "rules",
    bin_by: Annotated[
        str, typer.Option(help="How rollout actions are grouped into time bins: steps, actions or seconds.")
    ] = "steps",
    bin_size: Annotated[
        float,
        typer.Option(help="Steps, actions or seconds per bin (see --bin-by). Default: one bin per step."),
    ] = 1,
    keywords_top_n: Annotated[
        int, typer.Option(help="Keywords dimension: union of each bin's top-N real keywords (+ other).")
    ] = 10,
    marginal: Annotated[
        Path | None,
        typer.Option(
            help="Training-split label marginal JSON (compute_marginal). "
            "Default: the packaged mfllm/assets/marginal_<labeler>_v<version>.json if present."
        ),
    ] = None,
    label_cache: Annotated[
        Path | None,
        typer.Option(help="SQLite label cache shared across runs. Default: ~/.cache/mfllm/labels.sqlite."),
    ] = None,
    no_label_cache: Annotated[
        bool, typer.Option("--no-label-cache", help="Do not read or write a label cache.")
    ] = False,
    labeler_backend: Annotated[
        str | None, typer.Option(help="llm labeler: backend of the judge (hf | openai | vllm).")
    ] = None,
    labeler_model: Annotated[
        str | None, typer.Option(help="llm labeler: the judge model (path or name).")
    ] = None,
    labeler_base_url: Annotated[
        str | None, typer.Option(help="llm labeler with the openai backend: server URL.")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write RUN_DIR/plots/*.png.")] = True,
    report: Annotated[bool, typer.Option(help="Write RUN_DIR/report.html (implies the plots).")] = True,
    max_event_plots: Annotated[
        int, typer.Option(help="Plot (and show in the report) at most this many events; -1 = all.")
    ] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print metrics.json's summary as JSON, not a table.")
    ] = False,
) -> None:
    """Score a run: label real and simulated actions, compare their distributions per dimension and
    horizon (KL, JS, Wasserstein, TV, DTW, micro-F1) against the persistence and marginal baselines.
    Writes RUN_DIR/metrics.json, RUN_DIR/plots/ and RUN_DIR/report.html."""
    from mfllm.evaluation.evaluate import (  # scipy: loaded when run, not for --help
        evaluate_run,
        metrics_table,
    )

    try:
        m = evaluate_run(
            run_dir[0] if len(run_dir) == 1 else run_dir,
            labeler=labeler,
            bin_size=bin_size,
            bin_by=bin_by,
            cache=_cache(label_cache, no_label_cache),
            marginal=marginal,
            keywords_top_n=keywords_top_n,
            plots=plots,
            report=report,
            max_event_plots=None if max_event_plots < 0 else max_event_plots,
            labeler_options=_labeler_options(labeler, labeler_backend, labeler_model, labeler_base_url),
        )
    except MfllmError as e:
        raise fail(e) from None
    out = Console()
    if as_json:
        out.print_json(json.dumps({k: m[k] for k in ("method", "n_events", "summary", "warnings")}))
        return
    out.print(metrics_table(m))
    for w in m["warnings"]:
        _err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    written = ["metrics.json"] + (["plots/"] if plots or report else []) + (["report.html"] if report else [])
    out.print(f"wrote {', '.join(str(Path(m['run_dir']) / w) for w in written)}", highlight=False)


def compare_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories to put side by side (one per method), evaluated or not."),
    ],
    out: Annotated[Path | None, typer.Option(help="Also write the comparison as JSON to this file.")] = None,
    labeler: Annotated[
        str, typer.Option(help="Labeler (rules) for runs that have no metrics.json yet.")
    ] = "rules",
    label_cache: Annotated[
        Path | None, typer.Option(help="SQLite label cache (see `mfllm evaluate`).")
    ] = None,
    no_label_cache: Annotated[
        bool, typer.Option("--no-label-cache", help="Do not use a label cache.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the comparison as JSON, not tables.")
    ] = False,
) -> None:
    """Compare runs over their common events, with the LLM-free baselines, and the relative KL change
    of `mf` against the best non-MF method and the baselines. Runs without metrics.json are evaluated
    first (default settings; metrics.json only, no plots or report)."""
    from mfllm.evaluation.compare import (  # scipy: loaded when run, not for --help
        compare_runs,
        compare_tables,
    )

    try:
        res = compare_runs(
            run_dirs, labeler=labeler, cache=_cache(label_cache, no_label_cache), plots=False, report=False
        )
    except MfllmError as e:
        raise fail(e) from None
    text = json.dumps(res, ensure_ascii=False, indent=1)
    if out is not None:
        try:
            atomic_write_text(out, text)
        except OSError as e:
            raise fail(DataError(str(out), f"cannot write: {e.strerror or e}")) from None
    console = Console()
    if as_json:
        console.print_json(text)
        return
    for t in compare_tables(res):
        console.print(t)
    for w in res["warnings"]:
        _err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def marginal_command(
    data: Annotated[
        str, typer.Argument(help="Events (CED folder, Rumdect or JSONL) holding the training split.")
    ],
    split: Annotated[
        str, typer.Option(help="Which split's actions make the marginal: train | val | test | all.")
    ] = "train",
    labeler: Annotated[
        str, typer.Option(help="Labeler (the marginal is only valid for this labeler+version).")
    ] = "rules",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output JSON. Default: the packaged mfllm/assets/marginal_<labeler>_v<version>.json."
        ),
    ] = None,
    no_label_cache: Annotated[
        bool, typer.Option("--no-label-cache", help="Do not use a label cache.")
    ] = False,
) -> None:
    """Compute the training split's label distribution (the `marginal` baseline of every evaluation)."""
    # scipy: loaded when run, not for --help
    from mfllm.evaluation.distributions import compute_marginal, save_marginal
    from mfllm.evaluation.evaluate import resolve_labeler

    try:
        lab = resolve_labeler(labeler, _cache(None, no_label_cache))
        try:
            m = compute_marginal(iter_events(data, split=split), lab)
        finally:
            if hasattr(lab, "close"):
                lab.close()
        path = save_marginal(m, out)
    except MfllmError as e:
        raise fail(e) from None
    Console().print(
        f"wrote {path}: {m['n_labelled']} labelled actions from {m['n_events']} event(s) (split {split})",
        highlight=False,
    )
