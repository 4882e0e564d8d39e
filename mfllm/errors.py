"""User-facing errors. The CLI prints these as one clear line (no traceback) and exits non-zero."""

from __future__ import annotations


class MfllmError(Exception):
    """Base class for mistakes a user can fix (bad input, bad config, unreachable endpoint)."""

    exit_code = 2


class DataError(MfllmError):
    """Bad input data. Always names the file and, where known, the field."""

    def __init__(self, path: str, message: str, field: str | None = None):
        self.path = str(path)
        self.field = field
        self.message = message
        where = f"{self.path}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class ConfigError(MfllmError):
    """Bad config / spec file or option."""

    def __init__(self, message: str, path: str | None = None, field: str | None = None):
        self.path, self.field = path, field
        where = ""
        if path:
            where += f"{path}: "
        if field:
            where += f"field '{field}': "
        super().__init__(where + message)


class BackendError(MfllmError):
    """An LLM call failed after its retry budget. Never becomes an agent's action."""

    exit_code = 3

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(f"LLM backend error ({kind}): {message}")


def from_validation(e: Exception, path: str | None = None, prefix: str = "") -> ConfigError:
    """One clear ConfigError for a pydantic ValidationError (its first problem), naming the field.

    A wrong name for a ``Literal`` field reads ``unknown value 'x'; choose one of a, b``; ``prefix`` puts
    the model's place in a file before the field (e.g. ``sim.``)."""
    errors = e.errors() if callable(getattr(e, "errors", None)) else []
    if not errors:
        return ConfigError(str(e), path=path)
    first = errors[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    got = first.get("input")
    if first.get("type") == "literal_error":
        expected = str((first.get("ctx") or {}).get("expected", "")).replace("'", "").replace(" or ", ", ")
        message = f"unknown value {got!r}; choose one of {expected}"
    else:
        message = f"{first.get('msg', 'invalid')} (got {got!r})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return ConfigError(message, path=path, field=prefix + loc if loc else (prefix.rstrip(".") or None))
