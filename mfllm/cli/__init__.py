"""The one command line (`mfllm --help`): one module per part of the pipeline, mounted in main.py."""

from mfllm.cli.main import app, main

__all__ = ["app", "main"]
