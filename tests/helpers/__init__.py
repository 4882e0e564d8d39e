"""Reusable test helpers (tiny real models built on the fly; no downloads)."""
