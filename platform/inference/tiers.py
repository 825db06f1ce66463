"""Routed experts in tiers under one byte budget: which (layer, expert) is hot, warm or cold, and why.

``raymoe serve --expert-budget B --warm-dtype D --cold offload|quantized`` (issue 17 §2). The
budget is the bytes the routed experts may hold where the model computes (a size, or a percentage
of all routed experts' bytes in the compute dtype), split the way ``raymoe info --plan serve``
splits it (:func:`raymoe.platform.plan.fill_tiers`: *resident first, then precise*):

- **hot**: in the compute dtype, run as they are;
- **warm**: quantized weight-only (``fp8``: e4m3 with 128×128 block scales; ``int8``/``int4``:
  group-wise, :mod:`raymoe.platform.checkpoint.quant`), dequantized into the expert cache when chosen;
- **cold**: ``offload``: not held at all, read from the checkpoint when chosen (memory-mapped
  safetensors on a CPU machine, host memory on CUDA); ``quantized``: held in ``cold_dtype``.

A **staging area** of ``num_experts_per_tok`` experts in the compute dtype is set aside first
whenever some expert is not hot: the expert cache holds the working copies of warm and cold
experts there (and in whatever the tiers leave of the budget). Which experts rank first is the
**policy**: ``frequency`` (the measured share of each layer's routed tokens, from
:mod:`raymoe.platform.analysis.loads`: a calibration pass, the training run, or live serving),
``uniform`` (no statistics: every layer the same number, lowest ids first) or ``random``
(seeded). Ranking is over all layers together: every layer routes every token, so an expert's
share is its chance of being needed by a token, comparable across layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.platform.config import ConfigError, ModelConfig
from raymoe.platform.plan import (
    COLD_MODES,
    DEFAULT_GROUP_SIZE,
    WARM_DTYPES,
    expert_bytes,
    fill_tiers,
    parse_size_or_percent,
)

POLICIES = ("frequency", "uniform", "random")
EVICTIONS = ("lru", "lfu")
PREFETCH = ("auto", "on", "off")
TIERS = ("hot", "warm", "cold")


@dataclass
class TierConfig:
    """How routed experts are held; the ``raymoe serve`` flags of the same names set it.

    ``budget`` None means every expert hot (plain serving)."""

    budget: str | int | None = None  # --expert-budget: a size ("2GiB") or a percentage ("25%")
    warm_dtype: str = "int8"  # --warm-dtype
    cold: str = "offload"  # --cold
    cold_dtype: str = "int4"  # --cold-dtype (with --cold quantized)
    policy: str = "frequency"  # --expert-policy
    eviction: str = "lru"  # --expert-eviction
    prefetch: str = "auto"  # --prefetch on | off | auto (on CUDA only)
    group_size: int = DEFAULT_GROUP_SIZE
    seed: int = 0  # the random policy's

    def check(self) -> None:
        """ConfigError naming the flag of a bad value."""
        if self.warm_dtype not in WARM_DTYPES:
            raise ConfigError(f"--warm-dtype {self.warm_dtype!r} is not one of {', '.join(WARM_DTYPES)}")
        if self.cold not in COLD_MODES:
            raise ConfigError(f"--cold {self.cold!r} is not one of {', '.join(COLD_MODES)}")
        if self.cold == "quantized" and self.cold_dtype not in WARM_DTYPES:
            raise ConfigError(f"--cold-dtype {self.cold_dtype!r} is not one of {', '.join(WARM_DTYPES)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"--expert-policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.eviction not in EVICTIONS:
            raise ConfigError(f"--expert-eviction {self.eviction!r} is not one of {', '.join(EVICTIONS)}")
        if self.prefetch not in PREFETCH:
            raise ConfigError(f"--prefetch {self.prefetch!r} is not one of {', '.join(PREFETCH)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"--group-size must be a positive integer, got {self.group_size!r}")


def expert_matrices(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
    """(out, in) of one routed expert's matrices as the model stores them: ``gate_up_proj``, ``down_proj``."""
    return ((2 * cfg.moe_intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.moe_intermediate_size))


def stored_bytes(cfg: ModelConfig, dtype: str | torch.dtype, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one routed expert held in ``dtype``: a torch dtype (as computed) or a warm dtype name."""
    if isinstance(dtype, torch.dtype):
        return sum(r * c for r, c in expert_matrices(cfg)) * dtype.itemsize
    return expert_bytes(expert_matrices(cfg), dtype, group_size, "--warm-dtype").total


@dataclass
class TierPlan:
    """Every routed (layer, expert) of a model in a tier, and the bytes that follow.

    ``tier[i][e]`` is ``"hot"``, ``"warm"`` or ``"cold"`` for MoE layer ``layers[i]``."""

    layers: list[int]
    n_experts: int
    compute_dtype: torch.dtype
    config: TierConfig
    tier: list[list[str]]
    budget_bytes: int  # what --expert-budget came to
    routed_bytes: int  # all routed experts in the compute dtype (what 100 % is)
    expert_bytes: dict[str, int]  # one expert's bytes in each tier's storage
    cache_bytes: int  # the expert cache: the staging area and what the tiers left of the budget
    ranking: str  # where the ranking came from (the policy, and the loads' source)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {t: sum(row.count(t) for row in self.tier) for t in TIERS}

    @property
    def all_hot(self) -> bool:
        return self.counts["cold"] == 0 and self.counts["warm"] == 0

    def ids(self, layer: int, tier: str) -> list[int]:
        """The experts of MoE layer ``layer`` (a model layer id) in ``tier``, ascending."""
        row = self.tier[self.layers.index(layer)]
        return [e for e, t in enumerate(row) if t == tier]

    @property
    def resident_bytes(self) -> int:
        """What the plan holds where the model computes: hot and warm experts, quantized cold ones, the cache."""
        held = self.counts["hot"] * self.expert_bytes["hot"] + self.counts["warm"] * self.expert_bytes["warm"]
        if self.config.cold == "quantized":
            held += self.counts["cold"] * self.expert_bytes["cold"]
        return held + self.cache_bytes

    def summary(self) -> str:
        """One line: the budget and the tiers."""
        c = self.counts
        return (f"routed experts under {percent_of(self):.1f} % of their bytes ({_mib(self.budget_bytes)}): "
                f"{c['hot']} hot, {c['warm']} warm ({self.config.warm_dtype}), {c['cold']} cold "
                f"({self.config.cold}); ranked by {self.ranking}")  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: counts, bytes, and the hot experts of each layer."""
        return {
            "tiers": dict(self.counts),
            "budget_bytes": self.budget_bytes,
            "routed_bytes": self.routed_bytes,
            "resident_bytes_planned": self.resident_bytes,
            "cache_bytes": self.cache_bytes,
            "expert_bytes": dict(self.expert_bytes),
            "warm_dtype": self.config.warm_dtype,
            "cold": self.config.cold if self.counts["cold"] else None,
            "ranking": self.ranking,
        }


def rank_experts(
    n_layers: int, n_experts: int, policy: str, frequency: torch.Tensor | None = None, seed: int = 0
) -> list[tuple[int, int]]:
    """All (layer index, expert) pairs, the first to keep most precise first.

    ``frequency`` [n_layers, E]: each expert's share of its layer's routed tokens (``frequency`` policy)."""
    pairs = [(i, e) for i in range(n_layers) for e in range(n_experts)]
    if policy == "frequency":
        if frequency is None:
            raise ConfigError("--expert-policy frequency needs expert statistics (see raymoe calibrate)")
        if tuple(frequency.shape) != (n_layers, n_experts):
            raise ConfigError(
                f"the expert statistics are [{', '.join(map(str, frequency.shape))}], the model has "
                f"{n_layers} MoE layers of {n_experts} experts"
            )
        f = frequency.double()
        return sorted(pairs, key=lambda p: (-float(f[p[0], p[1]]), p[0], p[1]))
    if policy == "uniform":  # round-robin over layers: every layer the same number, lowest ids first
        return sorted(pairs, key=lambda p: (p[1], p[0]))
    if policy == "random":
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        return [pairs[i] for i in order]
    raise ConfigError(f"--expert-policy {policy!r} is not one of {', '.join(POLICIES)}")


def plan_tiers(
    cfg: ModelConfig,
    layers: list[int],
    compute_dtype: torch.dtype,
    config: TierConfig,
    frequency: torch.Tensor | None = None,
    stats_source: str | None = None,
) -> TierPlan:
    """Put every routed expert of the MoE layers ``layers`` in a tier under ``config.budget``.

    ``frequency`` [len(layers), E] ranks the experts under the ``frequency`` policy; ``stats_source``
    says where it came from (for the plan's ``ranking``). ConfigError names a flag that cannot be met."""
    config.check()
    E = cfg.n_routed_experts
    n = len(layers) * E
    hot = stored_bytes(cfg, compute_dtype)
    routed = n * hot
    budget = routed if config.budget is None else parse_size_or_percent(config.budget, "--expert-budget", routed)
    budget = min(budget, routed)  # more than every expert hot buys nothing
    warm = stored_bytes(cfg, config.warm_dtype, config.group_size)
    cold_q = stored_bytes(cfg, config.cold_dtype, config.group_size)
    if warm >= hot:
        raise ConfigError(f"--warm-dtype {config.warm_dtype} holds no less than the compute dtype {compute_dtype}")
    if config.cold == "quantized" and cold_q > warm:
        raise ConfigError(f"--cold-dtype {config.cold_dtype} is larger than --warm-dtype {config.warm_dtype}")
    cold_device = cold_q if config.cold == "quantized" else 0
    sizes = {"hot": hot, "warm": warm, "cold": cold_device if config.cold == "quantized" else hot}
    if budget >= routed:
        counts = {"hot": n, "warm": 0, "cold": 0}
        cache = 0
    else:
        staging = cfg.num_experts_per_tok * hot
        minimum = staging + n * cold_device
        if budget < minimum:
            what = f"a staging area of num_experts_per_tok={cfg.num_experts_per_tok} experts in {compute_dtype}"
            if config.cold == "quantized":
                what += f" and all {n} experts in --cold-dtype {config.cold_dtype}"
            raise ConfigError(
                f"--expert-budget {config.budget!r} is {_mib(budget)}, below what must be resident: "
                f"{_mib(minimum)} ({what})"
            )
        t = fill_tiers(n, budget - staging, hot, warm, cold_device)
        counts = {"hot": t.hot, "warm": t.warm, "cold": t.cold}
        cache = budget - t.hot_bytes - t.warm_bytes - t.cold_device_bytes
    order = rank_experts(len(layers), E, config.policy, frequency, config.seed)
    tier = [["cold"] * E for _ in layers]
    for rank, (i, e) in enumerate(order):
        tier[i][e] = "hot" if rank < counts["hot"] else "warm" if rank < counts["hot"] + counts["warm"] else "cold"
    ranking = config.policy if config.policy != "frequency" else f"frequency ({stats_source or 'given'})"
    return TierPlan(layers=list(layers), n_experts=E, compute_dtype=compute_dtype, config=config, tier=tier,
                    budget_bytes=budget, routed_bytes=routed, expert_bytes=sizes, cache_bytes=cache,
                    ranking=ranking)  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def percent_of(plan: TierPlan) -> float:
    """The budget as a percentage of all routed experts' bytes in the compute dtype."""
    return 100.0 * plan.budget_bytes / plan.routed_bytes if plan.routed_bytes else math.nan


def moe_layers(cfg: ModelConfig) -> list[int]:
    """The model layer ids of the MoE layers in ``moe_by_layer`` order (main layers, then MTP modules)."""
    from raymoe.platform.model.transformer import DeepseekV3

    with torch.device("meta"):
        return list(DeepseekV3(cfg).moe_by_layer())


def plan_for_checkpoint(
    location: str, cfg: ModelConfig, compute_dtype: torch.dtype, config: TierConfig, stats: str | None = None
) -> TierPlan:
    """:func:`plan_tiers` for the checkpoint at ``location``, ranked by ``stats`` (an expert-loads JSON,
    :mod:`raymoe.platform.analysis.loads`) or, by default, the statistics found with the checkpoint
    (a calibration file beside it, else the training run's counts). ConfigError names what is missing."""
    layers = moe_layers(cfg)
    frequency, source = None, None
    if config.policy == "frequency" and config.budget is not None:
        from raymoe.platform.analysis.loads import ExpertLoads, LoadsError, find_loads

        try:
            loads = ExpertLoads.load(stats) if stats else find_loads(location)
            if loads is not None:
                loads.check_against(cfg, stats or location)
        except (LoadsError, OSError) as exc:
            raise ConfigError(f"--expert-stats: {exc}") from None
        if loads is None:
            raise ConfigError(
                f"--expert-policy frequency needs expert statistics, and {location} has none (no expert_loads.json "
                "beside it, no load counts in its trainer state): run `raymoe calibrate --checkpoint ... --data ...`, "
                "pass --expert-stats FILE, or use --expert-policy uniform"
            )
        frequency, source = loads.frequency(), f"{loads.source}, {loads.tokens:,} tokens"
    return plan_tiers(cfg, layers, compute_dtype, config, frequency, source)
