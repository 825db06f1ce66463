"""Capacity plans asked before renting hardware: where a model's bytes sit to serve it, and to train it.

Pure functions of a :class:`~raymoe.platform.config.ModelConfig` and a few hardware numbers. The
byte totals come from the model built on the meta device (:func:`model_anatomy`: the real
tensors, no memory allocated), never from a second formula of the parameter count.

**Serving** (:func:`serve_plan`). Experts are split across the devices (expert parallel, in
contiguous blocks per layer as :mod:`raymoe.actors.placement` does); everything else (embedding,
output head, MLA, norms, dense layers, gates, shared experts) is *replicated* on every device
(data-parallel attention: each device serves its own sequences and caches their latents for all
layers). ``--device-memory``, ``--expert-budget`` and ``--reserve`` are per device; the host memory
is that of the one machine holding all the devices. The routed experts of a device fall in tiers
under its budget:

- *hot*: the compute dtype (bf16), 2 bytes a weight;
- *warm*: quantized weight-only: ``fp8`` (e4m3, one float32 scale per 128×128 block, DeepSeek-V3's
  format) or ``int8`` / ``int4`` (symmetric, one bf16 scale per ``group_size`` weights along the
  input dimension of each output row; int4 packs two weights a byte);
- *cold*: offloaded to host memory in bf16 (``cold="offload"``; copied to a staging area on the
  device, ``num_experts_per_tok`` bf16 experts big, when chosen) or kept on the device in
  ``cold_dtype`` (``cold="quantized"``).

The fill is *resident first, then precise*: every expert is raised to the warm tier if the budget
allows, then as many as fit to hot; otherwise as many as fit are warm and the rest cold. Which
experts are hot is for the expert statistics to decide at serve time; a plan counts them. The
latent cache gets what is left of the device.

**Training** (:func:`train_plan`): see its docstring and ``docs/planning.md``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from raymoe.platform.checkpoint.fp8 import FP8_BLOCK, scale_shape
from raymoe.platform.config import ConfigError, ModelConfig
from raymoe.platform.info import (
    BF16_BYTES,
    TERA,
    ParamCounts,
    build_meta_model,
    count_params,
    kv_cache_bytes_per_token_mla,
    train_flops_per_token,
)

FP32_BYTES = 4
FP8_BYTES = 1
INT8_BYTES = 1
INT4_WEIGHTS_PER_BYTE = 2
FP8_SCALE_BYTES = FP32_BYTES  # DeepSeek-V3's weight_scale_inv is float32
GROUP_SCALE_BYTES = BF16_BYTES  # int8/int4 group scales in bf16 (symmetric: no zero point)
DEFAULT_GROUP_SIZE = 128
DEFAULT_RESERVE = "10%"  # of the device: activations, CUDA context, allocator slack
DEFAULT_KV_TOKENS = 131_072  # latent-cache tokens per device that the automatic expert budget leaves room for
WARM_DTYPES = ("fp8", "int8", "int4")
COLD_MODES = ("offload", "quantized")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


# --------------------------------------------------------------------------- sizes


def parse_size(text: str | int, flag: str) -> int:
    """Bytes of ``"141GiB"``, ``"2TiB"``, ``"80GB"``, ``"1.5TB"`` or a plain number of bytes.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (case-insensitive). ``flag``
    names the option in the error.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"{flag} {text!r} is not a size; write e.g. 141GiB, 80GB, 2TiB or a number of bytes "
                f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value = round(float(match.group(1)) * _UNITS[unit])
    if value < 0:
        raise ConfigError(f"{flag} must be >= 0 bytes, got {text!r}")
    return value


def parse_size_or_percent(text: str | int, flag: str, whole: int) -> int:
    """Bytes of a size (:func:`parse_size`) or of a percentage (``"25%"``) of ``whole`` bytes (floored)."""
    match = _PERCENT_RE.match(text) if isinstance(text, str) else None
    if match is None:
        return parse_size(text, flag)
    percent = float(match.group(1))
    if percent > 100:
        raise ConfigError(f"{flag} {text!r}: a percentage is at most 100%")
    return math.floor(whole * percent / 100)


# --------------------------------------------------------------------------- what the model holds


@dataclass(frozen=True, kw_only=True)
class ModelAnatomy:
    """Shapes and counts read off ``DeepseekV3(cfg)`` on the meta device (numbers of scalars).

    ``expert_matrices``: the (out, in) shapes of one routed expert's matrices as the model stores
    them (``gate_up_proj`` [2I, D], ``down_proj`` [D, I]). ``layer_dense_params``: per main layer,
    its parameters other than routed experts (MLA, norms, dense MLP or gate + shared experts).
    ``mtp_dense_params``: the same per MTP module (its unique parameters; embedding and head are
    shared). ``gate_bias_numel``: the float32 ``e_score_correction_bias`` buffers of the main layers.
    """

    counts: ParamCounts
    expert_matrices: tuple[tuple[int, int], ...]
    expert_params: int  # one routed expert
    n_routed_experts: int  # per MoE layer
    moe_layers: int  # main MoE layers
    mtp_moe_layers: int  # MoE layers of the MTP modules
    layer_dense_params: tuple[int, ...]
    mtp_dense_params: tuple[int, ...]
    gate_bias_numel: int
    mtp_gate_bias_numel: int
    final_norm_params: int

    @property
    def non_expert_params(self) -> int:
        """Main-model parameters that are not routed experts: embedding, head, MLA, norms, dense, gates, shared."""
        return self.counts.total - self.counts.routed_experts


def model_anatomy(cfg: ModelConfig) -> ModelAnatomy:
    """Read :class:`ModelAnatomy` off the model built on the meta device (about 2 s for 671B)."""
    from raymoe.platform.model.moe import MoE

    counts = count_params(cfg)
    model = build_meta_model(cfg)

    def split(block: Any) -> tuple[int, int, int, tuple[tuple[int, int], ...]]:
        """(non-routed params, routed params, gate bias numel, expert matrix shapes) of one block."""
        total = sum(p.numel() for p in block.parameters())
        mlp = block.mlp
        if not isinstance(mlp, MoE) or mlp.experts is None:
            return total, 0, 0, ()
        routed = sum(p.numel() for p in mlp.experts.parameters())
        shapes = tuple(tuple(p.shape[1:]) for p in (mlp.experts.gate_up_proj, mlp.experts.down_proj))
        return total - routed, routed, mlp.gate.e_score_correction_bias.numel(), shapes

    main = [split(b) for b in model.main_blocks()]
    mtp = [split(m) for m in model.mtp_modules()]
    shapes = next((s[3] for s in main + mtp if s[3]), ())
    expert_params = sum(rows * cols for rows, cols in shapes)
    final_norm = model.model.norm.weight.numel()
    if sum(s[1] for s in main) != counts.routed_experts:
        raise RuntimeError("model_anatomy: the routed experts do not add up to count_params'")
    if sum(s[0] for s in main) + counts.embedding + counts.head + final_norm != counts.total - counts.routed_experts:
        raise RuntimeError("model_anatomy: the non-expert parameters do not add up to count_params'")
    return ModelAnatomy(
        counts=counts,
        expert_matrices=shapes,
        expert_params=expert_params,
        n_routed_experts=cfg.n_routed_experts,
        moe_layers=sum(1 for s in main if s[1]),
        mtp_moe_layers=sum(1 for s in mtp if s[1]),
        layer_dense_params=tuple(s[0] for s in main),
        mtp_dense_params=tuple(s[0] for s in mtp),
        gate_bias_numel=sum(s[2] for s in main),
        mtp_gate_bias_numel=sum(s[2] for s in mtp),
        final_norm_params=final_norm,
    )


def split_evenly(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous blocks of ``n`` items, the first ``n % parts`` one larger.

    The rule of :func:`raymoe.actors.placement.split_evenly` (``platform/`` may not import
    ``actors/``; ``tests/platform/test_plan.py`` checks that the two agree)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# --------------------------------------------------------------------------- quantized experts


@dataclass(frozen=True, kw_only=True)
class ExpertBytes:
    """Bytes of one routed expert in a storage dtype: the weights and their scales."""

    dtype: str
    weight_bytes: int
    scale_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.scale_bytes


def expert_bytes(
    matrices: tuple[tuple[int, int], ...], dtype: str, group_size: int = DEFAULT_GROUP_SIZE, flag: str = "dtype"
) -> ExpertBytes:
    """Bytes of one expert whose matrices have the (out, in) shapes ``matrices``, stored in ``dtype``.

    - ``bf16``: 2 bytes a weight, no scales;
    - ``fp8``: 1 byte a weight + one float32 scale per 128×128 block, [⌈out/128⌉, ⌈in/128⌉] a matrix;
    - ``int8``: 1 byte a weight, ``int4``: ⌈in/2⌉ bytes a row (two weights a byte); both + one bf16
      scale per group of ``group_size`` weights along ``in``: out × ⌈in/group_size⌉ a matrix.
    """
    if group_size <= 0:
        raise ConfigError(f"group_size (--group-size) must be >= 1, got {group_size}")
    weights = scales = 0
    for rows, cols in matrices:
        if dtype == "bf16":
            weights += rows * cols * BF16_BYTES
        elif dtype == "fp8":
            weights += rows * cols * FP8_BYTES
            block_rows, block_cols = scale_shape((rows, cols), FP8_BLOCK)
            scales += block_rows * block_cols * FP8_SCALE_BYTES
        elif dtype in ("int8", "int4"):
            row_bytes = cols * INT8_BYTES if dtype == "int8" else math.ceil(cols / INT4_WEIGHTS_PER_BYTE)
            weights += rows * row_bytes
            scales += rows * math.ceil(cols / group_size) * GROUP_SCALE_BYTES
        else:
            raise ConfigError(f"{flag} {dtype!r} is not one of {', '.join(('bf16', *WARM_DTYPES))}")
    return ExpertBytes(dtype=dtype, weight_bytes=weights, scale_bytes=scales)


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True, kw_only=True)
class ExpertTiers:
    """The routed experts of one device in tiers (counts of (layer, expert) pairs) and their bytes."""

    experts: int  # all routed (layer, expert) pairs on the device
    hot: int
    warm: int
    cold: int
    hot_bytes: int
    warm_bytes: int
    cold_device_bytes: int  # quantized cold experts on the device, or the offload staging area
    cold_host_bytes: int  # offloaded cold experts (bf16) in host memory


def fill_tiers(
    experts: int, budget: int, hot: int, warm: int, cold: int, staging: int = 0, cold_host: int = 0
) -> ExpertTiers:
    """Tiers of ``experts`` under ``budget`` device bytes: resident first, then precise.

    ``hot``, ``warm``, ``cold``: device bytes of one expert in each tier (``cold`` is 0 when cold
    experts are offloaded); ``staging``: device bytes set aside first for offloaded experts in use;
    ``cold_host``: host bytes of one offloaded expert. The staging area is set aside only when some
    expert is cold. The caller checks that the budget holds the minimum (``staging + experts × cold``).
    """
    if experts * warm <= budget:  # all resident, no staging needed
        n_hot = min(experts, (budget - experts * warm) // (hot - warm))
        n_warm, n_cold = experts - n_hot, 0
    else:
        n_hot = 0
        n_warm = (budget - staging - experts * cold) // (warm - cold)
        n_cold = experts - n_warm
    return ExpertTiers(
        experts=experts,
        hot=n_hot,
        warm=n_warm,
        cold=n_cold,
        hot_bytes=n_hot * hot,
        warm_bytes=n_warm * warm,
        cold_device_bytes=n_cold * cold + (staging if n_cold else 0),
        cold_host_bytes=n_cold * cold_host,
    )


@dataclass(frozen=True, kw_only=True)
class ServePlan:
    """Where the model sits to serve it: per device (the first, which holds the most experts) and in total.

    Bytes are per device unless named ``total_*`` or ``host_*``.
    """

    devices: int
    device_memory: int
    reserve: int
    usable: int  # device_memory - reserve
    host_memory: int
    non_expert: dict[str, int]  # per part, bytes; replicated on every device
    non_expert_bytes: int
    routed_experts_bf16: int  # the bf16 bytes of this device's routed experts
    total_routed_experts_bf16: int
    expert_budget: int  # device bytes given to routed experts
    expert_budget_auto: bool
    warm_dtype: str
    group_size: int
    cold: str
    cold_dtype: str | None
    expert_bytes: dict[str, dict[str, int]]  # tier -> {weight_bytes, scale_bytes, total} of one expert
    experts_per_layer: tuple[int, ...]  # per device
    tiers: ExpertTiers  # of device 0
    total_hot: int
    total_warm: int
    total_cold: int
    host_cold_bytes: int  # all offloaded experts, in the host's memory
    kv_bytes_per_token: int
    kv_cache_bytes: int
    kv_tokens: int  # latent-cache tokens device 0 holds
    total_kv_tokens: int
    free_bytes: int  # of the usable memory, after experts and the cache's whole tokens

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


def _non_expert_parts(anatomy: ModelAnatomy) -> dict[str, int]:
    """bf16 bytes of each replicated part (main model), plus the float32 gate biases."""
    c = anatomy.counts
    return {
        "embedding": c.embedding * BF16_BYTES,
        "head": c.head * BF16_BYTES,
        "attention": c.attention * BF16_BYTES,
        "dense_mlp": c.dense_mlp * BF16_BYTES,
        "shared_experts": c.shared_experts * BF16_BYTES,
        "gates": c.gates * BF16_BYTES + anatomy.gate_bias_numel * FP32_BYTES,
        "norms": c.norms * BF16_BYTES,
    }


def serve_plan(
    cfg: ModelConfig,
    *,
    devices: int = 1,
    device_memory: str | int = "80GiB",
    host_memory: str | int = "1TiB",
    expert_budget: str | int | None = None,
    warm_dtype: str = "fp8",
    group_size: int = DEFAULT_GROUP_SIZE,
    cold: str = "offload",
    cold_dtype: str = "int4",
    reserve: str | int = DEFAULT_RESERVE,
    kv_tokens: int = DEFAULT_KV_TOKENS,
    anatomy: ModelAnatomy | None = None,
) -> ServePlan:
    """Plan serving the main model of ``cfg`` (no MTP modules) on ``devices`` devices of one machine.

    Args:
        devices: devices of the machine; the routed experts of every layer are split over them.
        device_memory: bytes of one device (a size, e.g. ``"141GiB"``).
        host_memory: bytes of the machine's memory, for offloaded experts.
        expert_budget: device bytes for routed experts, per device: a size, or a percentage of
            the bf16 bytes of device 0's experts (the most; with an even split ``"25%"`` is a
            quarter of every device's experts, a quarter of all). ``None``: what the device has
            left after the reserve, the non-expert weights and ``kv_tokens`` tokens of latent
            cache, at most 100 %.
        warm_dtype: ``fp8`` | ``int8`` | ``int4``.
        group_size: weights per scale of int8/int4.
        cold: ``offload`` (host memory, bf16) | ``quantized`` (on the device in ``cold_dtype``).
        reserve: per device, kept free for activations and the runtime: a size or a percentage.
        kv_tokens: see ``expert_budget``.
    """
    if devices <= 0:
        raise ConfigError(f"devices (--devices) must be >= 1, got {devices}")
    if devices > cfg.n_routed_experts:
        raise ConfigError(
            f"devices (--devices) {devices} is more than model.n_routed_experts ({cfg.n_routed_experts}): "
            "expert parallelism splits each layer's experts over the devices"
        )
    if warm_dtype not in WARM_DTYPES:
        raise ConfigError(f"warm_dtype (--warm-dtype) {warm_dtype!r} is not one of {', '.join(WARM_DTYPES)}")
    if cold not in COLD_MODES:
        raise ConfigError(f"cold (--cold) {cold!r} is not one of {', '.join(COLD_MODES)}")
    if cold == "quantized" and cold_dtype not in WARM_DTYPES:
        raise ConfigError(f"cold_dtype (--cold-dtype) {cold_dtype!r} is not one of {', '.join(WARM_DTYPES)}")
    if kv_tokens < 0:
        raise ConfigError(f"kv_tokens (--kv-tokens) must be >= 0, got {kv_tokens}")
    anatomy = anatomy if anatomy is not None else model_anatomy(cfg)
    memory = parse_size(device_memory, "--device-memory")
    if memory <= 0:
        raise ConfigError("--device-memory must be > 0")
    host = parse_size(host_memory, "--host-memory")
    reserved = parse_size_or_percent(reserve, "--reserve", memory)
    usable = memory - reserved
    parts = _non_expert_parts(anatomy)
    non_expert = sum(parts.values())
    if non_expert > usable:
        raise ConfigError(
            f"the non-expert weights (attention, embedding, head, dense layers, shared experts, gates, norms: "
            f"{_gib(non_expert)} per device, replicated) do not fit the usable {_gib(usable)} of a device "
            f"(--device-memory {_gib(memory)} less --reserve {_gib(reserved)}); use devices with more memory"
        )

    per_layer = split_evenly(cfg.n_routed_experts, devices)
    n_experts = per_layer[0] * anatomy.moe_layers  # device 0 holds the most
    hot = expert_bytes(anatomy.expert_matrices, "bf16")
    warm = expert_bytes(anatomy.expert_matrices, warm_dtype, group_size, "--warm-dtype")
    cold_q = expert_bytes(anatomy.expert_matrices, cold_dtype, group_size, "--cold-dtype")
    if cold == "quantized" and cold_q.total > warm.total:
        raise ConfigError(f"--cold-dtype {cold_dtype} is larger than --warm-dtype {warm_dtype}; pick a smaller one")
    cold_device = cold_q.total if cold == "quantized" else 0
    staging = cfg.num_experts_per_tok * hot.total if cold == "offload" else 0
    cold_host = hot.total if cold == "offload" else 0
    routed_bf16 = n_experts * hot.total
    kv_per_token = kv_cache_bytes_per_token_mla(cfg)

    auto = expert_budget is None
    if auto:
        budget = min(routed_bf16, usable - non_expert - kv_tokens * kv_per_token)
    else:
        budget = parse_size_or_percent(expert_budget, "--expert-budget", routed_bf16)
        budget = min(budget, routed_bf16)  # more than all experts in bf16 buys nothing
    minimum = staging + n_experts * cold_device
    what = (
        f"a staging area of num_experts_per_tok={cfg.num_experts_per_tok} bf16 experts for offloaded ones"
        if cold == "offload"
        else f"all {n_experts} experts of the device in --cold-dtype {cold_dtype}"
    )
    if budget < minimum:
        where = (
            f"the device left after --reserve, the non-expert weights and --kv-tokens {kv_tokens} is {_gib(budget)}"
            if auto
            else f"--expert-budget {expert_budget!r} is {_gib(budget)} per device"
        )
        raise ConfigError(f"{where}, below what must be resident: {_gib(minimum)} ({what})")
    if non_expert + budget > usable:
        raise ConfigError(
            f"--expert-budget {expert_budget!r} ({_gib(budget)} per device) and the non-expert weights "
            f"({_gib(non_expert)}) exceed the usable {_gib(usable)} of a device; give at most "
            f"{_gib(usable - non_expert)} ({(usable - non_expert) // 2**20} MiB)"
        )
    tiers = [
        fill_tiers(n * anatomy.moe_layers, budget, hot.total, warm.total, cold_device, staging, cold_host)
        for n in per_layer
    ]
    host_cold = sum(t.cold_host_bytes for t in tiers)
    if host_cold > host:
        raise ConfigError(
            f"the offloaded experts need {_gib(host_cold)} of host memory, more than --host-memory {_gib(host)}; "
            "give a larger --expert-budget, a smaller --warm-dtype, or --cold quantized"
        )
    kv_bytes = usable - non_expert - budget
    tokens = kv_bytes // kv_per_token
    # every device has the same budget and non-expert weights, so the same cache
    expert_sizes = {"hot": hot, "warm": warm}
    if cold == "quantized":
        expert_sizes["cold"] = cold_q
    elif tiers[0].cold:
        expert_sizes["cold"] = hot
    return ServePlan(
        devices=devices,
        device_memory=memory,
        reserve=reserved,
        usable=usable,
        host_memory=host,
        non_expert=parts,
        non_expert_bytes=non_expert,
        routed_experts_bf16=routed_bf16,
        total_routed_experts_bf16=anatomy.counts.routed_experts * BF16_BYTES,
        expert_budget=budget,
        expert_budget_auto=auto,
        warm_dtype=warm_dtype,
        group_size=group_size,
        cold=cold,
        cold_dtype=cold_dtype if cold == "quantized" else None,
        expert_bytes={k: {**dataclasses.asdict(v), "total": v.total} for k, v in expert_sizes.items()},
        experts_per_layer=tuple(per_layer),
        tiers=tiers[0],
        total_hot=sum(t.hot for t in tiers),
        total_warm=sum(t.warm for t in tiers),
        total_cold=sum(t.cold for t in tiers),
        host_cold_bytes=host_cold,
        kv_bytes_per_token=kv_per_token,
        kv_cache_bytes=kv_bytes,
        kv_tokens=tokens,
        total_kv_tokens=tokens * devices,
        free_bytes=usable
        - non_expert
        - tiers[0].hot_bytes
        - tiers[0].warm_bytes
        - tiers[0].cold_device_bytes
        - tokens * kv_per_token,
    )


def _gib(n: int | float) -> str:
    return f"{n / 2**30:,.2f} GiB"


# --------------------------------------------------------------------------- training

DEFAULT_INTERCONNECT_GBPS = 400.0  # one 400 Gb/s InfiniBand port per GPU, as in DeepSeek-V3's H800 cluster
RECOMPUTE_FLOPS_FACTOR = 4 / 3  # recomputing the forward in the backward: 1 + 1 + 2 passes instead of 1 + 2
A2A_PASSES = 4  # dispatch and combine in the forward, their gradients in the backward
A2A_PASSES_RECOMPUTE = 6  # the recomputed forward dispatches and combines again
LOGITS_BYTES = FP32_BYTES  # the cross-entropy's logits, kept in float32 for the backward
BITS_PER_BYTE = 8
GIGA = 1e9
MOMENT_DTYPES = {"fp32": FP32_BYTES, "bf16": BF16_BYTES}


@dataclass(frozen=True, kw_only=True)
class TrainPrecision:
    """Bytes per parameter: bf16 working weights and gradients, float32 master weights, AdamW's two moments.

    16 bytes a parameter with float32 moments; 12 with bf16 moments (DeepSeek-V3's choice, §3.3).
    """

    weight_bytes: int = BF16_BYTES
    grad_bytes: int = BF16_BYTES
    master_bytes: int = FP32_BYTES
    moment_bytes: int = FP32_BYTES  # each of the two

    @property
    def per_param(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.master_bytes + 2 * self.moment_bytes

    def split(self, params: int) -> dict[str, int]:
        """Bytes of ``params`` parameters by kind."""
        return {
            "weights": params * self.weight_bytes,
            "gradients": params * self.grad_bytes,
            "master": params * self.master_bytes,
            "moments": params * 2 * self.moment_bytes,
        }


def attention_values_per_token(cfg: ModelConfig) -> int:
    """bf16 values one token keeps for the backward in one MLA block (flash attention: no score matrix).

    The layer input and its norm (2D); with q_lora_rank the query latent and its norm (2·q_lora);
    the query (H·qk_head_dim); kv_a's output (kv_lora + rope) and the normed latent (kv_lora); the
    decompressed keys' no-RoPE half and values (H·(nope + v)); the attention output (H·v).
    """
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q_latent = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0
    return (
        2 * D
        + q_latent
        + H * cfg.qk_head_dim
        + (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank
        + H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + H * cfg.v_head_dim
    )


def ffn_values_per_token(cfg: ModelConfig, moe: bool) -> int:
    """bf16 values one token keeps on its attention stage for the FFN half of a block.

    The residual and its norm (2D); a dense SwiGLU's gate, up and their product (3·I); in an MoE
    layer the router's scores (E) and the shared experts' 3·I·n_shared. The routed experts' part
    is on the expert shards (:func:`routed_values_per_choice`).
    """
    D = cfg.hidden_size
    if not moe:
        return 2 * D + 3 * cfg.intermediate_size
    return 2 * D + cfg.n_routed_experts + 3 * cfg.moe_intermediate_size * cfg.n_shared_experts


def routed_values_per_choice(cfg: ModelConfig) -> int:
    """bf16 values an expert shard keeps per (token, chosen expert): the dispatched row D, gate, up, product 3·I."""
    return cfg.hidden_size + 3 * cfg.moe_intermediate_size


@dataclass(frozen=True, kw_only=True)
class TrainPlan:
    """A training layout and what follows from it; bytes per GPU unless named ``*_total``/``*_per_step``.

    A GPU holds one attention stage (``dp × pp`` of them, one per GPU) and, on ``ep`` of the GPUs,
    one expert shard. ``stage`` is the largest stage, ``shard`` the largest shard.
    """

    nodes: int
    gpus_per_node: int
    gpus: int
    dp: int
    pp: int
    ep: int
    pp_auto: bool
    micro_batch: int  # sequences per micro-batch
    micro_batches: int  # per replica per step
    seq_len: int
    tokens_per_step: int
    recompute: bool
    overlap: bool
    precision: dict[str, int]  # bytes per parameter of each kind
    stage_index: int
    stage_layers: tuple[int, int]  # [start, end) main layers of the largest stage
    stage_params: int
    stage_bytes: dict[str, int]  # weights, gradients, master, moments, activations
    shard_experts_per_layer: int
    shard_params: int
    shard_bytes: dict[str, int]
    activation_bytes_per_token: dict[str, int]  # per block kind, kept for the backward (no recompute)
    gpu_bytes: int  # the largest stage + the largest shard
    device_memory: int
    reserve: int
    usable: int
    a2a_bytes_per_token: int  # all MoE layers, all passes, before the fraction leaving the GPU
    a2a_leaving_fraction: float
    a2a_bytes_per_step: int  # over the cluster, leaving their GPU
    a2a_bytes_per_gpu: int
    interconnect_gbps: float
    a2a_s: float
    flops_per_token: float  # model FLOPs, MTP included
    peak_tflops: float
    mfu: float
    compute_s: float
    step_s: float
    tokens_per_s: float
    effective_mfu: float  # model FLOPs per second over the peak, all-to-all included

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


def _stage_contents(anatomy: ModelAnatomy, cfg: ModelConfig, bounds: tuple[int, int], first: bool, last: bool):
    """(params, activation values per token, blocks, the largest block's values) of one stage."""
    start, end = bounds
    moe_first = cfg.first_k_dense_replace
    attn = attention_values_per_token(cfg)
    params = sum(anatomy.layer_dense_params[start:end])
    values = [attn + ffn_values_per_token(cfg, moe=layer >= moe_first) for layer in range(start, end)]
    if first:
        params += anatomy.counts.embedding
    if last:
        params += anatomy.counts.head + anatomy.final_norm_params + sum(anatomy.mtp_dense_params)
        # each MTP module: enorm and hnorm outputs and eh_proj's output (3D), then one MoE block
        values += [3 * cfg.hidden_size + attn + ffn_values_per_token(cfg, moe=True)] * len(anatomy.mtp_dense_params)
    return params, sum(values), len(values), max(values, default=0)


def train_plan(
    cfg: ModelConfig,
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    interconnect_gbps: float = DEFAULT_INTERCONNECT_GBPS,
    device_memory: str | int = "80GiB",
    reserve: str | int = DEFAULT_RESERVE,
    pp: int | None = None,
    ep: int | None = None,
    micro_batch: int = 1,
    micro_batches: int = 1,
    seq_len: int = 4096,
    recompute: bool = False,
    overlap: bool = False,
    moment_dtype: str = "fp32",
    peak_tflops: float = 989.0,
    mfu: float = 0.4,
    anatomy: ModelAnatomy | None = None,
) -> TrainPlan:
    """Plan training ``cfg`` (MTP modules included) on ``nodes × gpus_per_node`` GPUs with raymoe's actor graph.

    Layout: every GPU holds one attention stage (``dp × pp = GPUs``; layers split as evenly as
    :func:`split_evenly` does, the embedding on the first stage, the head, final norm and MTP
    modules on the last) and ``ep`` GPUs (default ``min(GPUs, n_routed_experts)``) one expert
    shard each (each MoE layer's experts in contiguous blocks). ``pp`` defaults to the smallest
    divisor of the GPU count whose largest stage plus largest shard fit ``device_memory`` less
    ``reserve``. The schedule is raymoe's: all micro-batches forward, then all backward, so a
    stage keeps the activations of its replica's ``micro_batches`` and a shard those of every
    token routed to it in the step (balanced loads). Activations per token are those of
    :func:`attention_values_per_token`, :func:`ffn_values_per_token` and
    :func:`routed_values_per_choice` in bf16, plus float32 logits of every head on the last stage;
    with ``recompute`` a block keeps only its input (D values) and one block at a time is rebuilt.

    All-to-all: per token and MoE layer (main and MTP), ``num_experts_per_tok × hidden × 2`` bytes
    each of dispatch and combine, forward and backward (and the recomputed forward), of which
    ``1 − 1/GPUs`` leave the GPU (a choice stays only when its expert is in the GPU's own shard).
    Each GPU sends its share at ``interconnect_gbps``. Compute time is the step's model FLOPs
    (:func:`~raymoe.platform.info.train_flops_per_token`; ×4/3 with ``recompute``) at ``mfu`` of
    ``peak_tflops`` on every GPU; the step is compute + all-to-all, or the larger of the two with
    ``overlap``. Not counted: pipeline sends, the gradient all-reduce of replicated stages, the
    gate-bias buffers.
    """
    for name, flag, value in [
        ("nodes", "--nodes", nodes),
        ("gpus_per_node", "--gpus-per-node", gpus_per_node),
        ("micro_batch", "--micro-batch", micro_batch),
        ("micro_batches", "--micro-batches", micro_batches),
        ("seq_len", "--seq-len", seq_len),
    ]:
        if value <= 0:
            raise ConfigError(f"{name} ({flag}) must be >= 1, got {value}")
    if interconnect_gbps <= 0:
        raise ConfigError(f"interconnect_gbps (--interconnect-gbps) must be > 0, got {interconnect_gbps}")
    if peak_tflops <= 0 or not 0 < mfu <= 1:
        raise ConfigError(f"--peak-tflops must be > 0 and --mfu in (0, 1], got {peak_tflops} and {mfu}")
    if moment_dtype not in MOMENT_DTYPES:
        raise ConfigError(f"moment_dtype (--moment-dtype) {moment_dtype!r} is not one of {', '.join(MOMENT_DTYPES)}")
    gpus = nodes * gpus_per_node
    layers = cfg.num_hidden_layers
    if ep is None:
        ep = min(gpus, cfg.n_routed_experts)
    most = min(gpus, cfg.n_routed_experts)
    if not 1 <= ep <= most:
        raise ConfigError(f"ep (--ep) must be in [1, {most}] (at most the GPUs and model.n_routed_experts), got {ep}")
    if pp is not None and (pp <= 0 or gpus % pp or pp > layers):
        raise ConfigError(
            f"pp (--pp) must divide the {gpus} GPUs and be at most model.num_hidden_layers ({layers}), got {pp}"
        )
    anatomy = anatomy if anatomy is not None else model_anatomy(cfg)
    memory = parse_size(device_memory, "--device-memory")
    reserved = parse_size_or_percent(reserve, "--reserve", memory)
    usable = memory - reserved
    precision = TrainPrecision(moment_bytes=MOMENT_DTYPES[moment_dtype])
    candidates = [pp] if pp is not None else [d for d in range(1, min(gpus, layers) + 1) if gpus % d == 0]
    plans = [
        _train_layout(cfg, anatomy, precision, gpus, d, ep, micro_batch, micro_batches, seq_len, recompute)
        for d in candidates
    ]
    fitting = [p for p in plans if p["gpu_bytes"] <= usable]
    if not fitting:
        best = min(plans, key=lambda p: p["gpu_bytes"])
        raise ConfigError(
            f"no layout fits: the smallest, pp={best['pp']} (dp={gpus // best['pp']}, ep={ep}), needs "
            f"{_gib(best['gpu_bytes'])} on a GPU, more than the usable {_gib(usable)} (--device-memory "
            f"{_gib(memory)} less --reserve {_gib(reserved)}); try --recompute, more --nodes, a smaller "
            "--micro-batch, --micro-batches or --seq-len, or --moment-dtype bf16"
        )
    layout = fitting[0]
    dp = gpus // layout["pp"]
    tokens = dp * micro_batches * micro_batch * seq_len
    moe_total = anatomy.moe_layers + anatomy.mtp_moe_layers
    passes = A2A_PASSES_RECOMPUTE if recompute else A2A_PASSES
    a2a_per_token = moe_total * passes * cfg.num_experts_per_tok * cfg.hidden_size * BF16_BYTES
    leaving = 1 - 1 / gpus
    a2a_step = round(tokens * a2a_per_token * leaving)
    a2a_gpu = a2a_step // gpus
    a2a_s = a2a_gpu * BITS_PER_BYTE / (interconnect_gbps * GIGA)
    flops = train_flops_per_token(cfg, seq_len, include_mtp=True, counts=anatomy.counts)
    factor = RECOMPUTE_FLOPS_FACTOR if recompute else 1.0
    compute_s = tokens * flops * factor / (gpus * peak_tflops * TERA * mfu)
    step_s = max(compute_s, a2a_s) if overlap else compute_s + a2a_s
    return TrainPlan(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpus=gpus,
        dp=dp,
        pp=layout["pp"],
        ep=ep,
        pp_auto=pp is None,
        micro_batch=micro_batch,
        micro_batches=micro_batches,
        seq_len=seq_len,
        tokens_per_step=tokens,
        recompute=recompute,
        overlap=overlap,
        precision={**dataclasses.asdict(precision), "per_param": precision.per_param},
        stage_index=layout["stage_index"],
        stage_layers=layout["stage_layers"],
        stage_params=layout["stage_params"],
        stage_bytes=layout["stage_bytes"],
        shard_experts_per_layer=layout["shard_experts_per_layer"],
        shard_params=layout["shard_params"],
        shard_bytes=layout["shard_bytes"],
        activation_bytes_per_token={
            "dense_block": BF16_BYTES * (attention_values_per_token(cfg) + ffn_values_per_token(cfg, moe=False)),
            "moe_block_on_stage": BF16_BYTES * (attention_values_per_token(cfg) + ffn_values_per_token(cfg, moe=True)),
            "moe_block_routed": BF16_BYTES * cfg.num_experts_per_tok * routed_values_per_choice(cfg),
            "logits_per_head": LOGITS_BYTES * cfg.vocab_size,
        },
        gpu_bytes=layout["gpu_bytes"],
        device_memory=memory,
        reserve=reserved,
        usable=usable,
        a2a_bytes_per_token=a2a_per_token,
        a2a_leaving_fraction=leaving,
        a2a_bytes_per_step=a2a_step,
        a2a_bytes_per_gpu=a2a_gpu,
        interconnect_gbps=interconnect_gbps,
        a2a_s=a2a_s,
        flops_per_token=flops,
        peak_tflops=peak_tflops,
        mfu=mfu,
        compute_s=compute_s,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        effective_mfu=tokens * flops / step_s / (gpus * peak_tflops * TERA),
    )


def _train_layout(
    cfg: ModelConfig,
    anatomy: ModelAnatomy,
    precision: TrainPrecision,
    gpus: int,
    pp: int,
    ep: int,
    micro_batch: int,
    micro_batches: int,
    seq_len: int,
    recompute: bool,
) -> dict[str, Any]:
    """Bytes of the largest stage and the largest shard for one pipeline depth."""
    D = cfg.hidden_size
    dp = gpus // pp
    mb_tokens = micro_batch * seq_len
    heads = 1 + len(anatomy.mtp_dense_params)
    stages, start = [], 0
    for index, size in enumerate(split_evenly(cfg.num_hidden_layers, pp)):
        bounds = (start, start + size)
        start += size
        params, values, blocks, largest = _stage_contents(anatomy, cfg, bounds, index == 0, index == pp - 1)
        if recompute:  # each block keeps its input; one block is rebuilt at a time
            act = BF16_BYTES * (micro_batches * mb_tokens * blocks * D + mb_tokens * largest)
        else:
            act = BF16_BYTES * micro_batches * mb_tokens * values
        if index == pp - 1:
            act += micro_batches * mb_tokens * heads * cfg.vocab_size * LOGITS_BYTES
        split = precision.split(params) | {"activations": act}
        stages.append((sum(split.values()), index, bounds, params, split))
    stage_total, stage_index, stage_layers, stage_params, stage_bytes = max(stages, key=lambda s: s[0])

    per_layer = split_evenly(cfg.n_routed_experts, ep)[0]
    moe_total = anatomy.moe_layers + anatomy.mtp_moe_layers
    shard_params = per_layer * moe_total * anatomy.expert_params
    tokens = dp * micro_batches * mb_tokens
    choices = math.ceil(tokens * cfg.num_experts_per_tok * per_layer / cfg.n_routed_experts)  # per MoE layer
    full = routed_values_per_choice(cfg)
    if recompute:
        shard_act = BF16_BYTES * choices * (moe_total * D + full)
    else:
        shard_act = BF16_BYTES * choices * moe_total * full
    shard_bytes = precision.split(shard_params) | {"activations": shard_act}
    return {
        "pp": pp,
        "stage_index": stage_index,
        "stage_layers": stage_layers,
        "stage_params": stage_params,
        "stage_bytes": stage_bytes,
        "shard_experts_per_layer": per_layer,
        "shard_params": shard_params,
        "shard_bytes": shard_bytes,
        "gpu_bytes": stage_total + sum(shard_bytes.values()),
    }
