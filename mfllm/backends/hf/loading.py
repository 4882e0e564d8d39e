"""The one model + tokenizer loader: device/dtype resolution, safetensors weights only, LoRA adapters (peft).

:func:`load_lm` gives an :class:`LM`, the handle the decoding loop and the scorers use: the module, its
tokenizer and what they need to know about both (special tokens, context length, forward keywords).
Only safetensors weights are loaded (``use_safetensors=True``; an adapter without
``adapter_model.safetensors`` is refused, since peft would unpickle an ``adapter_model.bin``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from mfllm.backends.hf.kv_cache import cache_kwarg, new_cache
from mfllm.errors import ConfigError


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_dtype(dtype: Any, device: str):  # noqa: ARG001 - device kept for future per-device defaults
    import torch

    if dtype is None or dtype == "auto":
        # float32 everywhere: with bfloat16, a different batch shape changes logits by ~1e-2 and so changes
        # about 1 sampled text in 10 (measured); float32 keeps outputs batch invariant. bf16 is opt-in.
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if str(dtype) not in table:
        raise ConfigError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)", field="dtype")
    return table[str(dtype)]


def transformers_major() -> int:
    import transformers

    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:  # pragma: no cover
        return 5


def load_weights(path: str | os.PathLike, dtype, device: str, field: str = "model"):
    """``AutoModelForCausalLM`` from safetensors weights, on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype_kw = "dtype" if transformers_major() >= 5 else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, **{dtype_kw: dtype})
    except Exception as e:  # noqa: BLE001 - many loader errors; report one clear line
        raise ConfigError(
            f"cannot load model from {path} (safetensors weights are required): {e}", field=field
        ) from e
    model.to(device)
    model.eval()
    return model


def check_adapter_dir(role: str, path: str | os.PathLike, field: str = "adapters") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"adapter '{role}': not a directory: {p}", field=field)
    if not (p / "adapter_model.safetensors").is_file():  # peft would unpickle a .bin
        raise ConfigError(f"adapter '{role}': no adapter_model.safetensors in {p} "
                          "(safetensors weights are required; pickle files are never loaded)", field=field)
    return p


def load_adapters(model, adapters: dict[str, str | os.PathLike], device: str, *, peft_model=None,
                  is_trainable: bool = False, field: str = "adapters"):
    """LoRA adapters (role -> peft adapter dir) on ``model``, or added to ``peft_model`` if given; the
    PeftModel. The LoRA layers are injected into ``model`` in place."""
    from peft import PeftModel

    items = [(role, check_adapter_dir(role, p, field)) for role, p in adapters.items()]
    for role, p in items:
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(p), adapter_name=role, is_trainable=is_trainable)
        else:
            peft_model.load_adapter(str(p), adapter_name=role, is_trainable=is_trainable)
    peft_model.to(device)
    peft_model.eval()
    return peft_model


def set_threads(device: str, num_threads: int | None, model) -> int:
    """CPU threads: the given number, else OMP_NUM_THREADS, else one thread per ~20M parameters (at most the
    CPUs we may use). Small matmuls gain nothing from threads, and on a busy machine spinning OpenMP threads
    make them up to 100x slower. (torch's thread count is process-wide.)"""
    import torch

    if device != "cpu":
        return torch.get_num_threads()
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        try:
            avail = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            avail = os.cpu_count() or 1
        n_params = sum(p.numel() for p in model.parameters())
        num_threads = max(1, min(avail, n_params // 20_000_000))
    torch.set_num_threads(int(num_threads))
    return int(num_threads)


class LM:
    """A causal LM module with its tokenizer: special tokens, context length, and one forward call.

    ``model`` is the module that is called (for LoRA: the peft model's base model, whose layers carry the
    adapters in place).
    """

    def __init__(self, model, tokenizer, device: str, dtype=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype if dtype is not None else next(model.parameters()).dtype
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)  # 0: unknown
        self.vocab = int(getattr(text_cfg, "vocab_size", 0) or len(tokenizer))
        params = inspect.signature(model.forward).parameters
        self.cache_kw = cache_kwarg(model)
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        tok = tokenizer
        eos: set[int] = set()
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(int(e) for e in gen_eos)
        self.eos_token_ids: set[int] = eos
        self.pad_token_id = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None), 0)
        self.start_id = next((t for t in (tok.bos_token_id, tok.eos_token_id, self.pad_token_id) if t is not None),
                             0)

    def with_model(self, model) -> LM:
        """The same tokenizer over another module of the same architecture (e.g. a fully fine-tuned copy)."""
        return LM(model, self.tokenizer, self.device, self.dtype)

    def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(x) for x in ids]

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Prompt ids (special tokens as the tokenizer adds them); an empty prompt is the start token."""
        return [x if x else [self.start_id] for x in self.encode(texts, add_special_tokens=True)]

    def new_cache(self):
        return new_cache(self.model)

    def forward(self, input_ids, attention_mask, position_ids, cache=None, keep: int = 1):
        """Logits of the last ``keep`` columns (only those are computed where the model allows)."""
        kw: dict[str, Any] = {}
        if cache is not None:
            kw[self.cache_kw] = cache
            kw["use_cache"] = True
        else:
            kw["use_cache"] = False
        if self.keep_kw is not None:
            kw[self.keep_kw] = keep
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        logits = out.logits
        if self.keep_kw is None:
            logits = logits[:, -keep:]
        return logits


def load_lm(path: str | os.PathLike, device: str = "auto", dtype: Any = None, num_threads: int | None = None,
            field: str = "model") -> tuple[LM, int]:
    """Tokenizer and safetensors model from a model directory; (LM handle, CPU threads set)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"not a model directory (no config.json): {path}", field=field)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - many loader errors; report one clear line
        raise ConfigError(f"cannot load tokenizer from {path}: {e}", field=field) from e
    model = load_weights(path, dtype, device, field)
    threads = set_threads(device, num_threads, model)
    return LM(model, tokenizer, device, dtype), threads
