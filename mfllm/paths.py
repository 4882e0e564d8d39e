"""Where the embedded defaults live (inside the package, so an installed mfllm finds them)."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
# The policy every simulation runs unless told otherwise: mfllm-decide reads the mean field (issue 14).
DEFAULT_MODEL = ASSETS / "models" / "mfllm-decide"
# The from-scratch base that training starts from (`train decide --init`, IB-Tune's --base, `train mini`'s product).
MINI_MODEL = ASSETS / "models" / "mfllm-mini"
SAMPLE_DATA = ASSETS / "ced-sample"
