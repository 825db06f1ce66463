"""The paper check and the economics calculator: parameters, KV cache, training FLOPs, GPU-hours.

Everything here is a pure function of a :class:`~raymoe.platform.config.ModelConfig`. Parameters
are counted on the model itself, built on the meta device (no memory is allocated), so the
counts follow the code rather than a formula that could drift from it.

For the ``deepseek-v3`` preset (measured by ``tests/platform/test_info.py``):

- 671,026,404,352 parameters without MTP (embedding and output head included; transformers'
  ``DeepseekV3ForCausalLM`` counts the same), 37,552,282,624 activated per token;
- 11,610,067,968 unique parameters in the MTP module (it shares the embedding and the head);
- 70,272 bytes of MLA cache per token in bf16, against 4,997,120 for an equal multi-head attention;
- 260.6 GFLOP per trained token at sequence length 4096 (MTP included; see
  :func:`train_flops_per_token`), so DeepSeek-V3's 2.664M H800 GPU-hours for 14.8T tokens at
  989 TFLOP/s (dense bf16 peak) correspond to an MFU of 0.407 (:func:`mfu_for_gpu_hours`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from raymoe.platform.checkpoint.layout import CONFIG_FILE
from raymoe.platform.config import ConfigError, ModelConfig, load_config, model_config_from_hf, validate_model

BF16_BYTES = 2
FLOPS_PER_MAC = 2  # one multiply-accumulate is a multiply and an add
TRAIN_PASS_MULTIPLIER = 3  # backward costs twice the forward's matrix FLOPs (input and weight gradients)
CAUSAL_CONTEXT_FRACTION = 0.5  # under a causal mask a token attends to L/2 keys on average
TERA = 1e12
SECONDS_PER_HOUR = 3600.0
DEFAULT_SEQ_LEN = 4096  # DeepSeek-V3's pre-training sequence length

# DeepSeek-V3 report (arXiv 2412.19437), Table 1 and §3: pre-training cost on H800s
H800_BF16_PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H800 (that of an H100 SXM)
DEEPSEEK_V3_PRETRAIN_TOKENS = 14.8e12
DEEPSEEK_V3_PRETRAIN_GPU_HOURS = 2.664e6


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Parameter counts of one model config (numbers of scalars, not bytes).

    ``total``, ``activated`` and the parts describe the main model, without the MTP modules;
    ``mtp*`` describe the MTP modules alone (their unique parameters: they share the embedding
    and the output head). ``*_matrix`` counts only weights used in matrix products (the input of
    the 6·N FLOPs rule): the output head is included, the embedding (a lookup), norm weights and
    biases are not.
    """

    total: int
    activated: int  # per token: everything but the routed experts not chosen
    embedding: int
    head: int
    attention: int  # MLA projections and their internal norms, all layers
    norms: int  # the layers' input/post-attention norms and the final norm
    dense_mlp: int  # the first_k_dense_replace dense SwiGLUs
    gates: int  # router weights (the bias is a buffer, not counted)
    shared_experts: int
    routed_experts: int  # all routed experts of all MoE layers
    routed_experts_activated: int  # num_experts_per_tok / n_routed_experts of them
    activated_matrix: int  # activated weights in matrix products, head included, embedding excluded
    mtp: int  # unique parameters of all MTP modules
    mtp_activated: int
    mtp_activated_matrix: int  # MTP modules' activated matrices plus the shared head once per module


def _numel(params: Any) -> tuple[int, int]:
    """(all scalars, scalars of matrices, i.e. tensors with 2+ dims) of an iterable of parameters."""
    total = matrix = 0
    for p in params:
        total += p.numel()
        if p.dim() >= 2:
            matrix += p.numel()
    return total, matrix


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    """``DeepseekV3(cfg)`` on the meta device: shapes only, no memory, built in about a second for 671B."""
    from raymoe.platform.model.transformer import DeepseekV3

    with torch.device("meta"):
        return DeepseekV3(cfg)


def _block_counts(block: nn.Module, top_k: int) -> dict[str, int]:
    """Counts of one decoder block (or MTP module, whose extra projections land in ``other``)."""
    from raymoe.platform.model.moe import MoE

    out = dict.fromkeys(
        ("attention", "norms", "dense_mlp", "gates", "shared_experts", "routed", "routed_activated", "other"), 0
    )
    out["attention"] = _numel(block.self_attn.parameters())[0]
    out["norms"] = _numel([block.input_layernorm.weight, block.post_attention_layernorm.weight])[0]
    mlp = block.mlp
    if isinstance(mlp, MoE):
        out["gates"] = mlp.gate.weight.numel()
        if mlp.shared_experts is not None:
            out["shared_experts"] = _numel(mlp.shared_experts.parameters())[0]
        routed = _numel(mlp.experts.parameters())[0]
        out["routed"] = routed
        out["routed_activated"] = routed // mlp.n_experts * top_k
    else:
        out["dense_mlp"] = _numel(mlp.parameters())[0]
    known = sum(v for k, v in out.items() if k != "routed_activated")
    out["other"] = _numel(block.parameters())[0] - known
    # matrix scalars actually multiplied per token: all 2-D weights but the routed experts not chosen
    all_matrix = _numel(block.parameters())[1]
    out["activated_matrix"] = all_matrix - out["routed"] + out["routed_activated"]
    return out


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Count the parameters of ``cfg`` on ``DeepseekV3(cfg)`` built on the meta device.

    Activated per token = embedding + head + attention + norms + dense MLPs + gates + shared
    experts + ``num_experts_per_tok / n_routed_experts`` of the routed experts.
    """
    model = build_meta_model(cfg)
    backbone = model.model
    top_k = cfg.num_experts_per_tok
    embedding = backbone.embed_tokens.weight.numel()
    head = model.lm_head.weight.numel()
    sums: dict[str, int] = {}
    for block in model.main_blocks():
        for key, value in _block_counts(block, top_k).items():
            sums[key] = sums.get(key, 0) + value
    if sums.get("other", 0):
        raise RuntimeError(f"count_params: {sums['other']} parameters of the decoder layers are not classified")
    norms = sums["norms"] + backbone.norm.weight.numel()
    mtp_params = set(map(id, backbone.mtp.parameters()))
    total = sum(p.numel() for p in model.parameters() if id(p) not in mtp_params)
    parts = embedding + head + sums["attention"] + norms + sums["dense_mlp"] + sums["gates"]
    parts += sums["shared_experts"] + sums["routed"]
    if parts != total:
        raise RuntimeError(f"count_params: parts add up to {parts}, the model holds {total}")
    activated = total - sums["routed"] + sums["routed_activated"]

    mtp = mtp_activated = mtp_activated_matrix = 0
    for module in model.mtp_modules():
        c = _block_counts(module, top_k)
        unique = _numel(module.parameters())[0]
        mtp += unique
        mtp_activated += unique - c["routed"] + c["routed_activated"]
        mtp_activated_matrix += c["activated_matrix"] + head  # each module runs the shared head again

    return ParamCounts(
        total=total,
        activated=activated,
        embedding=embedding,
        head=head,
        attention=sums["attention"],
        norms=norms,
        dense_mlp=sums["dense_mlp"],
        gates=sums["gates"],
        shared_experts=sums["shared_experts"],
        routed_experts=sums["routed"],
        routed_experts_activated=sums["routed_activated"],
        activated_matrix=sums["activated_matrix"] + head,
        mtp=mtp,
        mtp_activated=mtp_activated,
        mtp_activated_matrix=mtp_activated_matrix,
    )


# --------------------------------------------------------------------------- KV cache


def kv_cache_bytes_per_token_mla(cfg: ModelConfig, bytes_per_value: int = BF16_BYTES) -> int:
    """Bytes of MLA cache one token costs over the main layers (MTP modules not counted).

    (kv_lora_rank + qk_rope_head_dim) × num_hidden_layers × bytes_per_value: the normalized
    latent and the one RoPE key shared by all heads. 70,272 bytes in bf16 for DeepSeek-V3.
    """
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * bytes_per_value


def kv_cache_bytes_per_token_mha(cfg: ModelConfig, bytes_per_value: int = BF16_BYTES) -> int:
    """Bytes per token of an equal multi-head attention caching full per-head K and V.

    num_attention_heads × (qk_head_dim + v_head_dim) × num_hidden_layers × bytes_per_value
    (4,997,120 bytes ≈ 5.0 MB in bf16 for DeepSeek-V3).
    """
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * bytes_per_value


# --------------------------------------------------------------------------- FLOPs and GPU-hours


def attention_flops_per_token(cfg: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN, num_layers: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of the attention scores and values.

    In one layer a token's query meets L/2 keys on average under the causal mask (counted:
    the masked half is not), each costing num_attention_heads × qk_head_dim MACs for q·k and
    num_attention_heads × v_head_dim MACs for p·v. Forward = 2 × H × (qk_head_dim + v_head_dim)
    × L/2 FLOPs; training is 3× that:

        6 × layers × H × (qk_head_dim + v_head_dim) × L/2  =  3 × layers × H × (192 + 128) × L

    (the naive MLA path that training runs; softmax, RoPE and masking are not counted).
    ``num_layers`` defaults to num_hidden_layers + num_nextn_predict_layers (the MTP modules
    attend too). 31.2 GFLOP per token for DeepSeek-V3 at L = 4096.
    """
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if num_layers is None else num_layers
    macs_per_key = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    keys = CAUSAL_CONTEXT_FRACTION * seq_len
    return float(TRAIN_PASS_MULTIPLIER * FLOPS_PER_MAC * layers * macs_per_key * keys)


def train_flops_per_token(
    cfg: ModelConfig,
    seq_len: int = DEFAULT_SEQ_LEN,
    include_mtp: bool = True,
    counts: ParamCounts | None = None,
) -> float:
    """Training FLOPs (forward + backward) per token: 6 × activated matrix parameters + attention.

    Counted in the 6·N term (2 FLOPs per MAC × 3 for forward and backward): every activated
    weight that enters a matrix product: MLA projections, dense MLPs, router weights, shared
    experts, the chosen routed experts and the output head; with ``include_mtp`` also each MTP
    module's projection ``eh_proj``, its block and one more pass through the shared head.
    Not counted: the embedding lookup, norms, activations, the softmax. The attention term is
    :func:`attention_flops_per_token` over the main layers (and the MTP modules with
    ``include_mtp``). 260.6 GFLOP for DeepSeek-V3 at L = 4096 with MTP, 250.4 without.
    """
    counts = counts if counts is not None else count_params(cfg)
    matrix = counts.activated_matrix + (counts.mtp_activated_matrix if include_mtp else 0)
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    dense = TRAIN_PASS_MULTIPLIER * FLOPS_PER_MAC * matrix
    return float(dense) + attention_flops_per_token(cfg, seq_len, num_layers=layers)


def gpu_hours(tokens: float, flops_per_token: float, peak_tflops: float, mfu: float) -> float:
    """GPU-hours to train on ``tokens``: tokens × flops_per_token / (peak_tflops × 1e12 × mfu) / 3600."""
    if peak_tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"peak_tflops must be > 0 and mfu in (0, 1], got {peak_tflops} and {mfu}")
    return tokens * flops_per_token / (peak_tflops * TERA * mfu) / SECONDS_PER_HOUR


def mfu_for_gpu_hours(tokens: float, flops_per_token: float, peak_tflops: float, target_gpu_hours: float) -> float:
    """The MFU at which :func:`gpu_hours` gives ``target_gpu_hours`` (0.407 for DeepSeek-V3's 2.664M)."""
    if peak_tflops <= 0 or target_gpu_hours <= 0:
        raise ValueError(f"peak_tflops and target_gpu_hours must be > 0, got {peak_tflops} and {target_gpu_hours}")
    return tokens * flops_per_token / (peak_tflops * TERA * target_gpu_hours * SECONDS_PER_HOUR)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What ``raymoe info`` reports for one config; units in the field names or comments."""

    total_params: int  # without MTP, embedding and head included
    activated_params: int  # per token, without MTP
    mtp_params: int  # unique (shared embedding and head not counted again)
    mtp_activated_params: int
    embedding_params: int
    head_params: int
    activated_matrix_params: int  # without MTP; head included, embedding excluded
    mtp_activated_matrix_params: int  # with one extra head pass per MTP module
    kv_cache_bytes_per_token_mla: int  # bf16, main layers
    kv_cache_bytes_per_token_mha: int  # bf16, main layers
    seq_len: int  # tokens, for the attention term
    attention_flops_per_token: float  # training, main layers and MTP modules
    train_flops_per_token: float  # forward + backward, MTP included
    train_flops_per_token_without_mtp: float
    tokens: float | None = None
    peak_tflops: float | None = None  # per GPU, TFLOP/s
    mfu: float | None = None
    gpu_hours: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready), without the economics fields that were not computed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def model_info(
    cfg: ModelConfig,
    seq_len: int = DEFAULT_SEQ_LEN,
    tokens: float | None = None,
    peak_tflops: float | None = None,
    mfu: float | None = None,
) -> ModelInfo:
    """Counts, cache sizes and training FLOPs of ``cfg``; GPU-hours when tokens, peak and MFU are all given."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    counts = count_params(cfg)
    flops = train_flops_per_token(cfg, seq_len, include_mtp=True, counts=counts)
    hours = None
    if tokens is not None and peak_tflops is not None and mfu is not None:
        hours = gpu_hours(tokens, flops, peak_tflops, mfu)
    return ModelInfo(
        total_params=counts.total,
        activated_params=counts.activated,
        mtp_params=counts.mtp,
        mtp_activated_params=counts.mtp_activated,
        embedding_params=counts.embedding,
        head_params=counts.head,
        activated_matrix_params=counts.activated_matrix,
        mtp_activated_matrix_params=counts.mtp_activated_matrix,
        kv_cache_bytes_per_token_mla=kv_cache_bytes_per_token_mla(cfg),
        kv_cache_bytes_per_token_mha=kv_cache_bytes_per_token_mha(cfg),
        seq_len=seq_len,
        attention_flops_per_token=attention_flops_per_token(cfg, seq_len),
        train_flops_per_token=flops,
        train_flops_per_token_without_mtp=train_flops_per_token(cfg, seq_len, include_mtp=False, counts=counts),
        tokens=tokens,
        peak_tflops=peak_tflops,
        mfu=mfu,
        gpu_hours=hours,
    )


def resolve_model_config(source: str, overrides: list[str] | None = None) -> ModelConfig:
    """The model config of a preset name, a ``.yaml`` file, or a Hugging Face checkpoint.

    ``source`` may be a checkpoint directory holding ``config.json`` or a ``.json`` file itself
    (read by :func:`model_config_from_hf`); ``overrides`` are dotted ``model.field=value`` items
    (any section for a preset or YAML; only ``model.*`` for a Hugging Face config).
    """
    path = Path(source)
    hf_json = path / CONFIG_FILE if path.is_dir() else path if path.suffix == ".json" else None
    if hf_json is None:
        return load_config(source, overrides).model
    if not hf_json.is_file():
        raise ConfigError(f"{hf_json} does not exist; give a preset name, a .yaml file or a checkpoint directory")
    cfg = model_config_from_hf(hf_json)
    if not overrides:
        return cfg
    items = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ConfigError(f"override {item!r}: a Hugging Face config takes only model.field=value overrides")
        items.append(f"{key.removeprefix('model.')}={value}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(items))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override of {hf_json}: {str(exc).splitlines()[0]}") from None
    validate_model(cfg)
    return cfg
