"""klbelt inside a hand-written PPO/GRPO-style loop on torch.distributed (DDP).

    torchrun --nproc-per-node 2 examples/ddp_custom_loop.py

gloo on CPU, NCCL when CUDA is present. The model is a tiny randomly initialised
GPT-2 built here, and the "rollout" is random tokens: the point is where each
klbelt call goes, and two checks that it is right across ranks:
  1. the DDP gradient equals the single-process gradient on the whole global batch;
  2. every rank ends each step with the same beta.
"""

import copy
import os
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import GPT2Config, GPT2LMHeadModel

import klbelt

VOCAB, BATCH, SEQ, STEPS, CLIP = 64, 4, 12, 3, 0.2


def loss_fn(model, ref, batch, beta, group, world):
    """PPO clipped surrogate + beta * k3 (GRPO's KL-in-loss), one global token-mean."""
    tokens, mask, adv, old_lp = batch
    # policy log-probs: fp32 whatever the logits' dtype (no full log-softmax is held)
    logprobs = klbelt.logprobs_from_logits(model(tokens).logits[:, :-1], tokens[:, 1:])
    with torch.no_grad():  # the reference is frozen: no graph, no gradient
        ref_lp = klbelt.logprobs_from_logits(ref(tokens).logits[:, :-1], tokens[:, 1:])
    ratio = torch.exp(logprobs - old_lp)
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv)
    kl = klbelt.kl_per_token(logprobs, ref_lp, "k3")  # as a loss: gradient of KL(ref||pi)
    # Global sum / global token count over all ranks (NOT a mean of per-rank means:
    # ranks hold different numbers of tokens). Gradients flow to this rank's tokens
    # with the global denominator; DDP then *averages* gradients over ranks, so we
    # multiply by the world size to get exactly the global-batch gradient.
    loss = klbelt.aggregate(pg + beta * kl, mask, "token-mean", group=group) * world
    return loss, kl.detach()


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    torch.manual_seed(0)  # same weights on every rank (DDP also broadcasts rank 0's)
    # dropout off: with it, the same weights give different log-probs in the policy, the
    # reference and the rollout, and the KL is not 0 where it should be
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref = GPT2LMHeadModel(config).to(device).eval().requires_grad_(False)
    policy = DDP(copy.deepcopy(ref).requires_grad_(True), device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    # One controller per rank; they stay equal because they see the same global KL.
    controller = klbelt.AdaptiveKLController(0.1, target_kl=0.02, unit="token-mean")
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank

    for step in range(STEPS):
        # Rollout stand-in: ragged responses, so ranks hold different token counts.
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(device)
        lengths = torch.randint(2, SEQ, (BATCH, 1), generator=gen).to(device)
        mask = torch.arange(SEQ - 1, device=device) < lengths
        adv = torch.randn(BATCH, 1, generator=gen).to(device)
        with torch.no_grad():
            old_lp = klbelt.logprobs_from_logits(policy(tokens).logits[:, :-1], tokens[:, 1:])
        batch = (tokens, mask, adv, old_lp)
        if step == 0:  # a snapshot for check 1, before the update
            single = copy.deepcopy(policy.module)
        beta = controller.kl_coef
        opt.zero_grad()
        loss, kl = loss_fn(policy, ref, batch, beta, group, world)
        loss.backward()  # DDP all-reduces (averages) gradients here

        if step == 0:  # check 1: the same loss on one process over the concatenated batch
            full = [torch.cat(gather(x, world)) for x in batch]
            ref_loss, _ = loss_fn(single, ref, full, beta, group=None, world=1)
            ref_loss.backward()
            for (name, p), q in zip(policy.module.named_parameters(), single.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
            if rank == 0:
                print(f"DDP gradient == single-process gradient on the global batch ({world} ranks)")
        opt.step()

        # The controller's input: one all-reduce of (sum, count), so every rank gets
        # the same float64 number and therefore computes the same next beta.
        observed = klbelt.global_observed_kl(kl[mask].sum(), mask.sum(), group)
        controller.update(observed, n_steps=BATCH * world)
        if rank == 0:  # only rank 0 prints / writes logs
            print(f"step {step}: kl {float(observed):.5f} nats/token (global), "
                  f"beta {beta:.4f} -> {controller.kl_coef:.4f}")

    # check 2: all ranks hold the identical beta
    betas = gather(torch.tensor([controller.kl_coef], dtype=torch.float64, device=device), world)
    assert all(torch.equal(b, betas[0]) for b in betas), betas
    # the controller's state goes into the checkpoint (JSON-able), written by rank 0 only
    ckpt = {"model": policy.module.state_dict(), "optimizer": opt.state_dict(),
            "kl_controller": controller.state_dict()}
    if rank == 0:
        path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        torch.save(ckpt, path)
        resumed = klbelt.AdaptiveKLController()
        resumed.load_state_dict(torch.load(path, weights_only=False)["kl_controller"])
        assert resumed.kl_coef == controller.kl_coef
        print(f"beta identical on {world} ranks: {controller.kl_coef:.6f}; controller state restored from checkpoint")
    dist.barrier()  # let rank 0 finish writing before any rank tears the group down
    del policy  # free DDP's reducer while its process group is alive (else exit can hang)
    dist.destroy_process_group()


def gather(x, world):
    """Every rank's tensor ``x`` (same shape on every rank), in rank order."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return parts


if __name__ == "__main__":
    main()
