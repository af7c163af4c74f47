"""Overhead of KLMonitor.log_step (exact KL on / off) as a share of a trainer step at N x V logits.

The trainer step is the part of a PPO step that scales with the logits: the
forward and backward of an LM head ``hidden [N, H] @ W [H, V]`` producing the
policy logits, the log-probs of the sampled tokens (``logprobs_from_logits``)
and a policy-gradient loss; a real model adds its transformer on top, so the
percentages here are upper bounds. Monitoring "off" is ``log_step`` with the
per-token KL, mask, beta and rewards (statistics on device, one transfer,
rules, a JSONL line); "on" adds the exact KL from the policy and reference
logits (``kl_from_logits``). Every figure is the median of ``--repeats`` runs
measured in this process.
"""

from __future__ import annotations

DESCRIPTION = "KLMonitor.log_step overhead (exact KL on/off) vs a trainer step at 2048 x 32000 logits"


def add_arguments(parser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="N: tokens per step (rows of the logits)")
    parser.add_argument("--vocab", type=int, default=32000, help="V: vocabulary size")
    parser.add_argument("--hidden", type=int, default=1024, help="H: hidden size of the LM head")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (N must divide by it)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per block for the exact KL")


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def run(args) -> int:
    import tempfile
    import time

    import torch

    from klbelt import kl_per_token, logprobs_from_logits
    from klbelt.monitor import KLMonitor

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n, v, h, b = args.tokens, args.vocab, args.hidden, args.batch
    if n % b:
        print(f"klbelt bench monitor: --tokens ({n}) must be divisible by --batch ({b})")
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device)
    weight = (torch.randn(h, v, generator=g) / h**0.5).to(device).requires_grad_(True)
    ref_weight = weight.detach() + 0.01 * torch.randn(h, v, generator=g).to(device)
    tokens = torch.randint(0, v, (n,), generator=g).to(device)
    with torch.no_grad():
        ref_logits = hidden @ ref_weight
        ref_logprobs = logprobs_from_logits(ref_logits, tokens)
    mask = torch.ones(b, n // b, device=device)
    mask[:, -3:] = 0  # some padding
    scores = torch.randn(b, generator=g).to(device)
    adv = torch.randn(n, generator=g).to(device)

    def trainer_step():
        weight.grad = None
        logits = hidden @ weight
        logprobs = logprobs_from_logits(logits, tokens)
        loss = -(adv * logprobs).mean()
        loss.backward()
        return logits.detach(), logprobs.detach()

    logits, logprobs = trainer_step()
    kl = kl_per_token(logprobs, ref_logprobs, "k3").reshape(b, n // b)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = KLMonitor(tmp, warn=False, exact_chunk_size=args.chunk_size)
        shape = (b, n // b, v)

        def off(step):
            monitor.log_step(step, kl=kl, mask=mask, kl_coef=0.05, reward=scores)

        def on(step):
            monitor.log_step(
                step, kl=kl, mask=mask, kl_coef=0.05, reward=scores,
                logits=logits.reshape(shape), ref_logits=ref_logits.reshape(shape),
            )

        def timed(fn):
            out = []
            for i in range(args.repeats + 1):  # the first call warms up
                sync()
                t = time.perf_counter()
                fn(i)
                sync()
                out.append(time.perf_counter() - t)
            return _median(out[1:])

        t_step = timed(lambda i: trainer_step())
        t_off = timed(off)
        t_on = timed(on)
        monitor.close()
    print(f"klbelt bench monitor: N={n} tokens x V={v}, LM head H={h}, {b} sequences, fp32, {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"  trainer step (LM head fwd+bwd + log-probs): {t_step * 1e3:9.2f} ms")
    print(f"  log_step, exact KL off:                    {t_off * 1e3:9.2f} ms = {100 * t_off / t_step:6.3f} % "
          "of the step (target < 0.5 %)")
    print(f"  log_step, exact KL on:                     {t_on * 1e3:9.2f} ms = {100 * t_on / t_step:6.3f} % "
          "of the step (target < 2 %)")
    return 0
