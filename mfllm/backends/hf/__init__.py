"""The local Hugging Face backend, one idea per module:

- :mod:`.sampling`: the seeded, batch-invariant sampler (request_key, uniforms, sample_next);
- :mod:`.attention`: shared-prefix attention (a prefix's keys/values read once per batch);
- :mod:`.kv_cache`: KV caches (a growable layer over a preallocated buffer);
- :mod:`.loading`: the one model + tokenizer loader (device/dtype, safetensors only, LoRA adapters);
- :mod:`.decoding`: the one decoding loop (shared prefix, per-request seeds);
- :mod:`.backend`: :class:`HFBackend`, the Backend interface over them (generate, score).
"""

from mfllm.backends.hf.backend import HFBackend
from mfllm.backends.hf.sampling import (
    SAMPLER_VERSION,
    longest_common_prefix,
    request_key,
    sample_next,
    uniforms,
)

__all__ = ["SAMPLER_VERSION", "HFBackend", "longest_common_prefix", "request_key", "sample_next", "uniforms"]
