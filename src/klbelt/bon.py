"""Best-of-n sampling: RL's simplest rival, and its KL to the reference in closed form.

Best-of-n draws n responses from the reference, scores them with the (proxy)
reward and keeps the best. Its KL to the reference needs no estimator from
samples of the policy: it follows from the distribution of the maximum.

KL here is always per *sequence* (the whole response): nats per sequence, the
unit of klbelt's ``kl_seq``.

The maths (:func:`best_of_n_kl`, :func:`best_of_n_kl_estimate`,
:func:`best_of_n_probs`, :func:`exact_best_of_n_kl`, :func:`fit_gold_vs_kl`)
needs torch only; :func:`best_of_n` samples from a Hugging Face causal LM
with klbelt's sampler (:mod:`klbelt.rl.sampling.policy`), imported when called.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

PROB_SUM_TOL = 1e-6  # |sum(ref_probs) - 1| allowed, absolute


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an integer >= 1, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    return int(n)


def best_of_n_kl(n: int) -> float:
    """The analytic KL(pi_bon || pi_ref) = log n - (n - 1) / n, nats per sequence.

    Exact when the reward is continuous and tie-free under the reference (the
    maximum's quantile then has density n u^(n-1)); for every other reward and
    reference it is an upper bound (Beirami et al. 2024, "Theoretical guarantees
    on the best-of-n alignment policy"). n = 1 gives 0.
    """
    n = _check_n(n)
    return math.log(n) - (n - 1) / n


def best_of_n_kl_estimate(n: int, eps: float) -> float:
    """Beirami et al. 2024's tighter estimate of the best-of-n KL, nats per sequence.

    Section 4 of "Theoretical guarantees on the best-of-n alignment policy"
    (arXiv 2401.01879). With a = (1 - eps)^n::

        KL_hat(n, eps) = a * (log n + (n - 1) log(1 - eps) - (n - 1) / n)
                         + (1 - a) * log((1 - a) / eps)

    In the paper ``eps`` (their epsilon_n) is pi_ref(y|x), the reference
    probability of the response y that best-of-n kept, and the KL estimate is
    the mean of KL_hat over kept responses (a Monte Carlo estimate). The paper
    states it as an estimate, not a bound: 0 <= KL_hat <= log n - (n-1)/n always,
    it tracks the true KL closely in their experiments, and that its mean upper-
    bounds the KL is a conjecture there. The paper assumes distinct rewards;
    with ties, best-of-n's KL is the KL between the laws of the kept reward
    *level*, so pass the reference mass of the kept response's reward level.

    Where it is exact (our derivation, checked in tests/test_bon.py): a reference
    whose top outcome is an atom of mass ``eps`` over a continuous, tie-free rest.
    The atom is kept with probability 1 - a (second term); below it the maximum's
    quantile has density n u^(n-1) on [0, 1 - eps] (first term). ``eps`` in
    [0, 1]: eps = 0 (a probability that underflowed) is the limit
    log n - (n-1)/n, eps = 1 gives 0.
    """
    n = _check_n(n)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"eps must be a probability in [0, 1], got {eps!r}")
    eps = float(eps)
    if eps == 0.0:
        return best_of_n_kl(n)
    log_a = n * math.log1p(-eps) if eps < 1.0 else -math.inf
    a = math.exp(log_a)
    one_minus_a = -math.expm1(log_a)  # no cancellation when eps is tiny (a sequence's probability)
    rest = a * (math.log(n) + (n - 1) * math.log1p(-eps) - (n - 1) / n) if a > 0.0 else 0.0
    top = one_minus_a * (math.log(one_minus_a) - math.log(eps)) if one_minus_a > 0.0 else 0.0
    return rest + top


def _check_dist(ref_probs, rewards) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ref_probs, torch.Tensor):
        ref_probs = torch.as_tensor(ref_probs, dtype=torch.float64)
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if ref_probs.dim() != 1 or rewards.dim() != 1:
        raise ValueError(f"ref_probs and rewards must be 1-D [V], got shapes {tuple(ref_probs.shape)} and {tuple(rewards.shape)}")
    if ref_probs.shape != rewards.shape:
        raise ValueError(f"ref_probs and rewards must have the same length, got {ref_probs.shape[0]} and {rewards.shape[0]}")
    if ref_probs.numel() == 0:
        raise ValueError("ref_probs is empty: need at least one outcome")
    p, r = ref_probs.double(), rewards.double()
    if not torch.isfinite(p).all() or not torch.isfinite(r).all():
        raise ValueError("ref_probs and rewards must be finite (no NaN or inf)")
    if (p < 0).any():
        raise ValueError(f"ref_probs must be >= 0, got a minimum of {float(p.min())}")
    total = float(p.sum())
    if abs(total - 1.0) > PROB_SUM_TOL:
        raise ValueError(f"ref_probs must sum to 1 (tolerance {PROB_SUM_TOL:g}), got {total!r}")
    return p, r


def best_of_n_probs(ref_probs, rewards, n: int) -> torch.Tensor:
    """pi_bon [V], float64: the law of the best of n i.i.d. draws from ``ref_probs`` [V].

    Ties in ``rewards`` [V] are broken uniformly at random among the tied draws.
    With F_le(r) = P_ref(reward <= r), F_lt(r) = P_ref(reward < r) and m(r) the
    reference mass at reward level r, the maximum lands on level r with
    probability F_le^n - F_lt^n, and a tied draw is outcome x with probability
    p(x) / m(r), so::

        pi_bon(x) = p(x) * (F_le(r_x)^n - F_lt(r_x)^n) / m(r_x)

    No sampling. ``ref_probs`` must be >= 0 and sum to 1 (tolerance
    ``PROB_SUM_TOL``), both on the same device, any float dtype.
    """
    n = _check_n(n)
    p, r = _check_dist(ref_probs, rewards)
    levels, level_of = torch.unique(r, sorted=True, return_inverse=True)
    mass = torch.zeros(levels.shape[0], dtype=p.dtype, device=p.device).index_add_(0, level_of, p)
    le = mass.cumsum(0).clamp(max=1.0)
    lt = le - mass
    level_prob = le.pow(n) - lt.clamp(min=0.0).pow(n)
    ratio = torch.where(mass > 0, level_prob / mass.clamp(min=torch.finfo(p.dtype).tiny), torch.zeros_like(mass))
    return p * ratio[level_of]


def exact_best_of_n_kl(ref_probs, rewards, n: int) -> float:
    """Exact KL(pi_bon || pi_ref) of a discrete reference, nats (per sequence if outcomes are sequences).

    ``sum_x pi_bon(x) log(pi_bon(x) / p(x))`` with ``pi_bon`` from
    :func:`best_of_n_probs` (ties broken uniformly at random); outcomes with
    p(x) = 0 are never drawn and contribute nothing. It is at most
    :func:`best_of_n_kl` (n), with equality in the tie-free, continuous limit.
    """
    n = _check_n(n)
    p, _ = _check_dist(ref_probs, rewards)
    q = best_of_n_probs(ref_probs, rewards, n)
    keep = q > 0
    return float((q[keep] * (q[keep].log() - p[keep].log())).sum().clamp(min=0.0))


def pool_curve(proxy: torch.Tensor, gold: torch.Tensor, ns: Sequence[int]) -> list[dict]:
    """Best-of-n reward, gold reward and KL for each n, from a pool of N reference samples per prompt.

    ``proxy``, ``gold``: [P, N] scores of N samples of each of P prompts. Each
    prompt's pool is treated as its reference (N equally likely outcomes), and
    best-of-n from it is computed exactly (:func:`best_of_n_probs`, ties uniform)
    instead of by resampling. Per n, averaged over prompts: ``reward`` and
    ``gold_reward`` (expected scores of the kept response), ``kl_nats_per_seq``
    (exact KL of best-of-n from the pool: it captures ties, but is biased low
    once n approaches N) and ``kl_bound_nats_per_seq`` (log n - (n-1)/n).
    """
    if proxy.dim() != 2 or proxy.shape != gold.shape:
        raise ValueError(f"proxy and gold must both be [P, N], got {tuple(proxy.shape)} and {tuple(gold.shape)}")
    P, N = proxy.shape
    uniform = torch.full((N,), 1.0 / N, dtype=torch.float64)
    rows = []
    for n in ns:
        n = _check_n(n)
        reward = gold_reward = kl = 0.0
        for i in range(P):
            q = best_of_n_probs(uniform, proxy[i], n)
            reward += float((q * proxy[i].double()).sum())
            gold_reward += float((q * gold[i].double()).sum())
            kl += exact_best_of_n_kl(uniform, proxy[i], n)
        rows.append({
            "n": n,
            "kl_nats_per_seq": kl / P,
            "kl_bound_nats_per_seq": best_of_n_kl(n),
            "reward": reward / P,
            "gold_reward": gold_reward / P,
        })
    return rows


@dataclass
class BestOfN:
    """The result of :func:`best_of_n` on P prompts.

    texts: the kept response of each prompt; proxy, gold: [P] their scores
    (gold NaN without ``gold_fn``); kl_bound: log n - (n-1)/n, nats/sequence;
    kl_estimate: Beirami et al.'s estimate, the mean over prompts of
    :func:`best_of_n_kl_estimate` (n, eps) with eps the reference mass of the
    kept response's reward level: its own probability pi_ref(y|x) (the
    sampler's log-probs, summed) when no different response ties with it at
    the top, as in the paper; else k/n, the fraction of the n samples tied at
    the top (a plug-in estimate: noisy, and it sees ties the bound ignores).
    """

    texts: list[str]
    proxy: torch.Tensor
    gold: torch.Tensor
    kl_bound: float
    kl_estimate: float
    all_proxy: torch.Tensor = field(repr=False)  # [P, n]
    all_gold: torch.Tensor = field(repr=False)  # [P, n]
    all_texts: list[list[str]] = field(repr=False)


def sample_pool(policy, tokenizer, prompts: Sequence[str], n: int, reward_fn: Callable, gold_fn: Callable | None = None, *,
                max_new_tokens: int = 32, temperature: float = 1.0, block_eos: bool = False,
                batch_size: int = 256, seed: int = 0):
    """n samples of each prompt from ``policy`` (klbelt's sampler), scored: (texts [P][n], proxy [P, n], gold [P, n]).

    ``gold_fn(texts, ref_nll)`` gets the sampling model's mean NLL per token of
    each response (the policy is the reference here); gold is NaN without it.
    """
    texts, proxy, gold, _ = _sample_pool(policy, tokenizer, prompts, n, reward_fn, gold_fn, max_new_tokens=max_new_tokens,
                                         temperature=temperature, block_eos=block_eos, batch_size=batch_size, seed=seed)
    return texts, proxy, gold


def _sample_pool(policy, tokenizer, prompts, n, reward_fn, gold_fn, *, max_new_tokens, temperature, block_eos, batch_size, seed):
    """:func:`sample_pool` plus ``seq_logprob`` [P, n]: each response's log-probability under the sampling distribution."""
    from .rl.sampling.policy import sample

    n = _check_n(n)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    texts, proxy, gold, seq_logprob = [], [], [], []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        device = next(policy.parameters()).device
        roll = sample(
            policy, enc["input_ids"].to(device), enc["attention_mask"].to(device), max_new_tokens=max_new_tokens,
            temperature=temperature, eos_token_id=eos, blocked_token_ids=(eos,) if block_eos and eos is not None else (),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            uniforms=torch.rand(len(chunk), max_new_tokens, generator=generator).to(device),
        )
        out = tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
        texts += out
        seq_logprob.append((roll.logprobs.double() * roll.response_mask).sum(-1).cpu())
        proxy.append(torch.as_tensor(reward_fn(out), dtype=torch.float32).cpu())
        if gold_fn is not None:
            nll = -(roll.logprobs * roll.response_mask).sum(-1) / roll.response_mask.sum(-1).clamp(min=1.0)
            gold.append(torch.as_tensor(gold_fn(out, nll.cpu()), dtype=torch.float32).cpu())
    P = len(prompts)
    proxy_t = torch.cat(proxy).view(P, n)
    gold_t = torch.cat(gold).view(P, n) if gold else torch.full((P, n), float("nan"))
    return [texts[i * n : (i + 1) * n] for i in range(P)], proxy_t, gold_t, torch.cat(seq_logprob).view(P, n)


def best_of_n(policy, tokenizer, prompts: Sequence[str], n: int, reward_fn: Callable, gold_fn: Callable | None = None, *,
              max_new_tokens: int = 32, temperature: float = 1.0, block_eos: bool = False,
              batch_size: int = 256, seed: int = 0) -> BestOfN:
    """Best-of-n from ``policy``: n samples per prompt, keep the highest ``reward_fn`` score (ties: uniformly at random).

    ``reward_fn(texts) -> [B]`` is the proxy; ``gold_fn(texts, ref_nll) -> [B]``
    (optional) the gold judge. Returns a :class:`BestOfN` with the kept texts,
    their proxy and gold scores, and the KL to ``policy`` in nats per sequence
    (the analytic bound and an estimate, see :class:`BestOfN`).
    """
    n = _check_n(n)
    all_texts, proxy, gold, seq_logprob = _sample_pool(policy, tokenizer, prompts, n, reward_fn, gold_fn,
                                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                                       block_eos=block_eos, batch_size=batch_size, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    top = proxy.max(dim=1, keepdim=True).values
    tied = proxy == top
    # a uniform random key among the tied draws breaks ties uniformly at random
    keys = torch.where(tied, torch.rand(proxy.shape, generator=generator), torch.full(proxy.shape, -1.0))
    pick = keys.argmax(dim=1)
    rows = torch.arange(len(all_texts))
    eps = []
    for i, j in enumerate(pick.tolist()):
        top_texts = {all_texts[i][k] for k in range(n) if tied[i, k]}
        # one distinct response at the top (drawn once or more) is one outcome: the paper's pi_ref(y|x);
        # different responses tied at the top share one reward level, whose mass k/n estimates
        eps.append(float(seq_logprob[i, j].exp()) if len(top_texts) == 1 else float(tied[i].sum()) / n)
    return BestOfN(
        texts=[all_texts[i][int(j)] for i, j in enumerate(pick)],
        proxy=proxy[rows, pick],
        gold=gold[rows, pick],
        kl_bound=best_of_n_kl(n),
        kl_estimate=sum(best_of_n_kl_estimate(n, e) for e in eps) / len(eps),
        all_proxy=proxy,
        all_gold=gold,
        all_texts=all_texts,
    )


def _lstsq(features: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    sol = torch.linalg.lstsq(features, target[:, None]).solution.squeeze(-1)
    return float(sol[0]), float(sol[1])


def fit_gold_vs_kl(kl, gain, form: str) -> dict:
    """Gao et al. 2022's functional forms, fitted by least squares, d = sqrt(KL) (KL in nats per sequence).

    ``form="bon"``: R(d) = d (alpha - beta d); ``form="rl"``: R(d) = d (alpha - beta log d).
    ``gain`` is the gold reward minus its value at KL = 0 (both forms are 0 there).
    Returns ``{"form", "alpha", "beta", "rmse", "points"}``; points with KL <= 0 are kept for
    the bon form and dropped for the rl form (log d is undefined there).
    """
    if form not in ("bon", "rl"):
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    kl = torch.as_tensor(kl, dtype=torch.float64).flatten()
    gain = torch.as_tensor(gain, dtype=torch.float64).flatten()
    if kl.shape != gain.shape:
        raise ValueError(f"kl and gain must have the same length, got {kl.numel()} and {gain.numel()}")
    ok = torch.isfinite(kl) & torch.isfinite(gain) & (kl >= 0 if form == "bon" else kl > 0)
    kl, gain = kl[ok], gain[ok]
    if kl.numel() < 2:
        raise ValueError(f"need at least 2 finite points with KL {'>=' if form == 'bon' else '>'} 0 to fit, got {kl.numel()}")
    d = kl.sqrt()
    second = d * d if form == "bon" else d * d.log()
    alpha, beta = _lstsq(torch.stack([d, -second], dim=1), gain)
    pred = alpha * d - beta * second
    return {"form": form, "alpha": alpha, "beta": beta, "rmse": float((pred - gain).pow(2).mean().sqrt()), "points": kl.numel()}


def fitted_gain(fit: dict, kl) -> torch.Tensor:
    """The fitted form of :func:`fit_gold_vs_kl` evaluated at ``kl`` (nats per sequence)."""
    d = torch.as_tensor(kl, dtype=torch.float64).clamp(min=1e-12).sqrt()
    second = d * d if fit["form"] == "bon" else d * d.log()
    return fit["alpha"] * d - fit["beta"] * second
