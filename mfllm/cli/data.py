"""`mfllm data ...`: inspect and convert event data (a typer sub-app, mounted by mfllm.cli)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mfllm.data.load import FORMATS, iter_events
from mfllm.data.split import SPLIT_CHOICES, SPLITS
from mfllm.errors import ConfigError, DataError, MfllmError

data_app = typer.Typer(
    name="data",
    help=(
        "Inspect and convert event data. Formats are detected from the path: a CED root folder "
        "(holding original-microblog/), a Rumdect .json file or folder, or a .jsonl file or folder in "
        "the generic format described in docs/data.md."
    ),
    no_args_is_help=True,
    add_completion=False,
)

_PATH_HELP = "A CED root folder, a Rumdect .json file/folder, or a .jsonl file/folder."
_SPLIT_HELP = "Which events: train / val / test (a fixed 80/10/10 split by event id) or all."
_FORMAT_HELP = f"Skip auto-detection and read the path as this format ({' / '.join(FORMATS)})."


def _console(stderr: bool = False) -> Console:
    con = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not con.is_terminal:  # piped / captured: do not squeeze tables into 80 columns
        con = Console(stderr=stderr, highlight=False, soft_wrap=True, width=max(con.width, 110))
    return con


def _fail(e: MfllmError) -> typer.Exit:
    _console(stderr=True).print(Text(f"error: {e}", style="red"))
    return typer.Exit(code=e.exit_code)


def _check_split(split: str) -> None:
    if split not in SPLIT_CHOICES:
        raise ConfigError(
            f"unknown split {split!r}; choose one of {', '.join(SPLIT_CHOICES)}", field="--split"
        )


def _report_skipped(skipped: list[DataError]) -> None:
    if not skipped:
        return
    con = _console(stderr=True)
    con.print(Text(f"{len(skipped)} file(s) skipped:", style="bold yellow"))
    for e in skipped:
        con.print(Text(f"  {e}", style="yellow"))


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@data_app.command("stats")
def stats_cmd(
    path: Path = typer.Argument(..., help=_PATH_HELP, show_default=False),
    split: str = typer.Option("all", "--split", "-s", help=_SPLIT_HELP),
    format: str = typer.Option(None, "--format", help=_FORMAT_HELP, show_default=False),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad file instead of skipping it."),
) -> None:
    """Count events, actions and agents per split, the share of plain reposts (empty text) and the time span.

    Bad files are listed and skipped; the exit code is then 1 (0 when every file loaded).

    Example: mfllm data stats /data/ced --split test
    """
    from mfllm.data.stats import compute_stats

    try:
        _check_split(split)
        skipped: list[DataError] = []
        stats = compute_stats(iter_events(path, split=split, strict=strict, skipped=skipped, format=format))
    except MfllmError as e:
        raise _fail(e) from None
    rows = list(SPLITS) + ["all"] if split == "all" else [split]
    table = Table(title=str(path), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("split", "events", "actions", "agents", "empty", "first", "last", "span (h)"):
        table.add_column(col, justify="left" if col in ("split", "first", "last") else "right", no_wrap=True)
    labels = []
    for s in rows:
        st = stats[s].to_dict()
        span = "-" if st["median_span_hours"] is None else f"{st['median_span_hours']:,.0f}"
        table.add_row(
            s,
            _fmt_int(st["events"]),
            _fmt_int(st["actions"]),
            _fmt_int(st["agents"]),
            f"{100 * st['empty_text_share']:.1f}%",
            st["first"] or "-",
            st["last"] or "-",
            span,
        )
        if st["labels"]:
            labels.append(f"{s}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(st["labels"].items())))
    con = _console()
    con.print(table)
    if labels:
        con.print("labels  " + "; ".join(labels))
    con.print(
        "empty = share of actions with no text (plain reposts); dates are UTC; "
        "span = hours from the source post to the last action, median over events"
    )
    _report_skipped(skipped)
    if skipped:
        raise typer.Exit(code=1)


@data_app.command("convert")
def convert_cmd(
    path: Path = typer.Argument(..., help=_PATH_HELP, show_default=False),
    to: Path = typer.Option(..., "--to", help="Output .jsonl file (written atomically).", show_default=False),
    split: str = typer.Option("all", "--split", "-s", help=_SPLIT_HELP),
    limit: int = typer.Option(
        None,
        "--limit",
        "-n",
        min=0,
        help="At most N events (sorted by event id, after the split filter).",
        show_default=False,
    ),
    format: str = typer.Option(None, "--format", help=_FORMAT_HELP, show_default=False),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad file instead of skipping it."),
) -> None:
    """Convert events to the generic JSONL format (one event per line, see docs/data.md).

    Derived features (repost depth, corpus activity, minutes after the source) are computed over the whole input and written into each profile, so the JSONL file reproduces the same agent states. Bad files are listed and skipped; the exit code is then 1.

    Example: mfllm data convert /data/ced --to test.jsonl --split test --limit 40
    """
    from mfllm.data.jsonl import write_jsonl

    try:
        _check_split(split)
        if to.suffix.lower() != ".jsonl":
            raise ConfigError(f"the output must be a .jsonl file, got {to}", field="--to")
        if to.exists() and to.is_dir():
            raise ConfigError(f"{to} is a folder; give a .jsonl file name", field="--to")
        if to.exists() and path.exists() and to.resolve() == path.resolve():
            raise ConfigError("--to is the input file; write to another file", field="--to")
        skipped: list[DataError] = []
        counts = {"actions": 0}

        def stream():
            for ev in iter_events(
                path, split=split, limit=limit, strict=strict, skipped=skipped, format=format
            ):
                counts["actions"] += len(ev.actions)
                yield ev

        n = write_jsonl(stream(), to)
    except MfllmError as e:
        raise _fail(e) from None
    except OSError as e:
        raise _fail(DataError(str(to), f"cannot write: {e.strerror or e}")) from None
    _console().print(f"wrote {n:,} events ({counts['actions']:,} actions) to {to}")
    _report_skipped(skipped)
    if skipped:
        raise typer.Exit(code=1)


if __name__ == "__main__":  # python -m mfllm.cli.data ...
    data_app()
