"""klbelt's KL and controller inside a DeepSpeed ZeRO engine step.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_kl.py   # CPU, gloo (checked here)
    torchrun --nproc-per-node 8 examples/deepspeed_kl.py                      # GPUs, NCCL

DeepSpeed owns the optimizer step and the gradient reduction; klbelt only
computes the loss and beta. ``ZERO_STAGE`` (env, default 2) picks the stage.
"""

import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers import GPT2Config, GPT2LMHeadModel

import klbelt

VOCAB, BATCH, SEQ, STEPS = 64, 4, 12, 3


def main():
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    # dropout off: the same weights must give the same log-probs in policy and reference
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(config)
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(config).eval().requires_grad_(False)  # frozen, not given to the engine
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,  # engine.backward divides the loss by this
        "zero_optimization": {"stage": int(os.environ.get("ZERO_STAGE", 2))},
        "bf16": {"enabled": not on_cpu},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=policy, optimizer=torch.optim.AdamW(policy.parameters(), lr=1e-2), config=ds_config)
    ref.to(engine.device)
    controller = klbelt.AdaptiveKLController(0.1, target_kl=0.02, unit="token-mean")
    gen = torch.Generator().manual_seed(100 + rank)

    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(engine.device)
        lengths = torch.randint(2, SEQ, (BATCH, 1), generator=gen).to(engine.device)
        mask = torch.arange(SEQ - 1, device=engine.device) < lengths
        adv = torch.randn(BATCH, 1, generator=gen).to(engine.device)

        # logprobs_from_logits upcasts bf16 logits to fp32 (no full log-softmax held)
        logprobs = klbelt.logprobs_from_logits(engine(tokens).logits[:, :-1], tokens[:, 1:])
        with torch.no_grad():
            ref_lp = klbelt.logprobs_from_logits(ref(tokens).logits[:, :-1], tokens[:, 1:])
        beta = controller.kl_coef
        ratio = torch.exp(logprobs - logprobs.detach())
        kl = klbelt.kl_per_token(logprobs, ref_lp, "k3")
        # global token-mean (sum and count over ranks); DeepSpeed averages gradients
        # over the data-parallel ranks, hence * world for the global-batch gradient
        loss = klbelt.aggregate(-ratio * adv + beta * kl, mask, "token-mean", group=group) * world
        engine.backward(loss)
        engine.step()

        observed = klbelt.global_observed_kl(kl.detach()[mask].sum(), mask.sum(), group)
        controller.update(observed, n_steps=BATCH * world)
        if rank == 0:
            print(f"step {step}: kl {float(observed):.5f} nats/token (global), "
                  f"beta {beta:.4f} -> {controller.kl_coef:.4f}")

    betas = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(betas, torch.tensor([controller.kl_coef], dtype=torch.float64))
    assert all(torch.equal(b, betas[0]) for b in betas), betas
    # The controller rides in DeepSpeed's checkpoint as client state:
    #   engine.save_checkpoint(dir, client_state={"kl_controller": controller.state_dict()})
    #   _, client = engine.load_checkpoint(dir); controller.load_state_dict(client["kl_controller"])
    if rank == 0:
        print(f"beta identical on {world} ranks: {controller.kl_coef:.6f} "
              f"(ZeRO stage {ds_config['zero_optimization']['stage']})")


if __name__ == "__main__":
    main()
