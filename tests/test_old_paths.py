"""Issue 23 moved the trainer's pieces into rooms named for what they hold; every old import path still works
and gives the very same object."""

from __future__ import annotations

import importlib

import pytest

MOVED = [
    ("klbelt.rl.rollout", "Rollout", "klbelt.rl.sampling"),
    ("klbelt.rl.rollout", "sample", "klbelt.rl.sampling"),
    ("klbelt.rl.rollout", "filter_logits", "klbelt.rl.sampling"),
    ("klbelt.rl.rollout", "inverse_cdf", "klbelt.rl.sampling"),
    ("klbelt.rl.rollout", "response_logprobs", "klbelt.rl.scoring"),
    ("klbelt.rl.rollout", "response_logits", "klbelt.rl.scoring"),
    ("klbelt.rl.rollout", "entropy_from_logits", "klbelt.rl.scoring"),
    ("klbelt.rl.rollout", "fused_head", "klbelt.rl.scoring"),
    ("klbelt.rl.rollout", "set_fused_head", "klbelt.rl.scoring"),
    ("klbelt.rl.rollout", "position_ids", "klbelt.rl.hf"),
    ("klbelt.rl.rollout", "last_positions", "klbelt.rl.hf"),
    ("klbelt.rl.rollout", "unwrap", "klbelt.rl.hf"),
    ("klbelt.rl.lora", "Reference", "klbelt.rl.scoring"),
    ("klbelt.rl.lora", "autocast", "klbelt.rl.precision"),
    ("klbelt.rl.lora", "resolve_bf16", "klbelt.rl.precision"),
    ("klbelt.rl.lora", "bf16_supported", "klbelt.rl.precision"),
    ("klbelt.rl.lora", "hold_base_in_bf16", "klbelt.rl.precision"),
    ("klbelt.rl.lora", "restore_fp32", "klbelt.rl.precision"),
    ("klbelt.rl.lora", "bf16_matmul_weights", "klbelt.rl.precision"),
    ("klbelt.rl.lora", "is_lora", "klbelt.rl.hf"),
    ("klbelt.rl.lora", "adapters_disabled", "klbelt.rl.hf"),
    ("klbelt.rl.lora", "policy_state", "klbelt.rl.run_state"),
    ("klbelt.rl.lora", "load_policy_state", "klbelt.rl.run_state"),
    ("klbelt.rl.samplers", "make_sampler", "klbelt.rl.sampling"),
    ("klbelt.rl.samplers", "SAMPLERS", "klbelt.rl.sampling"),
    ("klbelt.rl.samplers", "bf16_sample", "klbelt.rl.sampling"),
    ("klbelt.rl.samplers", "RolloutCorrection", "klbelt.rl.importance"),
    ("klbelt.rl.samplers", "mismatch_metrics", "klbelt.rl.importance"),
    ("klbelt.rl.samplers", "filtered_mass", "klbelt.rl.importance"),
    ("klbelt.rl.samplers", "CORRECTIONS", "klbelt.rl.importance"),
    ("klbelt.rl.update", "Advantages", "klbelt.rl.advantages"),
    ("klbelt.rl.update", "KLInReward", "klbelt.rl.losses"),
    ("klbelt.rl.update", "KLInLoss", "klbelt.rl.losses"),
    ("klbelt.rl.update", "kl_placement", "klbelt.rl.losses"),
    ("klbelt.rl.update", "optimizer_step", "klbelt.rl.precision"),
    ("klbelt.rl.update", "call_reward", "klbelt.rl.reward_model"),
    ("klbelt.rl.update", "RewardFn", "klbelt.rl.reward_model"),
    ("klbelt.rl.update", "weigh", "klbelt.rl.advantages"),
    ("klbelt.rl.run_state", "read_steps_before", "klbelt.rl.run_files"),
    ("klbelt.rl.run_state", "replay_monitor", "klbelt.rl.run_files"),
    ("klbelt.rl.run_state", "CHECKPOINT_FILE", "klbelt.rl.run_files"),
    ("klbelt.rl.merged_sampler", "MergedCopySampler", "klbelt.rl.sampling.merged"),
    ("klbelt.rl.merged_sampler", "PackedLinear", "klbelt.rl.sampling.merged"),
    ("klbelt.rl.merged_sampler", "CastEmbedding", "klbelt.rl.sampling.merged"),
    ("klbelt.rl.merged_sampler", "merged_tensors", "klbelt.rl.sampling.merged"),
    ("klbelt.rl.merged_sampler", "packing_available", "klbelt.rl.sampling.merged"),
    ("klbelt.rl.lean_decode", "LeanDecoder", "klbelt.rl.sampling.lean"),
    ("klbelt.rl.lean_decode", "unsupported", "klbelt.rl.sampling.lean"),
    ("klbelt.rl.lean_decode", "bind_modules", "klbelt.rl.sampling.lean"),
    ("klbelt.rl.graph_decode", "GraphDecoder", "klbelt.rl.sampling.graph"),
    ("klbelt.rl.graph_decode", "CAPACITY_STEP", "klbelt.rl.sampling.graph"),
    ("klbelt.rl.vllm_sampler", "VLLMSampler", "klbelt.rl.sampling.vllm"),
    ("klbelt.rl.vllm_sampler", "merged_state_dict", "klbelt.rl.sampling.vllm"),
    ("klbelt.rl.vllm_sampler", "ENV_PYTHON", "klbelt.rl.sampling.vllm"),
    ("klbelt.rl.vllm_worker", "main", "klbelt.rl.sampling.vllm_worker"),
    ("klbelt.rl", "make_controller", "klbelt.rl.run_state"),
    ("klbelt.rl", "sample", "klbelt.rl.sampling"),
    ("klbelt.rl", "Rollout", "klbelt.rl.sampling"),
    ("klbelt.rl", "response_logprobs", "klbelt.rl.scoring"),
    ("klbelt.rl.trainer", "TrainingError", "klbelt.rl.update"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_the_old_path_gives_the_object_of_the_new_one(old, name, new):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_the_vllm_worker_file_the_sampler_starts_is_where_it_looks():
    from klbelt.rl.sampling.vllm import WORKER

    assert WORKER.is_file() and WORKER.parent.name == "sampling"
