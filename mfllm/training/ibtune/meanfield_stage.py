"""IB-Tune stage 1: the mean-field model q_theta(m | X).

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

Context: as the HF backend refuses a prompt + max_new_tokens beyond the model's context, a history
whose mean-field prompt + ``mf_max_new_tokens`` does not fit is left out, a policy example longer than
the context is dropped, and no sampled m runs past the context.

Cost: the K summaries of a history share its prompt, and the |Y| scored actions of one (history, m)
share the policy prompt up to the agent's state; each shared token prefix is run once (in sampling,
scoring and the gradient pass).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from mfllm.data.schema import Event
from mfllm.errors import ConfigError
from mfllm.files import atomic_write_json
from mfllm.prompts.templates import meanfield_prompt, policy_prefix, policy_suffix, strings
from mfllm.seeds import derive_seed
from mfllm.simulation.history import History
from mfllm.simulation.methods import make_method
from mfllm.training.ibtune.config import TuneConfig
from mfllm.training.ibtune.curves import write_meanfield_curves
from mfllm.training.ibtune.examples import (
    Unit,
    build_units,
    load_json_gz,
    policy_targets,
    save_json_gz,
    stage_events,
)
from mfllm.training.ibtune.loop import finish_stage, last_val, prepare_work, stage_roles, train_loop
from mfllm.training.ibtune.roles import Roles
from mfllm.training.ibtune.tokens import encode_targets, generate, seq_logprobs


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
        tgt = encode_targets(tok, policy_targets([a for _, a in u.targets], cfg), roles.eos_id)
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


def train_meanfield(cfg: TuneConfig, train_events: list[Event] | None = None, val_events: list[Event] | None = None,
                    *, progress: bool = True) -> dict:
    """Stage 1: IB-Tune the mean-field adapter. Writes the adapter, curves and training_info.json to cfg.out."""
    cfg.check("meanfield")
    t_start = time.time()
    work = prepare_work(cfg, "meanfield")
    roles, policy_role = stage_roles(cfg, "meanfield", "policy", cfg.policy_adapter)

    data_path = work / "units.json.gz"
    t_data = time.time()
    data_info: dict = {"dropped_too_long": 0}
    if data_path.exists():
        d = load_json_gz(data_path)
        units = [Unit(**u) for u in d["train"]]
        val = [Unit(**u) for u in d["val"]]
        data_info = d.get("info", data_info)
    else:
        train_events, val_events = stage_events(cfg, "meanfield", train_events, val_events)
        # the chain uses the untuned summariser (adapter off; stage 1 starts from it)
        units = build_units(train_events, cfg, cfg.steps * cfg.batch_size, random.Random(cfg.seed), roles, None,
                            data_info)
        val = build_units(val_events, cfg, cfg.val_units, random.Random(cfg.seed + 1), roles,
                          None, data_info)
        if not units:
            raise ConfigError("no training history: the events need at least two steps (2 x step_size actions), "
                              f"and a prompt + --max-new-tokens within the model's context ({roles.max_context}); "
                              "try a smaller --step-size or --max-new-tokens")
        save_json_gz(data_path, {"train": [dataclasses.asdict(u) for u in units], "val": [dataclasses.asdict(u) for u in val],
                                  "info": data_info})
    data_seconds = time.time() - t_data

    ref_path = work / "reference.json"
    if ref_path.exists():
        ref = json.loads(ref_path.read_text())
    else:
        ref = {"val_before": evaluate_meanfield(roles, val, cfg, policy_role),
               "val_reference": reference_rewards(roles, val, cfg, policy_role) if val else {},
               "summaries_before": sample_summaries(roles, val, cfg)}
        atomic_write_json(ref_path, ref, indent=None)

    def step_fn(s, batch):
        res = stage1_step(roles, [units[i] for i in batch], cfg, derive_seed(cfg.seed, "train", s),
                          policy_role=policy_role)
        return {**res["metrics"], "surrogate": res["surrogate"]}

    history, seconds, finished = train_loop("meanfield", cfg, roles, len(units), step_fn,
                                             lambda: evaluate_meanfield(roles, val, cfg, policy_role), work, progress)
    info = {"stage": "meanfield", "finished": finished, "config": cfg.model_dump(), "train_units": len(units),
            "val_units": len(val), **data_info, "data_seconds": round(data_seconds, 1), "train_seconds": round(seconds, 1),
            "total_seconds": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
            "device": roles.device, **ref, "val_after": last_val(history), "last_step": history[-1] if history else {},
            "estimator": "REINFORCE, leave-one-out baseline, KL as stop-gradient reward"
                         + (" + pathwise KL term" if cfg.pathwise_kl else "")}
    write_meanfield_curves(Path(cfg.out), history, ref.get("val_before"), ref.get("val_reference"))
    if not finished:
        return info
    info["summaries_after"] = sample_summaries(roles, val, cfg)
    return finish_stage(cfg, roles, "meanfield", info)
