"""klbelt with the policy (and the reference) sharded by FSDP2 (``fully_shard``).

    torchrun --nproc-per-node 2 examples/fsdp_kl.py

FSDP2 runs on CPU with gloo in torch >= 2.6 (checked here on 2.13), so this is
the same script you would launch on GPUs (NCCL is picked when CUDA is present).
What matters for klbelt:
  * logits come out in the compute dtype (bf16 here); ``logprobs_from_logits``
    upcasts block by block and returns fp32, so the KL is not computed in bf16;
  * the reference is sharded too (it is as large as the policy) but frozen, and
    it runs in the *same* precision as the policy, so KL is exactly 0 at step 0;
  * the KL term is reduced with ``aggregate(..., group=)`` and the controller is
    fed ``global_observed_kl``: the same rules as plain DDP.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

import klbelt

VOCAB, BATCH, SEQ, STEPS = 64, 4, 12, 3


def build(config, mp, trainable):
    """A GPT-2 with each block and then the root sharded over all ranks."""
    torch.manual_seed(0)  # identical init on every rank before sharding
    model = GPT2LMHeadModel(config).requires_grad_(trainable)
    for block in model.transformer.h:  # one all-gather per block, not for the whole model
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model if trainable else model.eval()


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda" if cuda else "cpu")
    # dropout off: with it, the same weights give different log-probs in the policy, the
    # reference and the rollout, and the KL is not 0 where it should be
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # bf16 compute, fp32 gradient reduction and fp32 master weights
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with torch.device(device):
        policy, ref = build(config, mp, trainable=True), build(config, mp, trainable=False)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    controller = klbelt.PIDKLController(0.1, target_kl=0.02, unit="token-mean")
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data

    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(device)
        lengths = torch.randint(2, SEQ, (BATCH, 1), generator=gen).to(device)
        mask = torch.arange(SEQ - 1, device=device) < lengths  # ragged: ranks differ in token count
        adv = torch.randn(BATCH, 1, generator=gen).to(device)

        logits = policy(tokens).logits[:, :-1]  # bf16
        logprobs = klbelt.logprobs_from_logits(logits, tokens[:, 1:])  # fp32
        with torch.no_grad():  # every rank must call the sharded ref (its forward all-gathers)
            ref_lp = klbelt.logprobs_from_logits(ref(tokens).logits[:, :-1], tokens[:, 1:])
        if step == 0 and rank == 0:
            print(f"logits {logits.dtype} -> logprobs {logprobs.dtype}")

        # GRPO-style: on-policy surrogate (ratio 1, gradient of logp * A) + beta * k3
        beta = controller.kl_coef
        ratio = torch.exp(logprobs - logprobs.detach())
        kl = klbelt.kl_per_token(logprobs, ref_lp, "k3")
        # global token-mean over all ranks; FSDP's reduce-scatter averages gradients
        # over ranks, hence * world (or policy.set_gradient_divide_factor(1.0) once)
        loss = klbelt.aggregate(-ratio * adv + beta * kl, mask, "token-mean", group=group) * world
        opt.zero_grad()
        loss.backward()
        opt.step()

        observed = klbelt.global_observed_kl(kl.detach()[mask].sum(), mask.sum(), group)
        controller.update(observed)
        losses = [torch.zeros(1, device=device) for _ in range(world)]
        dist.all_gather(losses, loss.detach().float().reshape(1))
        assert all(torch.equal(x, losses[0]) for x in losses)  # aggregate: same value everywhere
        if rank == 0:
            print(f"step {step}: kl {float(observed):.5f} nats/token (global), "
                  f"beta {beta:.4f} -> {controller.kl_coef:.4f}")

    betas = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(betas, torch.tensor([controller.kl_coef], dtype=torch.float64, device=device))
    assert all(torch.equal(b, betas[0]) for b in betas), betas
    if rank == 0:
        # FSDP model state goes through torch.distributed.checkpoint; the controller
        # is a small JSON dict, identical on all ranks: rank 0 saves it beside.
        state = controller.state_dict()
        print(f"beta identical on {world} ranks: {controller.kl_coef:.6f} (state: {sorted(state)})")
    dist.barrier()  # let rank 0 finish writing before any rank tears the group down
    del policy, ref, opt  # free FSDP's state while the process group is alive
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
