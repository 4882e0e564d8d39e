"""The one error handler of the command line: a user mistake is one red line on stderr and a non-zero exit.

Use ``raise fail(e) from None`` inside a command, or wrap a whole command body in ``with user_errors():``.
Exit codes come from the error (``MfllmError.exit_code``: 2 for a user mistake, others as documented).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

from mfllm.errors import MfllmError

err = Console(stderr=True)


def fail(e: MfllmError) -> typer.Exit:
    """Print ``error: <message>`` (no traceback) and return the ``typer.Exit`` to raise."""
    err.print(Text.assemble(("error:", "bold red"), f" {e}"), highlight=False, soft_wrap=True)
    return typer.Exit(code=getattr(e, "exit_code", 2))


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn any MfllmError raised inside into one clear line and its exit code."""
    try:
        yield
    except MfllmError as e:
        raise fail(e) from None
