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
