"""A tiny but real causal LM for tests: a BPE tokenizer trained on synthetic Chinese text and a randomly
initialised ``LlamaForCausalLM`` (hidden 64, 2 layers), saved with ``save_pretrained`` (safetensors).

Nothing is downloaded. Building one takes well under a second. Use the session fixture::

    from helpers.tiny_model import tiny_model_dir  # noqa: F401  (pytest fixture)

    def test_x(tiny_model_dir): ...

or call :func:`make_tiny_model` / :func:`make_tiny_lora` directly.
"""

from __future__ import annotations

import random
from pathlib import Path

try:  # the helpers also serve scripts/ on machines without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

PHRASES = [
    "今天",
    "微博",
    "谣言",
    "网友",
    "转发",
    "评论",
    "政府",
    "回应",
    "真相",
    "事件",
    "大家",
    "支持",
    "反对",
    "不信",
    "求证",
    "辟谣",
    "震惊",
    "心疼",
    "加油",
    "关注",
    "希望",
    "警方",
    "通报",
    "视频",
    "照片",
    "医院",
    "学校",
    "孩子",
    "地震",
    "台风",
    "消息",
    "官方",
    "媒体",
    "记者",
    "我们",
    "他们",
    "什么",
    "为什么",
    "怎么",
    "真的",
    "假的",
    "已经",
    "还是",
    "没有",
    "可以",
    "不要",
    "一定",
    "太",
    "了",
    "的",
    "是",
    "在",
    "吗",
    "啊",
    "呢",
    "吧",
    "好",
    "不",
    "很",
    "都",
]
PUNCT = ["，", "。", "！", "？", "：", "、", " ", "#", "@", "…"]
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


def chinese_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` synthetic weibo-like Chinese strings (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(4, 14)):
            parts.append(rng.choice(PHRASES))
            if rng.random() < 0.3:
                parts.append(rng.choice(PUNCT))
        if rng.random() < 0.2:
            parts.append(str(rng.randint(0, 2024)))
        out.append("".join(parts))
    return out


def make_tiny_tokenizer(vocab_size: int = 600, seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <pad>, <s>, </s> (never an unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(chinese_corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIALS["pad"],
        bos_token=SPECIALS["bos"],
        eos_token=SPECIALS["eos"],
    )


def make_tiny_model(
    path: str | Path,
    seed: int = 0,
    vocab_size: int = 600,
    init_range: float = 0.1,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
) -> Path:
    """Write a tokenizer + random Llama (safetensors) to ``path``; return the path. The defaults give the tiny
    test model (hidden 64, 2 layers); scripts pass bigger sizes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab_size=vocab_size, seed=seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_lora(model_dir: str | Path, out_dir: str | Path, seed: int = 1, r: int = 4) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model, saved with peft (safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random A and B: the adapter really changes the outputs
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the effect large enough to change greedy tokens
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(str(out_dir))
    return out_dir


if pytest is not None:

    @pytest.fixture(scope="session")
    def tiny_model_dir(tmp_path_factory) -> Path:
        return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))
