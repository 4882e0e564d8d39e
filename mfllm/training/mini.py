"""Train mfllm-mini: a small causal LM trained from scratch on the CED training split, on a CPU.

One readable file in the spirit of nanoGPT: build examples with the inference templates
(training/examples.py), train a byte-level BPE tokenizer, train a small Llama, save both in the
Hugging Face format (safetensors) so every backend loads it like any HF model.

    mfllm train mini --data ../shared/data/ced --out mfllm/assets/models/mfllm-mini

Why byte-level BPE: any character a user's data holds encodes (no <unk>), while frequent Chinese
characters, words and the template's markers become single tokens, so prompts stay short enough for
a 2-core CPU. Only the training split is ever read for training; validation uses the val split.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mfllm.files import atomic_dir, atomic_open, atomic_write_json, recover_dir
from mfllm.training.examples import DEFAULT_MIX, Example, build_examples

SPECIALS = ["<pad>", "<s>", "</s>"]


@dataclass
class MiniConfig:
    data: str
    out: str
    seed: int = 1234
    lang: str = "zh"
    # model (Llama architecture)
    vocab_size: int = 8192
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 704
    max_len: int = 320
    # optimisation
    batch_size: int = 16
    steps: int = 1200
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    prompt_loss_weight: float = 0.25  # the prompt is real text too (event, replies): cheap extra signal
    # data
    agents_per_event: int = 24
    meanfield_per_event: int = 2
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    max_train_events: int | None = None
    examples: str | None = None  # prebuilt examples file (prepare_examples); built from `data` when absent
    val_examples: int = 400
    eval_every: int = 100
    ckpt_every: int = 100
    threads: int | None = None
    device: str = "auto"  # cpu | cuda | auto (cuda when available); the default config is sized for a CPU


# ----------------------------------------------------------------------------- data


def load_split(path: str, split: str, limit: int | None = None, progress=None):
    from mfllm.data.load import load_events

    return load_events(path, split=split, limit=limit, progress=progress).events


def prepare_examples(cfg: MiniConfig, path: Path, loading=None) -> Path:
    """Build train (train split) and val (val split) examples once and store them (gzip JSONL).

    A prebuilt file lets the same training run on a machine without the raw data (e.g. a GPU box).
    ``loading()``: a context giving the loaders' ``progress(done, total)`` callback (a bar while the data loads).
    """
    with (loading or nullcontext)() as tick:
        train_events = load_split(cfg.data, "train", cfg.max_train_events, progress=tick)
    with (loading or nullcontext)() as tick:
        val_events = load_split(cfg.data, "val", progress=tick)
    kw = dict(lang=cfg.lang, agents_per_event=cfg.agents_per_event, meanfield_per_event=cfg.meanfield_per_event,
              mix=cfg.mix)
    train = build_examples(train_events, seed=cfg.seed, **kw)
    val_all = build_examples(val_events, seed=cfg.seed + 1, **kw)
    val = random.Random(cfg.seed).sample(val_all, min(cfg.val_examples, len(val_all)))
    info = {"train_events": len(train_events), "val_events": len(val_events),
            "train_actions": sum(len(e) for e in train_events), "train_examples": len(train), "val_examples": len(val)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"info": info}, ensure_ascii=False) + "\n")
        for part, exs in (("train", train), ("val", val)):
            for e in exs:
                f.write(json.dumps({"part": part, **asdict(e)}, ensure_ascii=False) + "\n")
    return path


def read_examples(path: Path) -> tuple[list[Example], list[Example], dict]:
    train, val = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        info = json.loads(f.readline())["info"]
        for line in f:
            d = json.loads(line)
            (train if d.pop("part") == "train" else val).append(Example(**d))
    return train, val, info


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=3, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token=None, clean_up_tokenization_spaces=False)


def encode(tokenizer, ex: Example) -> tuple[list[int], int]:
    """Token ids of prompt + target + eos, and where the target starts."""
    p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + t, len(p)


def make_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches (little padding), in random order."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(idx), chunk):
        part = sorted(idx[i:i + chunk], key=lambda j: lengths[j])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded: list[tuple[list[int], int]], ids: list[int], pad_id: int, prompt_w: float):
    n = max(len(encoded[i][0]) for i in ids)
    x = torch.full((len(ids), n), pad_id, dtype=torch.long)
    w = torch.zeros((len(ids), n))
    att = torch.zeros((len(ids), n), dtype=torch.long)
    for r, i in enumerate(ids):
        toks, t0 = encoded[i]
        x[r, : len(toks)] = torch.tensor(toks)
        att[r, : len(toks)] = 1
        w[r, 1:t0] = prompt_w  # weight of predicting token j (j >= 1)
        w[r, t0: len(toks)] = 1.0
    return x, att, w


def weighted_loss(model, x, att, w):
    logits = model(input_ids=x, attention_mask=att).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                            reduction="none").view(x.size(0), -1)
    ww = w[:, 1:]
    return (nll * ww).sum() / ww.sum(), nll, ww


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, tokenizer, val: list[Example], val_enc, batch_size: int) -> dict:
    """NLL of the real action (target + eos) per token and per character, by example kind."""
    model.eval()
    sums: dict[str, list[float]] = {}
    for i in range(0, len(val), batch_size):
        ids = list(range(i, min(i + batch_size, len(val))))
        dev = next(model.parameters()).device
        x, att, w = (t.to(dev) for t in collate(val_enc, ids, tokenizer.pad_token_id, 0.0))
        _, nll, ww = weighted_loss(model, x, att, w)
        per_ex = (nll * ww).sum(1)
        for r, j in enumerate(ids):
            s = sums.setdefault(val[j].kind, [0.0, 0.0, 0.0])
            s[0] += per_ex[r].item()
            s[1] += ww[r].sum().item()
            s[2] += len(val[j].target) + 1  # +1: the end of the action
    model.train()
    out = {k: {"nll_per_token": v[0] / v[1], "nll_per_char": v[0] / v[2], "n": 0} for k, v in sums.items()}
    for ex in val:
        out[ex.kind]["n"] += 1
    pol = [v for k, v in sums.items() if k.startswith("policy")]
    out["policy"] = {"nll_per_token": sum(v[0] for v in pol) / sum(v[1] for v in pol),
                     "nll_per_char": sum(v[0] for v in pol) / sum(v[2] for v in pol)}
    return out


UNIGRAM_FILE = "unigram_counts.json"


def unigram_counts(tokenizer, train: list[Example]) -> Counter:
    """Token counts of the training actions (target + end): the marginal baseline a model must beat."""
    counts: Counter = Counter()
    targets = [ex.target for ex in train if ex.kind.startswith("policy")]
    for i in range(0, len(targets), 4096):  # batched: the fast tokenizer does a batch in one call
        for ids in tokenizer(targets[i:i + 4096], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    counts[tokenizer.eos_token_id] += len(targets)  # each action ends with eos
    return counts


def unigram_nll(counts: Counter, vocab: int, token_ids: list[int]) -> float:
    """NLL (nats) of a token sequence under the add-one smoothed unigram."""
    total = sum(counts.values())
    return sum(-math.log((counts.get(t, 0) + 1) / (total + vocab)) for t in token_ids)


def unigram_baseline(tokenizer, counts: Counter, val: list[Example]) -> dict:
    nll = toks = chars = 0.0
    for ex in val:
        if ex.kind.startswith("policy"):
            ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            nll += unigram_nll(counts, len(tokenizer), ids)
            toks += len(ids)
            chars += len(ex.target) + 1
    return {"nll_per_token": nll / toks, "nll_per_char": nll / chars}


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(ckpt: Path, model, opt, step: int, history: list[dict]) -> None:
    """Atomic (mfllm.files.atomic_dir: a temp folder renamed over the old one). Safetensors + JSON, no pickle."""
    from safetensors.torch import save_file

    with atomic_dir(ckpt) as tmp:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        state = {}
        for k, st in opt.state_dict()["state"].items():
            for name, t in st.items():
                state[f"{k}.{name}"] = t if torch.is_tensor(t) else torch.tensor(t)
        save_file(state, str(tmp / "optimizer.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({"step": step, "history": history}))


def load_checkpoint(ckpt: Path, model_cls, opt_factory):
    from safetensors.torch import load_file

    model = model_cls.from_pretrained(ckpt / "model", use_safetensors=True, dtype=torch.float32)
    opt = opt_factory(model)
    sd = opt.state_dict()
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    for key, t in flat.items():
        k, name = key.split(".", 1)
        sd["state"].setdefault(int(k), {})[name] = t
    opt.load_state_dict(sd)
    prog = json.loads((ckpt / "progress.json").read_text())
    return model, opt, prog["step"], prog["history"]


# ----------------------------------------------------------------------------- main


def train_mini(cfg: MiniConfig, progress=True, loading=None) -> dict:
    """Train (or continue training) mfllm-mini; returns training_info.json. ``loading``: see prepare_examples."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(cfg.seed)

    ex_path = Path(cfg.examples) if cfg.examples else work / "examples.jsonl.gz"
    if not ex_path.exists():
        prepare_examples(cfg, ex_path, loading)
    train, val, data_info = read_examples(ex_path)

    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        rng = random.Random(cfg.seed)
        sample = rng.sample(train, min(30000, len(train)))
        tokenizer = train_tokenizer([e.prompt + e.target for e in sample], cfg.vocab_size)
        with atomic_dir(tok_dir) as tmp_tok:  # a kill never leaves a torn tokenizer
            tokenizer.save_pretrained(tmp_tok)

    train_enc = [encode(tokenizer, e) for e in train]
    keep = [i for i, (t, _) in enumerate(train_enc) if len(t) <= cfg.max_len]
    data_info["dropped_too_long"] = len(train) - len(keep)
    train = [train[i] for i in keep]
    train_enc = [train_enc[i] for i in keep]
    val = [e for e in val if len(encode(tokenizer, e)[0]) <= cfg.max_len]
    val_enc = [encode(tokenizer, e) for e in val]

    mcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=cfg.max_len, tie_word_embeddings=True, rope_theta=10000.0,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)

    def opt_factory(m):
        decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in m.named_parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    ckpt = work / "checkpoint"
    recover_dir(ckpt)  # killed between save_checkpoint's renames
    if (ckpt / "progress.json").exists():
        model, opt, start, history = load_checkpoint(ckpt, LlamaForCausalLM, opt_factory)
    else:
        model = LlamaForCausalLM(mcfg)
        opt = opt_factory(model)
        start, history = 0, []
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model.to(device)
    if start:  # optimizer state was loaded on the CPU
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v):
                    st[k] = v.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    # the whole batch order is fixed by the seed, so a resumed run sees the same batches
    brng = random.Random(cfg.seed + 2)
    lengths = [len(t) for t, _ in train_enc]
    order: list[list[int]] = []
    while len(order) < cfg.steps:
        order += make_batches(lengths, cfg.batch_size, brng)

    def lr_at(s: int) -> float:
        if s < cfg.warmup_steps:
            return cfg.lr * (s + 1) / cfg.warmup_steps
        frac = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    tokens_seen = sum(h.get("tokens", 0) for h in history[-1:]) if history else 0
    t_train = time.time()
    last_eval = None  # the last step's validation is the final one (the model does not change after it)
    with Progress(TextColumn("[bold]train mini"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, info="")
        for s in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(s)
            x, att, w = (t.to(device) for t in collate(train_enc, order[s], tokenizer.pad_token_id,
                                                       cfg.prompt_loss_weight))
            loss, _, _ = weighted_loss(model, x, att, w)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += int(att.sum())
            row = {"step": s + 1, "train_loss": round(loss.item(), 4), "lr": lr_at(s), "tokens": tokens_seen}
            if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
                ev = last_eval = evaluate(model, tokenizer, val, val_enc, 32)
                row["val_action_nll_per_token"] = round(ev["policy"]["nll_per_token"], 4)
            history.append(row)
            bar.update(task, advance=1, info=f"loss {loss.item():.3f}"
                       + (f" val {row['val_action_nll_per_token']:.3f}" if "val_action_nll_per_token" in row else ""))
            if (s + 1) % cfg.ckpt_every == 0 and s + 1 < cfg.steps:
                save_checkpoint(ckpt, model, opt, s + 1, history)
    train_seconds = time.time() - t_train

    final = last_eval if last_eval is not None else evaluate(model, tokenizer, val, val_enc, 32)
    _note(progress, f"train mini: unigram baseline over {len(train):,} training examples, then saving the model")
    counts = unigram_counts(tokenizer, train)
    base = unigram_baseline(tokenizer, counts, val)
    model.config.dtype = "float16"  # halves the checkpoint; backends load it as float32 on CPU
    model.to("cpu").half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / UNIGRAM_FILE, {str(k): v for k, v in sorted(counts.items())}, indent=None)
    write_curves(out, history)
    info = {"config": asdict(cfg), "data": data_info, "parameters": n_params, "tokens_seen": tokens_seen,
            "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
            "threads": torch.get_num_threads(), "device": str(device), "val": final, "unigram_baseline": base}
    atomic_write_json(out / "training_info.json", info)
    shutil.rmtree(work, ignore_errors=True)
    return info


def _note(progress: bool, text: str) -> None:
    """One line on stderr between the bar's phases (so that the end of a run is never silent)."""
    if progress:
        print(text, file=sys.stderr, flush=True)


def write_curve_csv(path: Path, keys: list[str], rows: list[dict]) -> None:
    """A training curve as CSV: one row per logged step, blank where a step has no value."""
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        for h in rows:
            wr.writerow({k: h.get(k, "") for k in keys})


def write_curves(out: Path, history: list[dict]) -> None:
    write_curve_csv(out / "loss_curve.csv", ["step", "train_loss", "val_action_nll_per_token", "lr", "tokens"],
                    history)
    from mfllm import plotting as P  # imports matplotlib on first use

    fig, (ax,) = P.figure(1, cols=1, panel=(5.0, 3.0), legend_width=1.7, key=False, title="mfllm-mini: loss")
    ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], lw=0.8, label="train loss (weighted)")
    ev = [h for h in history if "val_action_nll_per_token" in h]
    ax.plot([h["step"] for h in ev], [h["val_action_nll_per_token"] for h in ev], "o-", label="val action NLL/token")
    P.style_axes(ax, "step", "nats")
    P.legend(ax)
    P.save(fig, out / "loss_curve.png")
