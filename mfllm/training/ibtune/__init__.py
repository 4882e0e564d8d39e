"""IB-Tune: fine-tune the mean-field model (stage 1) and the policy (stage 2) with LoRA adapters.

Both roles are adapters on ONE base causal LM ("meanfield", "policy"), saved in the peft format
(``adapter_config.json`` + ``adapter_model.safetensors``) so ``HFBackend(model, adapters={...})`` and
vLLM's ``LoRARequest`` load them. Every prompt is rendered with the inference templates
(``meanfield_prompt``, ``policy_prefix`` + ``policy_suffix``, the methods' context code), so a tuned
model is asked exactly what it was trained on.

Modules, by role: :mod:`.config` (TuneConfig), :mod:`.roles` (the base model and its role adapters),
:mod:`.tokens` (sampling through the HF backend's decoding loop; scoring with and without gradients),
:mod:`.examples` (stage 1's units, stage 2's examples), :mod:`.meanfield_stage` (stage 1: the estimator,
written out there), :mod:`.policy_stage` (stage 2: SFT), :mod:`.loop` (the shared training loop),
:mod:`.curves`, :mod:`.plan` (``ib_tune``: both stages).

Resumable: each stage keeps an atomic checkpoint (trainable tensors and optimizer state in
safetensors, progress in JSON; ``mini.save_checkpoint``) and its data in ``OUT/_work``; rerun the same
command after an interruption. Seeds are derived per step and per sample, so a resumed run draws the
same samples as an uninterrupted one.
"""

from mfllm.training.ibtune.config import ROLES, TuneConfig, replace_cfg
from mfllm.training.ibtune.examples import (
    PolicyExample,
    Unit,
    build_policy_examples,
    build_units,
    event_steps,
    meanfield_chain,
    policy_targets,
    sample_events,
)
from mfllm.training.ibtune.loop import is_done
from mfllm.training.ibtune.meanfield_stage import (
    evaluate_meanfield,
    mf_policy_prompt,
    prior_prompt,
    score_reward,
    stage1_step,
    train_meanfield,
)
from mfllm.training.ibtune.plan import IBTunePlan, ib_tune
from mfllm.training.ibtune.policy_stage import encode_examples, evaluate_policy, sft_step, train_policy
from mfllm.training.ibtune.roles import Roles
from mfllm.training.ibtune.tokens import Sample, encode_targets, generate, seq_logprobs

__all__ = [
    "ROLES", "IBTunePlan", "PolicyExample", "Roles", "Sample", "TuneConfig", "Unit", "build_policy_examples",
    "build_units", "encode_examples", "encode_targets", "evaluate_meanfield", "evaluate_policy", "event_steps",
    "generate", "ib_tune", "is_done", "meanfield_chain", "mf_policy_prompt", "policy_targets", "prior_prompt", "replace_cfg",
    "sample_events", "score_reward", "seq_logprobs", "sft_step", "stage1_step", "train_meanfield", "train_policy",
]
