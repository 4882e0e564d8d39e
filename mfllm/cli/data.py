"""`mfllm data ...`: inspect and convert event data (a typer sub-app, mounted by mfllm.cli)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mfllm.cli.errors import fail, user_errors
from mfllm.data.jsonl import write_jsonl
from mfllm.data.load import FORMATS, ProgressFn, count_dropped, iter_events
from mfllm.data.schema import DroppedActions, Event
from mfllm.data.split import SPLIT_CHOICES, SPLITS
from mfllm.data.stats import EVENT_COLUMNS, compute_stats, event_row
from mfllm.errors import ConfigError, DataError
from mfllm.evaluation.domains import tag_domain
from mfllm.files import atomic_write_text

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
_STRICT_HELP = "Stop at the first bad file instead of skipping it."
_QUIET_HELP = "No progress bar (it is shown on stderr, only on a terminal)."
_OUTPUTS = ("table", "json", "csv")
_MAX_LISTED = 20  # files named in a warning; the rest are counted


def _console(stderr: bool = False) -> Console:
    con = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not con.is_terminal:  # piped / captured: do not squeeze tables into 80 columns
        con = Console(stderr=stderr, highlight=False, soft_wrap=True, width=max(con.width, 110))
    return con


def _check_split(split: str) -> None:
    if split not in SPLIT_CHOICES:
        raise ConfigError(
            f"unknown split {split!r}; choose one of {', '.join(SPLIT_CHOICES)}", field="--split"
        )


@contextmanager
def loading_progress(quiet: bool = False, label: str = "loading events") -> Iterator[ProgressFn | None]:
    """A rich progress bar on stderr fed by the loaders' `progress(done, total)` callback.

    None (no bar) with `quiet` or when stderr is not an interactive terminal (a log file gets no frames).
    Usage: ``with loading_progress(quiet) as progress: load_events(path, progress=progress)``.
    """
    con = Console(stderr=True)
    if quiet or not con.is_interactive:
        yield None
        return
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=con, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield progress


def _report_skipped(skipped: list[DataError]) -> None:
    if not skipped:
        return
    con = _console(stderr=True)
    con.print(Text(f"{len(skipped)} file(s) skipped:", style="bold yellow"))
    for e in skipped:
        con.print(Text(f"  {e}", style="yellow"))


def _report_dropped(dropped: list[DroppedActions]) -> None:
    """One warning line per file that lost faulty action rows (never one per row)."""
    if not dropped:
        return
    total = count_dropped(dropped)
    kinds = ", ".join(f"{k} {v:,}" for k, v in total.items())
    con = _console(stderr=True)
    con.print(Text(
        f"warning: {sum(total.values()):,} faulty action row(s) dropped in {len(dropped):,} file(s) ({kinds}); "
        "their events are kept:", style="yellow",
    ))
    for d in dropped[:_MAX_LISTED]:
        con.print(Text(f"  {d}", style="yellow"))
    if len(dropped) > _MAX_LISTED:
        con.print(Text(f"  ... and {len(dropped) - _MAX_LISTED:,} more (`mfllm data events` counts them per event)",
                       style="yellow"))


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _stream(path: Path, split: str, strict: bool, format: str | None, quiet: bool, skipped: list[DataError],
            dropped: list[DroppedActions], limit: int | None = None) -> Iterator[Event]:
    """Events from `path` with the progress bar; fills `skipped` (bad files) and `dropped` (one per file)."""
    with loading_progress(quiet) as progress:
        for ev in iter_events(path, split=split, limit=limit, strict=strict, skipped=skipped, format=format,
                              progress=progress):
            if ev.dropped is not None:
                dropped.append(ev.dropped)
            yield ev


@data_app.command("stats")
def stats_cmd(
    path: Path = typer.Argument(..., help=_PATH_HELP, show_default=False),
    split: str = typer.Option("all", "--split", "-s", help=_SPLIT_HELP),
    format: str = typer.Option(None, "--format", "--input-format", help=_FORMAT_HELP, show_default=False),
    strict: bool = typer.Option(False, "--strict", help=_STRICT_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
) -> None:
    """Count events, actions and agents per split, the share of plain reposts (empty text) and the time span.

    Bad files are listed and skipped; the exit code is then 1 (0 when every file loaded). A faulty action row (e.g. a repost dated days before its source post) is dropped, not its event: the 'dropped' column counts them, a warning names each file, and the exit code stays 0.

    Example: mfllm data stats /data/ced --split test
    """
    skipped: list[DataError] = []
    dropped: list[DroppedActions] = []
    with user_errors():
        _check_split(split)
        stats = compute_stats(_stream(path, split, strict, format, quiet, skipped, dropped))
    rows = list(SPLITS) + ["all"] if split == "all" else [split]
    table = Table(title=str(path), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("split", "events", "actions", "agents", "empty", "first", "last", "span (h)", "dropped"):
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
            _fmt_int(sum(st["dropped_actions"].values())),
        )
        if st["labels"]:
            labels.append(f"{s}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(st["labels"].items())))
    con = _console()
    con.print(table)
    if labels:
        con.print("labels  " + "; ".join(labels))
    kinds = stats[rows[-1]].to_dict()["dropped_actions"]
    if kinds:
        con.print("dropped  " + ", ".join(f"{k} {v:,}" for k, v in kinds.items()))
    con.print(
        "empty = share of actions with no text (plain reposts); dates are UTC; "
        "span = hours from the source post to the last action, median over events; "
        "dropped = faulty action rows left out (their events kept), by kind in docs/data.md"
    )
    _report_dropped(dropped)
    _report_skipped(skipped)
    if skipped:
        raise typer.Exit(code=1)


def _events_table(rows: list[dict], title: str, width: int) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    cells = [(r["event_id"], r["label"] or "-", r["split"], _fmt_int(r["actions"]), f"{r['span_hours']:,.1f}",
              r["domain"], _fmt_int(r["dropped"])) for r in rows]
    used = 0
    for i, col in enumerate(("event_id", "label", "split", "actions", "span (h)", "domain", "dropped")):
        w = max([len(col), *(len(c[i]) for c in cells)])  # never squeezed: only the source text is cut
        used += w + 3
        table.add_column(col, justify="right" if col in ("actions", "span (h)", "dropped") else "left",
                         no_wrap=True, min_width=w)
    with_text = width - used >= 16  # room for a useful glimpse of the source post
    if with_text:
        table.add_column("source post", no_wrap=True, overflow="ellipsis", max_width=min(40, width - used - 2))
    for r, c in zip(rows, cells, strict=True):
        table.add_row(*c, *([" ".join(r["source_text"].split())[:80]] if with_text else []))
    return table


def _events_text(rows: list[dict], output: str) -> str:
    if output == "json":
        return json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(_EVENT_FIELDS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# the domain comes from the evaluation layer's classifier (data is below it), so it is added here
_EVENT_FIELDS = (*EVENT_COLUMNS[:5], "domain", *EVENT_COLUMNS[5:])


def _output_format(output: str | None, out: Path | None) -> str:
    if output is None:
        suffix = out.suffix.lower().lstrip(".") if out is not None else ""
        output = suffix if suffix in ("json", "csv") else "table"
    if output not in _OUTPUTS:
        raise ConfigError(f"unknown output format {output!r}; choose one of {', '.join(_OUTPUTS)}", field="--format")
    if out is not None:
        if output == "table":
            raise ConfigError("--out writes json or csv: name the file .json / .csv or add --format", field="--out")
        if out.is_dir():
            raise ConfigError(f"{out} is a folder; give a file name", field="--out")
    return output


def _with_domain(ev: Event) -> dict:
    row = event_row(ev)
    domain = ev.domain or tag_domain(ev.source.text)
    return {k: (domain if k == "domain" else row[k]) for k in _EVENT_FIELDS}


@data_app.command("events")
def events_cmd(
    path: Path = typer.Argument(..., help=_PATH_HELP, show_default=False),
    split: str = typer.Option("all", "--split", "-s", help=_SPLIT_HELP),
    output: str = typer.Option(None, "--format", "-f", show_default=False,
                               help="Output: table | json | csv. Default: from the --out suffix, else table."),
    out: Path = typer.Option(None, "--out", "-o", help="Write to this file (atomically) instead of stdout.",
                             show_default=False),
    input_format: str = typer.Option(None, "--input-format", help=_FORMAT_HELP, show_default=False),
    strict: bool = typer.Option(False, "--strict", help=_STRICT_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
) -> None:
    """List the events: id, label, split, size (actions), span (first to last action, hours), domain, dropped action rows, source post.

    Use the ids with `mfllm simulate --events ID,ID`. The domain is the source post's tag from the keyword classifier (mfllm.evaluation.domains) unless the data gives one. Bad files are listed and skipped; the exit code is then 1.

    Example: mfllm data events /data/ced --split test --format csv --out test-events.csv
    """
    skipped: list[DataError] = []
    dropped: list[DroppedActions] = []
    with user_errors():
        _check_split(split)
        output = _output_format(output, out)
        rows = [_with_domain(ev) for ev in _stream(path, split, strict, input_format, quiet, skipped, dropped)]
    if output == "table":
        con = _console()
        con.print(_events_table(rows, f"{path}: {len(rows):,} events", con.width))
        con.print("span = hours from the first to the last action; dropped = faulty action rows left out")
    else:
        text = _events_text(rows, output)
        if out is None:
            typer.echo(text, nl=False)
        else:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(out, text)
            except OSError as e:
                raise fail(DataError(str(out), f"cannot write: {e.strerror or e}")) from None
            _console(stderr=True).print(f"wrote {len(rows):,} events to {out}")
    _report_dropped(dropped)
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
    format: str = typer.Option(None, "--format", "--input-format", help=_FORMAT_HELP, show_default=False),
    strict: bool = typer.Option(False, "--strict", help=_STRICT_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
) -> None:
    """Convert events to the generic JSONL format (one event per line, see docs/data.md).

    Derived features (repost depth, corpus activity, minutes after the source) are computed over the whole input and written into each profile, so the JSONL file reproduces the same agent states. Bad files are listed and skipped; the exit code is then 1. Faulty action rows are dropped (their events kept and written), with one warning per file.

    Example: mfllm data convert /data/ced --to test.jsonl --split test --limit 40
    """
    skipped: list[DataError] = []
    dropped: list[DroppedActions] = []
    counts = {"actions": 0}
    with user_errors():
        _check_split(split)
        if to.suffix.lower() != ".jsonl":
            raise ConfigError(f"the output must be a .jsonl file, got {to}", field="--to")
        if to.exists() and to.is_dir():
            raise ConfigError(f"{to} is a folder; give a .jsonl file name", field="--to")
        if to.exists() and path.exists() and to.resolve() == path.resolve():
            raise ConfigError("--to is the input file; write to another file", field="--to")

        def stream() -> Iterator[Event]:
            for ev in _stream(path, split, strict, format, quiet, skipped, dropped, limit=limit):
                counts["actions"] += len(ev.actions)
                yield ev

        try:
            n = write_jsonl(stream(), to)
        except OSError as e:
            raise fail(DataError(str(to), f"cannot write: {e.strerror or e}")) from None
    _console().print(f"wrote {n:,} events ({counts['actions']:,} actions) to {to}")
    _report_dropped(dropped)
    _report_skipped(skipped)
    if skipped:
        raise typer.Exit(code=1)


if __name__ == "__main__":  # python -m mfllm.cli.data ...
    data_app()
