"""Where the embedded defaults live (inside the package, so an installed mfllm finds them)."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "models" / "mfllm-mini"
SAMPLE_DATA = ASSETS / "ced-sample"
