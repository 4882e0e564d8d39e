"""mfllm: simulate population reactions to an event with mean-field LLM agents (MF-LLM)."""

__version__ = "0.1.0"
