"""`mfllm serve`: a local model behind an OpenAI-compatible HTTP API (the server is mfllm.backends.server)."""

from __future__ import annotations

import typer

from mfllm.backends.server import serve
from mfllm.cli.errors import fail
from mfllm.errors import ConfigError, MfllmError
from mfllm.paths import DEFAULT_MODEL


def serve_command(
    model: str = typer.Option(
        None, "--model", help=f"model directory (safetensors). Default: the shipped {DEFAULT_MODEL.name}"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: loopback only)"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    batch_size: int = typer.Option(64, "--batch-size", help="max requests per forward batch"),
    adapter: list[str] = typer.Option([], "--adapter", help="LoRA adapter ROLE=PATH (repeatable)"),
    name: str = typer.Option("", "--name", help="model name to serve under (default: the directory name)"),
) -> None:
    """Serve a local model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    try:
        adapters = {}
        for item in adapter:
            role, sep, path = item.partition("=")
            if not sep or not role or not path:
                raise ConfigError(f"--adapter must be ROLE=PATH, not {item!r}", field="adapter")
            adapters[role] = path
        try:
            serve(
                model or str(DEFAULT_MODEL),
                host,
                port,
                device=device,
                dtype=None if dtype == "auto" else dtype,
                batch_size=batch_size,
                adapters=adapters or None,
                model_name=name or None,
            )
        except OSError as e:  # e.g. the port is taken
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror or e}", field="port") from None
    except MfllmError as e:  # one clear line, no traceback
        raise fail(e) from None
