"""Routing metrics: pure functions over captured routing (chosen expert ids [N, K] and the rows' tokens).

The formulas follow OLMoE (Muennighoff et al., arXiv 2409.02060, §5) where it has them, with
N = tokens (rows), K = experts per token, E = routed experts, and "routed to e" meaning e is among
the row's top-K (every formula is "top-k", as the paper's k = 8 figures):

- load_e = tokens routed to e; MaxVio = (max_e load_e − mean load) / mean load (Wang et al.,
  arXiv 2408.15664);
- routing entropy H = −Σ_e p_e ln p_e with p_e = load_e / Σ load (nats), and the effective number
  of experts exp(H): E when the load is uniform, 1 when one expert takes it all (K when K experts do);
- domain specialization (OLMoE §5.2) N(e, D) / N(D): the fraction of domain D's tokens routed to e;
  over the experts of one domain it sums to K (K/E each when uniform);
- vocabulary specialization (OLMoE §5.3) N(x, e) / N(x): the fraction of token x's occurrences
  routed to e, for the input token x and for the predicted (argmax) token;
- co-activation (OLMoE §5.4) N(e_i, e_j) / N(e_i): of the tokens routed to e_i, the fraction also
  routed to e_j, counted over all pairs of each row's top-K (OLMoE's script counts consecutive
  pairs of the sorted top-k only; the paper's formula is all pairs);
- router saturation (OLMoE §5.1) the mean over tokens of |top-K at checkpoint t ∩ top-K at the
  final checkpoint| / K, on the same tokens: 1 against itself.

The masking ablation (DeepSeekMoE, arXiv 2401.06066, §4.5: disable experts, route among the rest)
masks experts through the gate's bias: a masked expert's bias is :data:`MASKED_BIAS`, so the gate
never chooses it while another is left, and the chosen experts' weights (unbiased affinities) are
unchanged.
"""

from __future__ import annotations

import math

import torch

from raymoe.platform.train.balance import max_violation

MASKED_BIAS = -1.0e4  # far below any affinity in (0, 1) plus a balancing bias: never chosen while one is left


def expert_counts(idx: torch.Tensor, n_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """load_e: rows routed to each expert. idx [N, K] (valid [N] bool: rows counted) -> [E] float64."""
    if valid is not None:
        idx = idx[valid]
    return torch.bincount(idx.reshape(-1), minlength=n_experts).to(torch.float64)


def max_vio(counts: torch.Tensor) -> float:
    """MaxVio of a load vector [E]: (max − mean) / mean; 0 without tokens (training's :func:`max_violation`)."""
    return float(max_violation(counts.double().unsqueeze(0))[0])


def routing_entropy(counts: torch.Tensor) -> float:
    """H = −Σ p ln p (nats) of the load distribution p = counts / Σ counts [E]; 0 ln 0 = 0; 0 without tokens."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    p = counts.double() / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def effective_experts(counts: torch.Tensor) -> float:
    """exp(routing entropy) of a load vector [E]: between 1 (one expert) and E (uniform)."""
    return math.exp(routing_entropy(counts))


def domain_specialization(counts_DE: torch.Tensor, tokens_D: torch.Tensor) -> torch.Tensor:
    """N(e, D) / N(D): counts_DE [D, E] (tokens of domain D routed to e), tokens_D [D] -> [D, E].

    Each row sums to K; a domain without tokens gets zeros."""
    tokens = tokens_D.double().reshape(-1, 1)
    out = counts_DE.double() / tokens.clamp_min(1)
    return torch.where(tokens > 0, out, torch.zeros_like(out))


def coactivation(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """C[i, j] = N(e_i, e_j) / N(e_i) over all pairs of each row's top-K, i ≠ j. idx [N, K] -> [E, E] float64.

    The diagonal is 0; a row of an expert no token chose is 0."""
    onehot = torch.zeros(idx.shape[0], n_experts, dtype=torch.float64)
    onehot.scatter_(1, idx, 1.0)  # [N, E]: the experts of each row (distinct within a row)
    pairs = onehot.T @ onehot  # [E, E]: tokens routed to both; the diagonal is N(e_i)
    single = pairs.diagonal().clone()
    pairs.fill_diagonal_(0.0)
    out = pairs / single.clamp_min(1).unsqueeze(1)
    return torch.where(single.unsqueeze(1) > 0, out, torch.zeros_like(out))


def vocab_specialization(
    idx: torch.Tensor, tokens: torch.Tensor, n_experts: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N(x, e) / N(x) for every token x that occurs: idx [N, K], tokens [N] (the row's input or predicted token).

    Returns (the tokens x [T] ascending, their counts N(x) [T], the specialization [T, E] float64)."""
    if valid is not None:
        idx, tokens = idx[valid], tokens[valid]
    vocab, inverse, counts = torch.unique(tokens, return_inverse=True, return_counts=True)
    per = torch.zeros(vocab.numel(), n_experts, dtype=torch.float64)
    per.index_put_((inverse.unsqueeze(1).expand_as(idx).reshape(-1), idx.reshape(-1)),
                   torch.ones(idx.numel(), dtype=torch.float64), accumulate=True)  # fmt: skip
    return vocab, counts, per / counts.double().unsqueeze(1)


def vocab_summary(
    vocab: torch.Tensor, counts: torch.Tensor, spec_TE: torch.Tensor, min_count: int, top: int
) -> tuple[float, dict[int, list[tuple[int, float, int]]]]:
    """What :func:`vocab_specialization` says, over the tokens seen at least ``min_count`` times.

    Returns (the mean over those tokens of max_e N(x, e)/N(x): 1 when every token always goes to
    one expert, about K/E for routing that ignores the token; and per expert its ``top`` most
    specialized tokens as (token, N(x, e)/N(x), N(x)), highest first)."""
    keep = counts >= min_count
    if not bool(keep.any()):
        return 0.0, {}
    vocab, counts, spec = vocab[keep], counts[keep], spec_TE[keep]
    mean_max = float(spec.max(dim=1).values.mean())
    by_count = torch.sort(-counts, stable=True).indices  # ties keep the vocabulary's ascending order
    out: dict[int, list[tuple[int, float, int]]] = {}
    for e in range(spec.shape[1]):
        order = by_count[torch.sort(-spec[by_count, e], stable=True).indices[:top]]  # specialization, then count
        out[e] = [(int(vocab[t]), float(spec[t, e]), int(counts[t])) for t in order.tolist() if spec[t, e] > 0]
    return mean_max, out


def router_saturation(idx_t: torch.Tensor, idx_final: torch.Tensor) -> float:
    """Mean over rows of |S_t ∩ S_final| / K: idx_t, idx_final [N, K], the same rows at two checkpoints."""
    if idx_t.shape != idx_final.shape:
        raise ValueError(f"routing of different rows: {list(idx_t.shape)} and {list(idx_final.shape)}")
    if idx_t.numel() == 0:
        return 0.0
    shared = (idx_t.unsqueeze(-1) == idx_final.unsqueeze(-2)).any(dim=-1).sum(dim=-1)  # [N]
    return float(shared.double().mean()) / idx_t.shape[1]


def top_experts(counts: torch.Tensor, n: int) -> list[int]:
    """The ``n`` most-routed experts of a load vector [E] (ties: the lower id first)."""
    order = sorted(range(counts.numel()), key=lambda e: (-float(counts[e]), e))
    return sorted(order[:n])


def random_experts(n_experts: int, n: int, generator: torch.Generator) -> list[int]:
    """``n`` experts drawn without replacement."""
    return sorted(torch.randperm(n_experts, generator=generator)[:n].tolist())


def masked_bias(bias: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """A gate bias [E] with ``experts`` masked (:data:`MASKED_BIAS`): the gate routes among the others."""
    out = bias.clone()
    if experts:
        out[torch.tensor(experts, dtype=torch.long)] = MASKED_BIAS
    return out


def max_mask_ratio(n_experts: int, top_k: int, n_group: int, topk_group: int) -> float:
    """The largest fraction of experts that can be masked with every token still choosing K unmasked ones.

    With group-limited routing the worst case spreads the masked experts evenly over the groups:
    the ``topk_group`` kept groups then hold topk_group · (E/n_group) · (1 − r) unmasked experts,
    which must be at least K."""
    groups = n_group if 1 < n_group and topk_group < n_group else 1
    kept = topk_group if groups > 1 else 1
    return max(0.0, 1.0 - top_k * groups / (kept * n_experts))
