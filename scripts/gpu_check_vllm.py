#!/usr/bin/env python3
"""GPU check for the local backends (run on a machine with a GPU; a few minutes).

    python scripts/gpu_check_vllm.py [--model DIR] [--out results.json]

Without --model it builds a random Llama (hidden 1024, 8 layers) with the test tokenizer: outputs are
gibberish, but timings, cache hits and equality checks are real.

Sections:
  hf    HFBackend on CUDA, float32 and bfloat16: tokens equal with/without shared-prefix reuse, alone vs in a
        batch, chunked; prefill speed-up from prefix reuse; generation throughput.
  vllm  (if vLLM is installed) VLLMBackend: generation, seeded determinism, prefix-caching hit rate
        (num_cached_tokens / prompt tokens), LoRA switching (two random adapters made with peft), throughput.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.tiny_model import chinese_corpus, make_tiny_lora, make_tiny_model  # noqa: E402

from mfllm.backends.base import GenerationRequest, SamplingParams  # noqa: E402


def workload(n: int, max_new: int, temperature: float, seed0: int = 0) -> list[GenerationRequest]:
    corpus = chinese_corpus(400 + n, seed=7)
    prefix = (
        "系统：你是一名微博用户。请根据事件和大家的看法写一条评论。事件："
        + "".join(corpus[:25])
        + "你的状态："
    )
    params = SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=max_new)
    return [GenerationRequest(prefix + corpus[400 + i], seed=seed0 + i, params=params) for i in range(n)]


def same(a, b) -> float:
    return sum(x.text == y.text for x, y in zip(a, b, strict=True)) / max(1, len(a))


def timed(fn, *args):
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t


def check_hf(model_dir: Path, n: int, max_new: int, device: str = "cuda") -> dict:
    import torch

    from mfllm.backends.hf import HFBackend

    res: dict = {}
    for dtype in ("float32", "bfloat16"):
        be = HFBackend(model_dir, device=device, dtype=dtype, batch_size=64)
        r: dict = {}
        for name, temp in (("greedy", 0.0), ("sampled", 1.0)):
            reqs = workload(n, max_new, temp)
            be.generate(reqs[:8])  # warm-up
            be.prefix_cache = True
            with_prefix, t_prefix = timed(be.generate, reqs)
            be.prefix_cache = False
            plain, t_plain = timed(be.generate, reqs)
            alone = [be.generate([q])[0] for q in reqs[:16]]
            be.prefix_cache = True
            be.batch_size = 7
            chunked = be.generate(reqs)
            be.batch_size = 64
            gen = sum(c.generated_tokens for c in with_prefix)
            r[name] = {
                "equal_prefix_vs_plain": same(with_prefix, plain),
                "equal_alone_vs_batch": same(alone, with_prefix[:16]),
                "equal_chunked7_vs_batch64": same(chunked, with_prefix),
                "seconds_prefix": round(t_prefix, 3),
                "seconds_plain": round(t_plain, 3),
                "gen_tokens_per_s_prefix": round(gen / t_prefix, 1),
                "gen_tokens_per_s_plain": round(gen / t_plain, 1),
            }
        one = [
            GenerationRequest(q.prompt, seed=q.seed, params=SamplingParams(max_new_tokens=1))
            for q in workload(n, 1, 1.0)
        ]
        be.prefix_cache = True
        _, t1 = timed(be.generate, one)
        be.prefix_cache = False
        _, t0 = timed(be.generate, one)
        r["prefill_seconds"] = {"prefix": round(t1, 4), "plain": round(t0, 4), "speedup": round(t0 / t1, 2)}
        r["prompt_tokens_avg"] = round(sum(len(x) for x in be.encode([q.prompt for q in one])) / n, 1)
        res[dtype] = r
        print(json.dumps({"hf": {dtype: r}}, ensure_ascii=False), flush=True)
        del be  # free GPU memory before the next dtype
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res


def check_vllm(model_dir: Path, n: int, max_new: int, tmp: Path) -> dict:
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    from mfllm.backends.vllm_engine import VLLMBackend

    adapters = {}
    if importlib.util.find_spec("peft") is not None:
        adapters = {
            "policy": str(make_tiny_lora(model_dir, tmp / "lora_policy", seed=1, r=8)),
            "meanfield": str(make_tiny_lora(model_dir, tmp / "lora_meanfield", seed=2, r=8)),
        }
    be = VLLMBackend(
        str(model_dir), enable_prefix_caching=True, adapters=adapters or None, gpu_memory_utilization=0.5
    )
    r: dict = {}
    reqs = workload(n, max_new, 1.0)
    a, t = timed(be.generate, reqs)
    b = be.generate(reqs)
    alone = [be.generate([q])[0] for q in reqs[:8]]
    gen = sum(c.generated_tokens for c in a)
    r["generation"] = {
        "seconds": round(t, 3),
        "gen_tokens_per_s": round(gen / t, 1),
        "equal_rerun": same(a, b),
        "equal_alone_vs_batch": same(alone, a[:8]),
        "empty": sum(not c.text for c in a),
    }
    prompt = sum(c.prompt_tokens for c in b)
    r["prefix_cache_hit_rate"] = round(sum(c.cached_prompt_tokens for c in b) / max(1, prompt), 3)
    if adapters:
        base = be.generate(workload(8, max_new, 0.0))
        outs = {}
        for role in adapters:
            reqs_a = [
                GenerationRequest(q.prompt, seed=q.seed, params=q.params, adapter=role)
                for q in workload(8, max_new, 0.0)
            ]
            outs[role] = be.generate(reqs_a)
        mixed = workload(8, max_new, 0.0)
        for i, q in enumerate(mixed):
            q.adapter = [None, "policy", "meanfield"][i % 3]
        m = be.generate(mixed)
        want = [(base, outs["policy"], outs["meanfield"])[i % 3][i].text for i in range(8)]
        r["lora"] = {
            "policy_differs_from_base": 1 - same(outs["policy"], base),
            "meanfield_differs_from_policy": 1 - same(outs["meanfield"], outs["policy"]),
            "mixed_batch_equal_to_separate": sum(x.text == w for x, w in zip(m, want, strict=True)) / 8,
        }
    sc = be.score([q.prompt for q in reqs[:4]], ["大家加油"] * 4)
    r["score"] = [round(x, 3) for x in sc]
    r["stats"] = be.stats.to_dict()
    print(json.dumps({"vllm": r}, ensure_ascii=False), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--sections", default="hf,vllm")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the hf section")
    args = ap.parse_args()

    import torch
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "vllm": importlib.util.find_spec("vllm") is not None,
    }
    print(json.dumps({"env": env}), flush=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    results: dict = {"env": env}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        model_dir = args.model or make_tiny_model(
            tmp / "model", hidden=1024, layers=8, heads=16, kv_heads=4, init_range=0.02
        )
        sections = args.sections.split(",")
        if "hf" in sections:
            results["hf"] = check_hf(model_dir, args.n, args.max_new, args.device)
        if "vllm" in sections:
            results["vllm"] = check_vllm(model_dir, args.n, args.max_new, tmp)
    if args.out:
        args.out.write_text(json.dumps(results, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
