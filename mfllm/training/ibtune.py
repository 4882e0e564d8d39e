"""IB-Tune: fine-tune the mean-field model (stage 1) and the policy (stage 2) with LoRA adapters.

Both roles are adapters on ONE base causal LM ("meanfield", "policy"), saved in the peft format
(``adapter_config.json`` + ``adapter_model.safetensors``) so ``HFBackend(model, adapters={...})`` and
vLLM's ``LoRARequest`` load them. Every prompt is rendered with the inference templates
(``meanfield_prompt``, ``policy_prefix`` + ``policy_suffix``, the methods' context code), so a tuned
model is asked exactly what it was trained on.

Stage 1, the mean-field model q_theta(m | X)
--------------------------------------------
A *unit* is one step t of a training event: X = (event, m_{t-1}, the real (state, action) pairs of
step t), rendered by ``meanfield_prompt``; Y = a sample of the real (state_i, y_i) of step t+1.
m_{t-1} is, by default, the untuned summariser's own summary chained over the real history
(``previous="chain"``, exactly what warm-up feeds it at inference), or the ``stats`` summary.

The objective (maximised) for one history X is

    J(theta) = E_{m ~ q_theta(.|X)} [ R(m) - beta * (log q_theta(m|X) - log p0(m)) - lam * |m| ]
    R(m)     = (1/|Y|) sum_i log pi(y_i + eos | policy_prefix(event, mf-context(m)) + policy_suffix(state_i))

where pi is the frozen policy (the base model, or a given policy adapter), p0(m) is the frozen base
model given the instruction alone (``meanfield_prompt(event, <empty marker>, [])``: the history is
removed, the event kept), log q and log p0 are summed over the sampled tokens of m (stop token
included), and |m| is the number of tokens. The term log q - log p0 is a one-sample estimate of
KL(q_theta(.|X) || p0).

The estimator. For each X we draw K >= 2 summaries m_1..m_K from q_theta at temperature 1, no top-p
(so log q is the exact sampling probability), and let

    A_k = R(m_k) - beta * (log q(m_k|X) - log p0(m_k)) - lam * |m_k|          (no gradient)
    b_k = (1/(K-1)) sum_{j != k} A_j                                           (leave-one-out baseline)

    grad J  ~=  (1/K) sum_k (A_k - b_k) * grad log q(m_k|X)   -   beta * (1/K) sum_k grad log q(m_k|X)

The first sum is the score-function (REINFORCE) part of the whole objective (prediction, KL and length
terms, all as stop-gradient rewards); the second is the pathwise part of the KL term: d/dtheta of
-beta*log q at fixed m. Its expectation is 0 (E_q[grad log q] = 0), so it adds no bias and can be
switched off (``pathwise_kl=False``). Both parts together are unbiased for grad J; the leave-one-out
baseline keeps it unbiased because b_k does not depend on m_k. In code we minimise the surrogate

    L(theta) = (1/(B*K)) sum_{x,k} [ -(A_k - b_k) + beta * pathwise ] * log q_theta(m_k|X)

with A and b detached, averaged over a batch of B histories. The policy's parameters are never in
the graph (it scores under ``torch.no_grad`` with its own adapter or none), but R depends on m and m
on theta, so the gradient reaches the mean-field adapter through the score function. (The paper's
released code scored the prediction term with a frozen model, so no gradient from it reached the
mean-field model.)

Stage 2, the policy pi_phi
--------------------------
Supervised fine-tuning on (event, state, m_t) -> real action (``action_to_target`` + eos), where m_t
is written by the (tuned) mean-field adapter from the real history (chained exactly as in warm-up,
sampled with the inference settings: temperature 0.7, top-p 0.95, ``mf_max_new_tokens``, stop at a
newline).
``context="state"`` is the paper's "SFT" row: the same SFT with the ``state`` method's context (no
mean field).

Context: as the HF backend refuses a prompt + max_new_tokens beyond the model's context, a history
whose mean-field prompt + ``mf_max_new_tokens`` does not fit is left out, a policy example longer than
the context is dropped, and no sampled m runs past the context.

Cost: the K summaries of a history share its prompt, and the |Y| scored actions of one (history, m)
share the policy prompt up to the agent's state; each shared token prefix is run once (in sampling,
scoring and the gradient pass).

Resumable: each stage keeps an atomic checkpoint (trainable tensors and optimizer state in
safetensors, progress in JSON; ``mini.save_checkpoint``) and its data in ``OUT/_work``; rerun the same
command after an interruption. Seeds are derived per step and per sample, so a resumed run draws the
same samples as an uninterrupted one.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mfllm.backends.base import SamplingParams
from mfllm.backends.hf.attention import use_prefix_attention
from mfllm.backends.hf.decoding import DecodeOptions, decode
from mfllm.backends.hf.loading import LM, load_adapters, load_lm, load_weights
from mfllm.backends.hf.sampling import longest_common_prefix
from mfllm.data.schema import Event
from mfllm.data.state import agent_state_text
from mfllm.errors import ConfigError
from mfllm.paths import DEFAULT_MODEL
from mfllm.prompts.templates import action_to_target, meanfield_prompt, policy_prefix, policy_suffix, strings
from mfllm.seeds import derive_seed
from mfllm.simulation.history import History
from mfllm.simulation.meanfield import MeanFieldUpdate, StatsMeanField
from mfllm.simulation.methods import make_method
from mfllm.simulation.steps import plan_steps

ROLES = ("meanfield", "policy")
# the LLMMeanField defaults: how m_t is written at inference (chains for `previous` and stage 2)
INFER_TEMPERATURE, INFER_TOP_P = 0.7, 0.95


@dataclass
class TuneConfig:
    """One stage's settings. Library defaults (step size 16 and 160-token summaries, as the simulation's
    defaults); the CLI's defaults are the mfllm-mini CPU recipe (docs/ibtune.md, "Settings")."""

    out: str
    base: str = str(DEFAULT_MODEL)
    data: str | None = None
    seed: int = 0
    lang: str = "zh"
    # adapters
    full: bool = False  # full fine-tuning instead of LoRA (saves a whole model dir)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # attention + MLP projections (never the lm_head)
    # optimisation
    steps: int = 60
    batch_size: int = 4  # stage 1: histories per step (x samples_k); stage 2: examples per step
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 16  # rows per forward pass (memory); does not change the result
    # stage 1
    samples_k: int = 4
    beta: float = 0.05
    length_penalty: float = 0.0  # lam, per token of m
    pathwise_kl: bool = True
    mf_max_new_tokens: int = 160
    targets_per_unit: int = 8  # |Y|: next-step actions scored per history
    units_per_event: int = 2
    previous: str = "chain"  # chain | stats: what m_{t-1} in the mean-field prompt is
    policy_adapter: str | None = None  # stage 1: a frozen policy adapter scores R (default: the base model)
    # stage 2
    context: str = "mf"  # mf (m_t from the mean-field adapter) | state (the "SFT without mean field" baseline)
    meanfield_adapter: str | None = None  # stage 2: the adapter that writes m_t (None: the untuned base)
    agents_per_step: int = 4
    # data
    step_size: int = 16
    max_steps: int = 8  # only an event's first steps are used (the warm-up and early rollout)
    max_events: int | None = None
    split: str = "train"
    val_split: str = "val"
    val_events: int = 16
    val_units: int = 16
    # runtime
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    eval_every: int = 20
    ckpt_every: int = 10
    interrupt_after: int | None = None  # stop after this many steps in this call (leaves a checkpoint)

    def check(self, stage: str) -> None:
        if stage == "meanfield" and self.samples_k < 2:
            raise ConfigError("--samples-k must be >= 2 (the leave-one-out baseline needs two samples)",
                              field="samples_k")
        if self.previous not in ("chain", "stats"):
            raise ConfigError("previous must be chain or stats", field="previous")
        if self.context not in ("mf", "state"):
            raise ConfigError("context must be mf or state", field="context")
        for name in ("steps", "batch_size", "lora_rank", "micro_batch", "step_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1", field=name)
        if self.beta < 0 or self.length_penalty < 0:
            raise ConfigError("beta and the length penalty must be >= 0", field="beta")


# ----------------------------------------------------------------------------- the model and its roles


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
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        return out


class _TrainableView:
    """Just the trainable tensors, shaped so mini.save_checkpoint / load_checkpoint store them (safetensors)."""

    def __init__(self, roles: Roles):
        self.roles = roles

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().to("cpu").contiguous() for n, p in self.roles.trainable},
                  str(Path(path) / "trainable.safetensors"))

    def from_pretrained(self, path, **_kw) -> _TrainableView:
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


# ----------------------------------------------------------------------------- tokens: sample and score


def encode_targets(tok, texts: Sequence[str], eos_id: int) -> list[list[int]]:
    """The policy's targets: the text (no special tokens) + eos, as mini trained and inference stops."""
    if not texts:
        return []
    return [list(x) + [eos_id] for x in tok(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass(slots=True)
class Sample:
    ids: list[int]  # the sampled tokens, stop token included
    text: str  # m as the policy sees it: the first line, whitespace-normalised (as LLMMeanField does)
    logprob: float  # log q(ids | prompt) at temperature 1 (exact when sampled at temperature 1, top-p 1)


@torch.no_grad()
def generate(roles: Roles, model, prompts: list[list[int]], seeds: list[int], *, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 160, batch_size: int = 32) -> list[Sample]:
    """Sample continuations that stop at eos or a newline with the HF backend's decoding loop (a request's
    tokens depend on its seed only, not on the batch; identical prompts, the K samples of a history, share
    their prefill). A row never runs past the model's context (prompt + new tokens <=
    max_position_embeddings, as the HF backend requires): its budget is cut to what fits."""
    budgets = [max_new_tokens if not roles.max_context else
               max(1, min(max_new_tokens, roles.max_context - len(p))) for p in prompts]
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=n) for n in budgets]
    opts = DecodeOptions(batch_size=batch_size, prefix_attention=roles.prefix_attention)
    outs = decode(roles.lm_of(model), prompts, params, seeds, opts, stop_tokens=roles.newline_mask, logprobs=True)
    samples = []
    for d in outs:
        text = roles.tokenizer.decode(d.tokens, skip_special_tokens=True).split("\n", 1)[0]
        samples.append(Sample(d.tokens, " ".join(text.split()), d.logprob))
    return samples


def seq_logprobs(roles: Roles, model, rows: list[tuple[list[int], list[int]]], *, micro: int = 16,
                 weights: torch.Tensor | None = None, groups: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(continuation | prompt) per row, and the continuation's token count.

    Without `weights`: no gradient. With `weights` (one per row): backpropagates sum_r weights[r] * logp[r]
    micro-batch by micro-batch (gradients accumulate in the trainable tensors) and returns the values
    detached. Rows are left-padded so only the continuation's logits are computed. `groups`: a key per
    row; the rows of a key share their prompt's longest common token prefix, which is run once (as the
    HF backend shares a step's prefix; with gradients, the prefix's gradient is accumulated once).
    """
    sums = torch.zeros(len(rows), dtype=torch.float64)
    counts = torch.tensor([len(c) for _, c in rows], dtype=torch.long)
    if groups is not None:
        by_key: dict = {}
        for i, g in enumerate(groups):
            by_key.setdefault(g, []).append(i)
        plain = []
        for idx in by_key.values():
            if len(idx) < 2 or not _score_shared(roles, model, rows, idx, micro, sums, weights):
                plain += idx
        if plain:
            sub, _ = seq_logprobs(roles, model, [rows[i] for i in plain], micro=micro,
                                  weights=None if weights is None else weights[plain])
            sums[plain] = sub
        return sums, counts
    dev = roles.device
    lm = roles.lm_of(model)
    keep = lm.keep_kw
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for c0 in range(0, len(order), micro):
        idx = order[c0: c0 + micro]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        b, n = len(idx), max(len(s) for s in seqs)
        c = max(len(rows[i][1]) for i in idx)
        if c == 0:
            continue
        inp = torch.full((b, n), roles.pad_id, dtype=torch.long)
        att = torch.zeros((b, n), dtype=torch.long)
        cmask = torch.zeros((b, c), dtype=torch.bool)
        for r, s in enumerate(seqs):
            inp[r, n - len(s):] = torch.tensor(s)
            att[r, n - len(s):] = 1
            cmask[r, c - len(rows[idx[r]][1]):] = True
        inp, att, cmask = inp.to(dev), att.to(dev), cmask.to(dev)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        with torch.set_grad_enabled(weights is not None):
            kw = {keep: c + 1} if keep else {}
            logits = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=False, **kw).logits
            logits = logits[:, -(c + 1): -1].float()
            tgt = inp[:, n - c:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                    reduction="none").view(b, c)
            lp = torch.where(cmask, -nll, torch.zeros_like(nll)).sum(1)
            if weights is not None:
                w = weights[idx].to(device=dev, dtype=lp.dtype)
                (w * lp).sum().backward()
        sums[idx] = lp.detach().double().cpu()
    return sums, counts


def _score_shared(roles: Roles, model, rows, idx: list[int], micro: int, sums: torch.Tensor,
                  weights: torch.Tensor | None = None, min_prefix: int = 16) -> bool:
    """Score rows `idx` with their common prompt prefix run once (and backpropagate sum w * logp when
    `weights`); False (nothing done) when the prefix is too short or the cache has no per-layer tensors."""
    prompts = [rows[i][0] for i in idx]
    p = min(len(x) for x in prompts) - 1  # each row keeps >= 1 prompt token: its first target's logits
    for x in prompts[1:]:
        p = min(p, longest_common_prefix(prompts[0], x))
    lm = roles.lm_of(model)
    cache_kw, cache = lm.cache_kw, lm.new_cache()
    if p < min_prefix or not hasattr(cache, "layers"):
        return False
    dev = roles.device
    grad = weights is not None
    pre = torch.tensor([prompts[0][:p]], device=dev)
    keep = lm.keep_kw
    with torch.set_grad_enabled(grad):
        model(input_ids=pre, attention_mask=torch.ones_like(pre), position_ids=torch.arange(p, device=dev)[None],
              use_cache=True, **{cache_kw: cache}, **({keep: 1} if keep else {}))
    prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
    chunks = [idx[c0: c0 + micro] for c0 in range(0, len(idx), micro)]
    for n_chunk, part in enumerate(chunks):
        rest = [rows[i][0][p:] + rows[i][1] for i in part]
        b, w = len(part), max(len(r) for r in rest)
        inp = torch.full((b, w), roles.pad_id, dtype=torch.long)
        att = torch.zeros((b, p + w), dtype=torch.long)
        att[:, :p] = 1
        mask = torch.zeros((b, w - 1), dtype=torch.bool)  # logits column j predicts token j + 1
        for r, (i, x) in enumerate(zip(part, rest, strict=True)):
            inp[r, : len(x)] = torch.tensor(x)
            att[r, p: p + len(x)] = 1
            start = len(rows[i][0]) - p  # first target token's column in `rest`
            mask[r, start - 1: start - 1 + len(rows[i][1])] = True
        inp, att, mask = inp.to(dev), att.to(dev), mask.to(dev)
        pos = (p + torch.arange(w, device=dev))[None].expand(b, w)
        with torch.set_grad_enabled(grad):
            c = lm.new_cache()  # the prefix's keys / values broadcast to the chunk (in the graph)
            for li, (k, v) in enumerate(prefix_kv):
                c.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), li)
            logits = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=True,
                           **{cache_kw: c}).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), inp[:, 1:].reshape(-1),
                                                    reduction="none").view(b, w - 1)
            lp = torch.where(mask, -nll, torch.zeros_like(nll)).sum(1)
            if grad:
                w_part = weights[part].to(device=dev, dtype=lp.dtype)
                (w_part * lp).sum().backward(retain_graph=n_chunk + 1 < len(chunks))
        sums[part] = lp.detach().double().cpu()
    return True


# ----------------------------------------------------------------------------- data


@dataclass
class EventSteps:
    """An event's first steps, as the engine cuts them: per step the real (state, action text) pairs."""

    event_id: str
    event_text: str
    steps: list[list[tuple[str, str]]]


def event_steps(event: Event, lang: str, step_size: int, max_steps: int) -> EventSteps:
    steps = []
    for st in plan_steps(event.actions, step_size=step_size, warmup=0):
        if len(steps) >= max_steps:
            break
        steps.append([(agent_state_text(a.profile, lang, depth=a.depth), a.text) for a in st.actions])
    return EventSteps(event.event_id, event.source.text, steps)


def meanfield_chain(evs: list[EventSteps], upto: list[int], *, how: str, lang: str, roles: Roles | None = None,
                    role: str | None = None, seed: int = 0, max_new_tokens: int = 160) -> list[list[str]]:
    """m before each step, fed the real history: chains[e][t] = m_{t-1} (chains[e][0] = the empty marker).

    how="stats": the stats mean field; how="llm": the summariser (`role` of `roles`, None = the base model)
    sampled with the inference settings, all events' step t batched together. Only steps < upto[e] are run.
    """
    init = strings(lang)["empty_meanfield"]
    chains = [[init] for _ in evs]
    if how == "stats":
        smf = StatsMeanField(lang=lang)
        for e, ev in enumerate(evs):
            state = smf.initial(lang)
            for t in range(min(upto[e], len(ev.steps))):
                state = smf.update_many([MeanFieldUpdate(ev.event_text, state, ev.steps[t])])[0]
                chains[e].append(state.text)
        return chains
    assert roles is not None
    for t in range(max(upto, default=0)):
        todo = [e for e, ev in enumerate(evs) if t < min(upto[e], len(ev.steps))]
        if not todo:
            break
        prompts = roles.encode_prompts([meanfield_prompt(evs[e].event_text, chains[e][t],
                                                                    evs[e].steps[t], lang) for e in todo])
        with roles.active(role) as model:
            outs = generate(roles, model, prompts, [derive_seed(seed, evs[e].event_id, t, "chain") for e in todo],
                            temperature=INFER_TEMPERATURE, top_p=INFER_TOP_P, max_new_tokens=max_new_tokens)
        for e, s in zip(todo, outs, strict=True):
            chains[e].append(s.text or init)  # an empty summary is retried at inference; keep the marker
    return chains


@dataclass
class Unit:
    """Stage 1: history X = (event, m_{t-1}, step t's pairs); Y = next step's (state, action) sample."""

    event_id: str
    event_text: str
    step: int
    previous: str
    pairs: list[tuple[str, str]]
    targets: list[tuple[str, str]]
    stats: str = ""  # the stats mean field after steps 0..t of the real history (a reference context)


def build_units(events: list[Event], cfg: TuneConfig, n_units: int, rng: random.Random, roles: Roles,
                chain_role: str | None = None, info: dict | None = None) -> list[Unit]:
    """About n_units units from randomly picked events (each event gives up to units_per_event steps t).

    A history whose prompt + `mf_max_new_tokens` exceeds the model's context is left out (the HF backend
    refuses such a request at inference); `info["dropped_too_long"]` counts them."""
    evs = [event_steps(e, cfg.lang, cfg.step_size, cfg.max_steps + 1) for e in events]
    evs = [e for e in evs if len(e.steps) >= 2]
    rng.shuffle(evs)
    evs = evs[: max(1, math.ceil(1.5 * n_units / max(1, cfg.units_per_event)))]  # margin for dropped ones
    picks = []
    for ev in evs:
        ts = rng.sample(range(len(ev.steps) - 1), min(cfg.units_per_event, len(ev.steps) - 1))
        picks.append(sorted(ts))
    stats = meanfield_chain(evs, [max(ts) + 1 for ts in picks], how="stats", lang=cfg.lang)
    if cfg.previous == "stats":
        chains = stats
    else:
        chains = meanfield_chain(evs, [max(ts) for ts in picks], how="llm", lang=cfg.lang, roles=roles,
                                 role=chain_role, seed=cfg.seed, max_new_tokens=cfg.mf_max_new_tokens)
    units = []
    for ev, ts, chain, st in zip(evs, picks, chains, stats, strict=True):
        for t in ts:
            nxt = ev.steps[t + 1]
            targets = rng.sample(nxt, min(cfg.targets_per_unit, len(nxt)))
            units.append(Unit(ev.event_id, ev.event_text, t, chain[t], ev.steps[t], targets, st[t + 1]))
    if roles.max_context:
        lens = [len(x) for x in roles.encode_prompts([
            meanfield_prompt(u.event_text, u.previous, u.pairs, cfg.lang) for u in units])]
        fits = [u for u, n in zip(units, lens, strict=True) if n + cfg.mf_max_new_tokens <= roles.max_context]
        if info is not None:
            info["dropped_too_long"] = info.get("dropped_too_long", 0) + len(units) - len(fits)
        units = fits
    rng.shuffle(units)
    return units[:n_units]


@dataclass
class PolicyExample:
    event_id: str
    step: int
    prompt: str
    target: str  # action_to_target(text); eos is added at encoding


def build_policy_examples(events: list[Event], cfg: TuneConfig, n_examples: int, rng: random.Random,
                          roles: Roles | None, meanfield_role: str | None = "meanfield") -> list[PolicyExample]:
    """(event, context, state) -> real action with the method's own context code (mf: m_t; state: none)."""
    evs = [event_steps(e, cfg.lang, cfg.step_size, cfg.max_steps) for e in events]
    evs = [e for e in evs if e.steps]
    rng.shuffle(evs)
    n_events, total = 0, 0
    while n_events < len(evs) and total < n_examples:  # just enough events for n_examples
        total += sum(min(cfg.agents_per_step, len(s)) for s in evs[n_events].steps)
        n_events += 1
    evs = evs[:n_events]
    if cfg.context == "mf":  # m before step s: fed steps < s, as in warm-up
        chains = meanfield_chain(evs, [len(e.steps) - 1 for e in evs], how="llm", lang=cfg.lang, roles=roles,
                                 role=meanfield_role, seed=cfg.seed, max_new_tokens=cfg.mf_max_new_tokens)
    else:
        chains = [[""] * len(e.steps) for e in evs]
    method = make_method(cfg.context)
    out = []
    for ev, chain in zip(evs, chains, strict=True):
        for s, pairs in enumerate(ev.steps):
            prefix = policy_prefix(ev.event_text, method.context(History(), chain[s], cfg.lang), cfg.lang)
            for state, text in rng.sample(pairs, min(cfg.agents_per_step, len(pairs))):
                out.append(PolicyExample(ev.event_id, s, prefix + policy_suffix(state, cfg.lang),
                                         action_to_target(text, cfg.lang)))
    rng.shuffle(out)
    return out[:n_examples]


def _save_json_gz(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def _load_json_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- stage 1


def prior_prompt(event_text: str, lang: str) -> str:
    """p0's prompt: the mean-field instruction with the history removed (empty marker, no new replies)."""
    return meanfield_prompt(event_text, strings(lang)["empty_meanfield"], [], lang)


def mf_policy_prompt(event_text: str, m: str, state: str, lang: str) -> str:
    """The policy's prompt for the `mf` method, through the method's own context code."""
    return policy_prefix(event_text, make_method("mf").context(History(), m, lang), lang) + policy_suffix(state, lang)


def score_reward(roles: Roles, units: list[Unit], ms: list[list[str]], cfg: TuneConfig,
                 policy_role: str | None) -> torch.Tensor:
    """R[i, k] = (1/|Y_i|) sum_j log pi(y_j + eos | event, m_ik, state_j) under the frozen policy."""
    tok = roles.tokenizer
    rows: list = []
    owner: list = []
    for i, u in enumerate(units):
        tgt = encode_targets(tok, [action_to_target(a, cfg.lang) for _, a in u.targets], roles.eos_id)
        for k, m in enumerate(ms[i]):
            prompts = roles.encode_prompts([mf_policy_prompt(u.event_text, m, s, cfg.lang) for s, _ in u.targets])
            rows += list(zip(prompts, tgt, strict=True))
            owner += [(i, k)] * len(tgt)
    with roles.active(policy_role) as pol:  # the rows of one (history, m) share the prompt up to the state
        lp, _ = seq_logprobs(roles, pol, rows, micro=cfg.micro_batch, groups=owner)
    k_max = max(len(x) for x in ms)
    tot = torch.zeros(len(units), k_max, dtype=torch.float64)
    cnt = torch.zeros(len(units), k_max, dtype=torch.float64)
    for (i, k), v in zip(owner, lp.tolist(), strict=True):
        tot[i, k] += v
        cnt[i, k] += 1
    return tot / cnt.clamp(min=1)


def stage1_step(roles: Roles, units: list[Unit], cfg: TuneConfig, seed: int, *, backward: bool = True,
                k: int | None = None, policy_role: str | None = None) -> dict:
    """Sample K summaries per history, score them, and (backward=True) accumulate the estimator's gradient.

    Returns the batch's tensors (R, log q, log p0, lengths, A, advantages, weights) and scalar metrics.
    """
    k = k or cfg.samples_k
    lang = cfg.lang
    prompts = roles.encode_prompts([meanfield_prompt(u.event_text, u.previous, u.pairs, lang) for u in units])
    flat = [(i, j) for i in range(len(units)) for j in range(k)]
    with roles.active(roles.trainable_role) as model:
        samples = generate(roles, model, [prompts[i] for i, _ in flat],
                           [derive_seed(seed, units[i].event_id, units[i].step, j) for i, j in flat],
                           temperature=1.0, top_p=1.0, max_new_tokens=cfg.mf_max_new_tokens)
    b = len(units)
    logq = torch.tensor([s.logprob for s in samples], dtype=torch.float64).view(b, k)
    length = torch.tensor([len(s.ids) for s in samples], dtype=torch.float64).view(b, k)
    pri = roles.encode_prompts([prior_prompt(u.event_text, lang) for u in units])
    with roles.active(None) as ref:
        logp0, _ = seq_logprobs(roles, ref, [(pri[i], s.ids) for (i, _), s in zip(flat, samples, strict=True)],
                                micro=cfg.micro_batch, groups=[i for i, _ in flat])
    logp0 = logp0.view(b, k)
    texts = [[samples[i * k + j].text for j in range(k)] for i in range(b)]
    reward = score_reward(roles, units, texts, cfg, policy_role)
    kl = logq - logp0
    a = reward - cfg.beta * kl - cfg.length_penalty * length
    if k >= 2:
        baseline = (a.sum(1, keepdim=True) - a) / (k - 1)
    else:
        baseline = torch.zeros_like(a)
    adv = a - baseline
    weights = (-adv + (cfg.beta if cfg.pathwise_kl else 0.0)) / (b * k)
    out = {"reward": reward, "logq": logq, "logp0": logp0, "kl": kl, "length": length, "A": a, "adv": adv,
           "weights": weights, "texts": texts}
    if backward:
        with roles.active(roles.trainable_role) as model:  # the K samples of a history share its prompt
            lq, _ = seq_logprobs(roles, model, [(prompts[i], s.ids) for (i, _), s in zip(flat, samples, strict=True)],
                                 micro=cfg.micro_batch, weights=weights.reshape(-1), groups=[i for i, _ in flat])
        out["logq_forward"] = lq.view(b, k)
        out["surrogate"] = float((weights.reshape(-1) * lq).sum())
    out["metrics"] = {"objective": float(a.mean()), "reward": float(reward.mean()), "kl": float(kl.mean()),
                      "length": float(length.mean())}
    return out


def surrogate_loss(roles: Roles, units: list[Unit], prompts_ids: list[list[int]], sample_ids: list[list[int]],
                   weights: torch.Tensor, cfg: TuneConfig) -> float:
    """The surrogate L = sum_r w_r log q(m_r | X_r) for fixed samples and weights (no gradient)."""
    with roles.active(roles.trainable_role) as model:
        lq, _ = seq_logprobs(roles, model, list(zip(prompts_ids, sample_ids, strict=True)), micro=cfg.micro_batch)
    return float((weights.reshape(-1) * lq).sum())


@torch.no_grad()
def evaluate_meanfield(roles: Roles, units: list[Unit], cfg: TuneConfig, policy_role: str | None,
                       k: int = 2) -> dict:
    """Val objective with fixed seeds: mean R, mean KL estimate, mean R - beta*KL - lam*|m|."""
    if not units:
        return {}
    tot = {"objective": 0.0, "reward": 0.0, "kl": 0.0, "length": 0.0}
    for c0 in range(0, len(units), cfg.batch_size):
        part = units[c0: c0 + cfg.batch_size]
        m = stage1_step(roles, part, cfg, derive_seed(cfg.seed, "val"), backward=False, k=k,
                        policy_role=policy_role)["metrics"]
        for key in tot:
            tot[key] += m[key] * len(part)
    return {key: v / len(units) for key, v in tot.items()}


@torch.no_grad()
def sample_summaries(roles: Roles, units: list[Unit], cfg: TuneConfig, n: int = 4) -> list[dict]:
    """One sampled m (temperature 1, fixed seed) for each of the first n val histories: to read."""
    if not units:
        return []
    res = stage1_step(roles, units[:n], cfg, derive_seed(cfg.seed, "show"), backward=False, k=1)
    return [{"event_id": u.event_id, "step": u.step, "m": t[0]} for u, t in zip(units, res["texts"], strict=False)]


@torch.no_grad()
def reference_rewards(roles: Roles, units: list[Unit], cfg: TuneConfig, policy_role: str | None) -> dict:
    """R on val with fixed contexts: the empty marker (no mean field) and the stats summary after step t."""
    empty = strings(cfg.lang)["empty_meanfield"]
    r_empty = score_reward(roles, units, [[empty] for _ in units], cfg, policy_role)
    r_stats = score_reward(roles, units, [[u.stats] for u in units], cfg, policy_role)
    return {"reward_empty_marker": float(r_empty.mean()), "reward_stats_meanfield": float(r_stats.mean())}


# ----------------------------------------------------------------------------- shared training loop


def _lr_at(cfg: TuneConfig, s: int) -> float:
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    frac = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


def _batches(n_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The whole batch order, fixed by the seed (a resumed run sees the same batches)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        idx = list(range(n_items))
        rng.shuffle(idx)
        order += idx
    return [order[s * batch_size: (s + 1) * batch_size] for s in range(steps)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _train_loop(stage: str, cfg: TuneConfig, roles: Roles, n_items: int, step_fn, eval_fn, work: Path,
                progress: bool) -> tuple[list[dict], float, bool]:
    """Optimise with AdamW, evaluating, checkpointing and showing progress. step_fn(s, batch) -> metrics
    (gradients accumulated); eval_fn() -> metrics. Returns (history, seconds, finished)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mfllm.training.mini import load_checkpoint, save_checkpoint

    view = _TrainableView(roles)

    def opt_factory(_m):
        return torch.optim.AdamW(roles.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)

    ckpt = work / "checkpoint"
    if (ckpt / "progress.json").exists():
        _, opt, start, history = load_checkpoint(ckpt, view, opt_factory)
    else:
        opt, start, history = opt_factory(view), 0, []
    order = _batches(n_items, cfg.batch_size, cfg.steps, cfg.seed + 2)
    t0 = time.time()
    ran = 0
    key = "objective" if stage == "meanfield" else "train_loss"
    with Progress(TextColumn(f"[bold]train {stage}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task(stage, total=cfg.steps, completed=start, info="")
        for s in range(start, cfg.steps):
            if cfg.interrupt_after is not None and ran >= cfg.interrupt_after:
                save_checkpoint(ckpt, view, opt, s, history)
                return history, time.time() - t0, False
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, s)
            row = {"step": s + 1, **step_fn(s, order[s]), "lr": _lr_at(cfg, s)}
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(roles.parameters(), cfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
                row.update({f"val_{k}": v for k, v in eval_fn().items()})
            history.append(row)
            ran += 1
            info = f"{key} {row[key]:.3f}" + "".join(f" {k} {v:.3f}" for k, v in row.items()
                                                      if k.startswith("val_") and k != "val_action_nll_per_token")
            if "val_action_nll_per_token" in row:
                info += f" val {row['val_action_nll_per_token']:.3f}"
            bar.update(task, advance=1, info=info)
            if (s + 1) % cfg.ckpt_every == 0 and s + 1 < cfg.steps:
                save_checkpoint(ckpt, view, opt, s + 1, history)
    return history, time.time() - t0, True


def _prepare_work(cfg: TuneConfig, stage: str) -> Path:
    """OUT/_work with the stage's config; a rerun with other settings must not resume the old checkpoint."""
    work = Path(cfg.out) / "_work"
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "config.json"
    mine = {k: v for k, v in asdict(cfg).items()
            if k not in ("interrupt_after", "threads", "eval_every", "ckpt_every", "device", "micro_batch")}
    mine["stage"] = stage
    if saved.exists():
        old = json.loads(saved.read_text())
        if old != json.loads(json.dumps(mine)):
            diff = sorted(k for k in set(old) | set(mine) if old.get(k) != json.loads(json.dumps(mine)).get(k))
            raise ConfigError(f"{cfg.out} holds an unfinished {old.get('stage')} run with other settings "
                              f"({', '.join(diff)}); rerun with the same options or use a new --out")
    else:
        tmp = saved.with_name("config.json.tmp")
        tmp.write_text(json.dumps(mine, indent=1))
        os.replace(tmp, saved)
    return work


def _finish(cfg: TuneConfig, roles: Roles, role: str, info: dict) -> dict:
    out = Path(cfg.out)
    roles.save_role(role, out)
    info["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if roles.device.startswith("cuda"):
        info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    info["trainable_parameters"] = sum(p.numel() for p in roles.parameters())
    info["base_parameters"] = sum(p.numel() for n, p in roles.base.named_parameters() if "lora_" not in n)
    tmp = out / "training_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "training_info.json")
    shutil.rmtree(out / "_work", ignore_errors=True)
    return info


def _val_of(history: list[dict]) -> dict:
    """The last validation metrics of a run (without the val_ prefix)."""
    for h in reversed(history):
        v = {k[4:]: x for k, x in h.items() if k.startswith("val_")}
        if v:
            return v
    return {}


def is_done(out: str | os.PathLike) -> bool:
    return (Path(out) / "training_info.json").is_file()


def sample_events(cfg: TuneConfig, split: str, n: int) -> list[Event]:
    """A seeded random sample of `n` events of `split`, streamed (one file parsed at a time), each cut to
    the actions of its first max_steps + 1 steps (all a stage uses): memory stays small on any corpus."""
    import heapq

    from mfllm.data.load import iter_events

    if not cfg.data:
        raise ConfigError("--data is required", field="data")
    keep = (cfg.max_steps + 1) * cfg.step_size
    heap: list = []  # the n smallest keys, as a max-heap
    for ev in iter_events(cfg.data, split=split):
        key = derive_seed(cfg.seed, "pick", ev.event_id)
        if len(heap) < n or key < -heap[0][0]:
            item = (-key, ev.event_id, replace_event(ev, ev.actions[:keep]))
            (heapq.heappush if len(heap) < n else heapq.heapreplace)(heap, item)
    return [e for _, _, e in sorted(heap, key=lambda x: (-x[0], x[1]))]


def replace_event(ev: Event, actions) -> Event:
    import dataclasses

    return dataclasses.replace(ev, actions=list(actions))


def events_needed(cfg: TuneConfig, stage: str) -> int:
    """How many training events a stage draws from (a margin over what its steps x batch use)."""
    if stage == "meanfield":
        n = math.ceil(cfg.steps * cfg.batch_size / max(1, cfg.units_per_event) * 1.5) + 4
    else:
        n = math.ceil(cfg.steps * cfg.batch_size / max(1, cfg.agents_per_step)) + 4
    return min(n, cfg.max_events) if cfg.max_events is not None else n


# ----------------------------------------------------------------------------- stage 1: train


def _stage_roles(cfg: TuneConfig, trainable: str, frozen: str, frozen_path: str | None) -> tuple[Roles, str | None]:
    """The base model with the stage's trainable role and, if given, the other role frozen from disk
    (returned as its name, None when the base model plays it)."""
    roles = Roles(cfg.base, cfg.device, cfg.dtype, cfg.threads)
    roles.add_trainable(trainable, full=cfg.full, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                        dropout=cfg.lora_dropout, target_modules=cfg.target_modules, seed=cfg.seed)
    if not frozen_path:
        return roles, None
    roles.load_frozen(frozen, frozen_path)
    return roles, frozen


def train_meanfield(cfg: TuneConfig, train_events: list[Event] | None = None, val_events: list[Event] | None = None,
                    *, progress: bool = True) -> dict:
    """Stage 1: IB-Tune the mean-field adapter. Writes the adapter, curves and training_info.json to cfg.out."""
    cfg.check("meanfield")
    t_start = time.time()
    work = _prepare_work(cfg, "meanfield")
    roles, policy_role = _stage_roles(cfg, "meanfield", "policy", cfg.policy_adapter)

    data_path = work / "units.json.gz"
    t_data = time.time()
    data_info: dict = {"dropped_too_long": 0}
    if data_path.exists():
        d = _load_json_gz(data_path)
        units = [Unit(**u) for u in d["train"]]
        val = [Unit(**u) for u in d["val"]]
        data_info = d.get("info", data_info)
    else:
        if train_events is None:
            train_events = sample_events(cfg, cfg.split, events_needed(cfg, "meanfield"))
        if val_events is None:
            val_events = sample_events(cfg, cfg.val_split, cfg.val_events)
        if cfg.max_events is not None:
            train_events = train_events[: cfg.max_events]
        # the chain uses the untuned summariser (adapter off; stage 1 starts from it)
        units = build_units(train_events, cfg, cfg.steps * cfg.batch_size, random.Random(cfg.seed), roles, None,
                            data_info)
        val = build_units(val_events[: cfg.val_events], cfg, cfg.val_units, random.Random(cfg.seed + 1), roles,
                          None, data_info)
        if not units:
            raise ConfigError("no training history: the events need at least two steps (2 x step_size actions), "
                              f"and a prompt + --max-new-tokens within the model's context ({roles.max_context}); "
                              "try a smaller --step-size or --max-new-tokens")
        _save_json_gz(data_path, {"train": [asdict(u) for u in units], "val": [asdict(u) for u in val],
                                  "info": data_info})
    data_seconds = time.time() - t_data

    ref_path = work / "reference.json"
    if ref_path.exists():
        ref = json.loads(ref_path.read_text())
    else:
        ref = {"val_before": evaluate_meanfield(roles, val, cfg, policy_role),
               "val_reference": reference_rewards(roles, val, cfg, policy_role) if val else {},
               "summaries_before": sample_summaries(roles, val, cfg)}
        ref_path.write_text(json.dumps(ref))

    def step_fn(s, batch):
        res = stage1_step(roles, [units[i] for i in batch], cfg, derive_seed(cfg.seed, "train", s),
                          policy_role=policy_role)
        return {**res["metrics"], "surrogate": res["surrogate"]}

    history, seconds, finished = _train_loop("meanfield", cfg, roles, len(units), step_fn,
                                             lambda: evaluate_meanfield(roles, val, cfg, policy_role), work, progress)
    info = {"stage": "meanfield", "finished": finished, "config": asdict(cfg), "train_units": len(units),
            "val_units": len(val), **data_info, "data_seconds": round(data_seconds, 1), "train_seconds": round(seconds, 1),
            "total_seconds": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
            "device": roles.device, **ref, "val_after": _val_of(history), "last_step": history[-1] if history else {},
            "estimator": "REINFORCE, leave-one-out baseline, KL as stop-gradient reward"
                         + (" + pathwise KL term" if cfg.pathwise_kl else "")}
    write_meanfield_curves(Path(cfg.out), history, ref.get("val_before"), ref.get("val_reference"))
    if not finished:
        return info
    info["summaries_after"] = sample_summaries(roles, val, cfg)
    return _finish(cfg, roles, "meanfield", info)


def write_meanfield_curves(out: Path, history: list[dict], before: dict | None = None,
                           reference: dict | None = None) -> None:
    """reward_curve.csv and reward_curve.png: per step the batch's objective / R / KL / length (train R
    varies with the batch's histories) and, every eval, the same on the fixed val histories (step 0:
    before training)."""
    if not history:
        return
    keys = ["step", "objective", "reward", "kl", "length", "surrogate", "grad_norm", "lr",
            "val_objective", "val_reward", "val_kl", "val_length"]
    rows = ([{"step": 0, **{f"val_{k}": v for k, v in before.items()}}] if before else []) + history
    from mfllm.training.mini import write_curve_csv

    write_curve_csv(out / "reward_curve.csv", keys, rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    ev = [h for h in rows if "val_reward" in h]
    vs = [h["step"] for h in ev]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ax = axes[0]
    ax.plot(vs, [h["val_reward"] for h in ev], "o-", label="val R (log-lik / next action)")
    ax.plot(vs, [h["val_objective"] for h in ev], "s-", label="val R - beta KL")
    for name, style in (("reward_empty_marker", ":"), ("reward_stats_meanfield", "--")):
        if reference and name in reference:
            ax.axhline(reference[name], color="grey", ls=style, lw=1,
                       label="val R, m = " + ("empty marker" if "empty" in name else "stats mean field"))
    ax.set_ylabel("nats")
    ax = axes[1]
    ax.plot(steps, [h["kl"] for h in history], lw=0.8, alpha=0.6, label="train KL estimate")
    ax.plot(vs, [h["val_kl"] for h in ev], "o-", label="val KL estimate")
    ax.set_ylabel("nats")
    ax = axes[2]
    ax.plot(steps, [h["length"] for h in history], lw=0.8, alpha=0.6, label="train |m|")
    ax.plot(vs, [h["val_length"] for h in ev], "o-", label="val |m|")
    ax.set_ylabel("tokens")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle("IB-Tune stage 1 (mean field): prediction term, compression term, summary length", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- stage 2: train


def _encode_examples(roles: Roles, exs: list[PolicyExample]) -> list[tuple[list[int], list[int]]]:
    p = roles.encode_prompts([e.prompt for e in exs])
    t = encode_targets(roles.tokenizer, [e.target for e in exs], roles.eos_id)
    return list(zip(p, t, strict=True))


def _fits(roles: Roles, rows: list) -> list:
    """Examples within the model's context (as mfllm-mini's trainer drops longer ones)."""
    return [r for r in rows if not roles.max_context or len(r[0]) + len(r[1]) <= roles.max_context]


def sft_step(roles: Roles, rows: list[tuple[list[int], list[int]]], micro: int, backward: bool = True) -> dict:
    """Mean NLL per target token over the batch (gradients accumulated when backward)."""
    n_tok = sum(len(c) for _, c in rows)
    with roles.active(roles.trainable_role) as model:
        w = torch.full((len(rows),), -1.0 / n_tok) if backward else None
        lp, _ = seq_logprobs(roles, model, rows, micro=micro, weights=w)
    return {"train_loss": float(-lp.sum() / n_tok), "tokens": n_tok}


@torch.no_grad()
def evaluate_policy(roles: Roles, rows: list[tuple[list[int], list[int]]], micro: int, role: str | None) -> dict:
    if not rows:
        return {}
    with roles.active(role) as model:
        lp, n = seq_logprobs(roles, model, rows, micro=micro)
    return {"action_nll_per_token": float(-lp.sum() / n.sum())}


def train_policy(cfg: TuneConfig, train_events: list[Event] | None = None, val_events: list[Event] | None = None,
                 *, progress: bool = True) -> dict:
    """Stage 2: SFT of the policy adapter on (event, state, m_t) -> real action (or the `state` context)."""
    from mfllm.training.mini import write_curves

    cfg.check("policy")
    t_start = time.time()
    work = _prepare_work(cfg, "policy")
    roles, mf_role = _stage_roles(cfg, "policy", "meanfield",
                                  cfg.meanfield_adapter if cfg.context == "mf" else None)

    data_path = work / "examples.json.gz"
    t_data = time.time()
    if data_path.exists():
        d = _load_json_gz(data_path)
        train = [PolicyExample(**e) for e in d["train"]]
        val = [PolicyExample(**e) for e in d["val"]]
    else:
        if train_events is None:
            train_events = sample_events(cfg, cfg.split, events_needed(cfg, "policy"))
        if val_events is None:
            val_events = sample_events(cfg, cfg.val_split, cfg.val_events)
        if cfg.max_events is not None:
            train_events = train_events[: cfg.max_events]
        train = build_policy_examples(train_events, cfg, cfg.steps * cfg.batch_size, random.Random(cfg.seed),
                                      roles, mf_role)
        val = build_policy_examples(val_events[: cfg.val_events], cfg, 8 * cfg.val_units,
                                    random.Random(cfg.seed + 1), roles, mf_role)
        if not train:
            raise ConfigError("no training examples: the training events have no actions")
        _save_json_gz(data_path, {"train": [asdict(e) for e in train], "val": [asdict(e) for e in val]})
    data_seconds = time.time() - t_data
    train_rows = _fits(roles, _encode_examples(roles, train))
    val_rows = _fits(roles, _encode_examples(roles, val))
    if not train_rows:
        raise ConfigError(f"every training example is longer than the model's context ({roles.max_context})")
    before = evaluate_policy(roles, val_rows, cfg.micro_batch, None)
    tokens = [0]

    def step_fn(s, batch):
        m = sft_step(roles, [train_rows[i] for i in batch], cfg.micro_batch)
        tokens[0] += m["tokens"]
        return {"train_loss": m["train_loss"], "tokens": tokens[0]}

    def eval_fn():
        return evaluate_policy(roles, val_rows, cfg.micro_batch, "policy")

    history, seconds, finished = _train_loop("policy", cfg, roles, len(train_rows), step_fn, eval_fn, work,
                                             progress)
    out = Path(cfg.out)
    info = {"stage": "policy", "context": cfg.context, "meanfield_adapter": cfg.meanfield_adapter,
            "finished": finished, "config": asdict(cfg), "train_examples": len(train_rows),
            "val_examples": len(val_rows), "dropped_too_long": len(train) + len(val) - len(train_rows) - len(val_rows),
            "data_seconds": round(data_seconds, 1), "train_seconds": round(seconds, 1),
            "total_seconds": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
            "device": roles.device, "val_before": before, "val_after": _val_of(history),
            "last_step": history[-1] if history else {}}
    if history:
        write_curves(out, history)
    if not finished:
        return info
    return _finish(cfg, roles, "policy", info)


# ----------------------------------------------------------------------------- both stages


@dataclass
class IBTunePlan:
    """`mfllm train ib-tune`: stage 1, then stage 2 with the tuned mean field, plus optional baselines."""

    meanfield: TuneConfig
    policy: TuneConfig
    sft_baseline: bool = True  # also OUT/policy-sft: SFT with the `state` context (no mean field)
    policy_base_mf: bool = False  # also OUT/policy-basemf: SFT with m_t from the untuned summariser
    outputs: dict = field(default_factory=dict)


def ib_tune(plan: IBTunePlan, out: str | os.PathLike, *, progress: bool = True,
            train_events: list[Event] | None = None, val_events: list[Event] | None = None) -> dict:
    """Run the stages that are not done yet (each is resumable); return {name: training_info}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg1 = plan.meanfield
    jobs: list[tuple[str, TuneConfig]] = [("meanfield", cfg1)]
    jobs.append(("policy", replace_cfg(plan.policy, context="mf", meanfield_adapter=str(out / "meanfield"))))
    if plan.sft_baseline:
        jobs.append(("policy-sft", replace_cfg(plan.policy, context="state", meanfield_adapter=None)))
    if plan.policy_base_mf:
        jobs.append(("policy-basemf", replace_cfg(plan.policy, context="mf", meanfield_adapter=None)))
    todo = [name for name, _ in jobs if not is_done(out / name)]
    if train_events is None and todo:  # one sample of events serves every stage
        n = max(events_needed(cfg1, "meanfield"), events_needed(plan.policy, "policy"))
        train_events = sample_events(replace_cfg(cfg1, max_steps=max(cfg1.max_steps, plan.policy.max_steps)),
                                     cfg1.split, n)
    if val_events is None and todo:
        val_events = sample_events(cfg1, cfg1.val_split, cfg1.val_events)
    infos = {}
    for name, cfg in jobs:
        cfg = replace_cfg(cfg, out=str(out / name))
        if is_done(cfg.out):
            infos[name] = json.loads((Path(cfg.out) / "training_info.json").read_text())
            continue
        fn = train_meanfield if name == "meanfield" else train_policy
        infos[name] = fn(cfg, train_events, val_events, progress=progress)
        if not infos[name].get("finished", True):
            break
    summary = {name: {"path": str(out / name), "train_seconds": i.get("train_seconds"),
                      "total_seconds": i.get("total_seconds"), "peak_rss_mb": i.get("peak_rss_mb"),
                      "val_before": i.get("val_before"), "val_after": i.get("val_after")} for name, i in infos.items()}
    (out / "ibtune.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return infos


def replace_cfg(cfg: TuneConfig, **kw) -> TuneConfig:
    d = asdict(cfg)
    d.update(kw)
    return TuneConfig(**d)
