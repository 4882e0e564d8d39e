"""IB-Tune's model: one base causal LM with role adapters ("meanfield", "policy"), one of them trainable.

Loaded with the HF backend's loader (safetensors only), so a tuned role is exactly what ``HFBackend`` and
vLLM's ``LoRARequest`` load later (peft format: ``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from mfllm.backends.hf.attention import use_prefix_attention
from mfllm.backends.hf.loading import LM, load_adapters, load_lm, load_weights
from mfllm.errors import ConfigError
from mfllm.files import move_files


class Roles:
    """One base causal LM with role adapters: one trainable role, any number of frozen ones.

    ``with roles.active(role) as model`` gives the model acting as that role; ``None`` is the frozen base
    (LoRA disabled). With ``full=True`` the trainable role is a full copy of the base instead.
    """

    def __init__(self, base: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None):
        self.lm, _ = load_lm(base, device, dtype, threads, field="base")  # the HF backend's loader
        model = self.lm.model
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_path = str(base)
        self.device = self.lm.device
        self.dtype = self.lm.dtype
        self.tokenizer = self.lm.tokenizer
        self.base = model
        # sampling runs the K samples' shared prompt once and attends to it directly (as the HF backend does)
        self.prefix_attention = use_prefix_attention(model)
        self.peft = None
        self.full: dict[str, torch.nn.Module] = {}
        self._handles: dict[int, LM] = {}
        self.trainable_role: str | None = None
        self.trainable: list[tuple[str, torch.nn.Parameter]] = []
        self.pad_id = self.lm.pad_token_id
        self.eos_ids = sorted(self.lm.eos_token_ids)
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else (self.eos_ids or [0])[0]
        vocab = model.get_output_embeddings().weight.shape[0]
        texts = tok.batch_decode([[i] for i in range(min(vocab, len(tok)))])
        nl = torch.zeros(vocab, dtype=torch.bool)
        nl[: len(texts)] = torch.tensor(["\n" in t for t in texts])
        self.newline_mask = nl.to(self.device)  # tokens that end m at inference (stop="\n")
        self.max_context = self.lm.max_context  # 0: unknown

    def lm_of(self, model) -> LM:
        """The decoding handle of a role's model: the base module for LoRA roles (their layers sit in it),
        else the full copy itself."""
        if not any(model is m for m in self.full.values()):
            return self.lm
        if id(model) not in self._handles:
            self._handles[id(model)] = self.lm.with_model(model)
        return self._handles[id(model)]

    def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Prompt ids as the HF backend encodes them (special tokens as the tokenizer adds them)."""
        return self.lm.encode_prompts(list(texts))

    def add_trainable(self, role: str, *, full: bool = False, rank: int = 16, alpha: int = 32,
                      dropout: float = 0.0, target_modules: str | list[str] = "all-linear", seed: int = 0) -> None:
        """Add the role being trained. Call before `load_frozen` (a full copy must be of the plain base)."""
        if self.trainable_role is not None:
            raise ConfigError("only one role is trained at a time")
        torch.manual_seed(seed)
        if full:
            if self.peft is not None:
                raise ConfigError("add the full-fine-tuning role before loading frozen adapters")
            m = copy.deepcopy(self.base)
            for p in m.parameters():
                p.requires_grad_(True)
            self.full[role] = m
            self.trainable = list(m.named_parameters())
        else:
            from peft import LoraConfig, get_peft_model

            tm = target_modules
            if isinstance(tm, str) and tm != "all-linear":
                tm = [t.strip() for t in tm.split(",") if t.strip()]
            cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=tm,
                             task_type="CAUSAL_LM")
            if self.peft is None:
                self.peft = get_peft_model(self.base, cfg, adapter_name=role)
            else:
                self.peft.add_adapter(role, cfg)
            self.trainable = [(n, p) for n, p in self.peft.named_parameters()
                              if "lora_" in n and f".{role}." in n]
            if not self.trainable:
                raise ConfigError(f"LoRA found no target modules {target_modules!r} in {self.base_path}",
                                  field="target_modules")
        self.trainable_role = role
        self._fix_grads()

    def load_frozen(self, role: str, path: str | os.PathLike) -> None:
        """A role from a saved adapter dir (peft) or a full model dir, frozen."""
        p = Path(path)
        if (p / "adapter_config.json").is_file():
            self.peft = load_adapters(self.base, {role: p}, self.device, peft_model=self.peft,
                                      field=f"{role}_adapter")
        elif (p / "config.json").is_file():
            m = load_weights(p, self.dtype, self.device, field=f"{role}_adapter")
            for q in m.parameters():
                q.requires_grad_(False)
            self.full[role] = m
        else:
            raise ConfigError(f"{role}: not an adapter or model directory: {p}", field=f"{role}_adapter")
        self._fix_grads()

    def _fix_grads(self) -> None:
        """peft's set_adapter flips requires_grad; only the trainable role's tensors may need gradients."""
        ids = {id(p) for _, p in self.trainable}
        mods = [self.peft] if self.peft is not None else []
        mods += list(self.full.values())
        for m in mods:
            for q in m.parameters():
                q.requires_grad_(id(q) in ids)

    @contextmanager
    def active(self, role: str | None) -> Iterator[torch.nn.Module]:
        if role is not None and role in self.full:
            yield self.full[role]
        elif role is None:
            if self.peft is None:
                yield self.base
            else:
                with self.peft.disable_adapter():
                    yield self.peft
        else:
            if self.peft is None or role not in self.peft.peft_config:
                raise ConfigError(f"no adapter for role {role!r}")
            self.peft.set_adapter(role)
            self._fix_grads()
            yield self.peft

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable]

    def save_role(self, role: str, out: str | os.PathLike) -> Path:
        """Write the role: a peft adapter dir (LoRA) or a full HF model dir (full fine-tuning); atomic per file."""
        from safetensors.torch import save_file

        out = Path(out)
        tmp = out / ".tmp-save"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if role in self.full:
            self.full[role].save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        else:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(self.peft, adapter_name=role)
            save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
                      str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            cfg = copy.deepcopy(self.peft.peft_config[role])
            cfg.base_model_name_or_path = self.base_path
            cfg.inference_mode = True
            cfg.save_pretrained(str(tmp))
        move_files(tmp, out)  # each file atomically; the folder holds the stage's curves and info too
        return out


class TrainableView:
    """Just the trainable tensors, shaped so mini.save_checkpoint / load_checkpoint store them (safetensors)."""

    def __init__(self, roles: Roles):
        self.roles = roles

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().to("cpu").contiguous() for n, p in self.roles.trainable},
                  str(Path(path) / "trainable.safetensors"))

    def from_pretrained(self, path, **_kw) -> TrainableView:
        from safetensors.torch import load_file

        saved = load_file(str(Path(path) / "trainable.safetensors"))
        named = dict(self.roles.trainable)
        if set(saved) != set(named):
            raise ConfigError(f"checkpoint {path} does not match this model / adapter settings")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(saved[n].to(p.device, p.dtype))
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.roles.parameters()
