"""Typed configuration for raymoe: the schema, the presets, dotted overrides and validation.

The dataclasses below are the source of truth. OmegaConf merges a YAML preset and dotted
command-line overrides (``model.n_routed_experts=16 train.steps=200``) into them, and
:func:`validate` checks the result in one place; every error names the field it is about.

Model field names follow Hugging Face's ``DeepseekV3Config`` so that a checkpoint's
``config.json`` loads as it is (:func:`model_config_from_hf`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("tiny", "small", "bench", "deepseek-v3")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what to do."""


@dataclass(kw_only=True)
class RopeScalingConfig:
    """YaRN scaling of the decoupled RoPE (DeepSeek-V3: factor 40 over an original 4096)."""

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(kw_only=True)
class ModelConfig:
    """The DeepSeek-V3 architecture; names and defaults are those of the 671B checkpoint."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: queries through one full-rank projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace


TRANSPORTS = ("object_store", "direct")
TRAIN_DTYPES = ("fp32", "bf16", "auto")  # train.dtype; auto: bf16 where its products are fast
PLACEMENTS = ("auto", "PACK", "SPREAD")
EXPERT_PLACEMENTS = ("contiguous", "balanced")


@dataclass(kw_only=True)
class ParallelConfig:
    """How the actor graph cuts the model: attention replicas × stages, and expert shards."""

    dp: int = 1
    pp: int = 1
    ep: int = 1
    micro_batches: int = 1
    device: str = "auto"  # auto (CUDA when the process sees a GPU) | cpu | cuda: where every trainer computes
    num_cpus_per_actor: float = 0.0
    num_gpus_per_actor: float = 0.0
    memory_per_actor_gb: float = 0.0  # memory each actor's bundle reserves (0: none)
    # the placement group's strategy: PACK (fill nodes in turn) | SPREAD (one actor a node where it can) | auto
    # (SPREAD when actors reserve nothing and the cluster has several nodes, so they do not all share one; else PACK)
    placement: str = "auto"
    reserve_timeout_s: float = 60.0  # the longest the graph waits for its placement group, then names what is missing
    # where each MoE layer's experts sit: contiguous blocks (routing groups together) | balanced by the expert
    # loads of expert_loads (a loads JSON) or, when empty, of train.init_from (actors/placement.py)
    expert_placement: str = "contiguous"
    expert_loads: str = ""
    transport: str = "object_store"  # object_store | direct (Ray Direct Transport over gloo): activations, gradients
    timeout_s: float = 30.0  # the longest the driver waits on the actors for one step: a hung actor's bound
    long_timeout_s: float = 600.0  # the same for starting actors, checkpoints and evaluation


@dataclass(kw_only=True)
class TrainConfig:
    """Optimizer, schedule and balancing of pretraining."""

    steps: int = 200
    batch_size: int = 8  # sequences per optimizer step (all micro-batches together)
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free bias rule
    bias_update_speed_final: float | None = None  # gamma at the last step (linear ramp); None = constant
    seq_aux_alpha: float = 0.0  # sequence-wise balance loss weight; 0 = off
    checkpoint_uri: str = ""  # where checkpoints go: a path or pyarrow URI (s3://...); default: the run's output
    keep_last: int = 0  # keep only the newest N checkpoints (0 = all)
    init_from: str = ""  # start from this checkpoint's weights (any layout, path or URI; step 0, fresh optimizer)
    dtype: str = "fp32"  # fp32 | bf16 (mixed precision: bf16 matmuls, fp32 master weights) | auto (bf16 where fast)
    compile: bool = False  # torch.compile each block's dense parts (attention, norms, gate, shared experts)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0


@dataclass(kw_only=True)
class DataConfig:
    """What the training loop records about its data (the data itself is ``--data``)."""

    record_samples: bool = False  # write OUTPUT/samples.jsonl: the sample ids of every completed step


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking; uri None means MLFLOW_TRACKING_URI or sqlite:///mlruns.db."""

    uri: str | None = None
    experiment: str = "raymoe"
    enabled: bool = True
    registered_model: str = "raymoe"  # Model Registry name of each run's final checkpoint; "" registers none


@dataclass(kw_only=True)
class ElasticConfig:
    """What the actor graph does when actors die or resources change (the graph trainer only)."""

    enabled: bool = True  # recover from failures; False: the first failure ends the run
    max_failures: int = 3  # failures tolerated within window_s (then the run fails)
    window_s: float = 3600.0
    backoff_s: float = 1.0  # before rebuilding; doubles on consecutive failures
    max_backoff_s: float = 30.0
    min_dp: int = 1  # the smallest layout the graph may shrink to
    min_ep: int = 1
    grow: bool = True  # grow back toward parallel.dp/ep at step boundaries when actors fit again


FINETUNE_METHODS = ("full", "esft-token", "esft-gate", "frozen-router")


@dataclass(kw_only=True)
class FinetuneConfig:
    """What a fine-tune trains (``raymoe finetune``; :mod:`raymoe.platform.train.finetune`).

    ``method``: ``full`` (every parameter), ``frozen-router`` (all but the gates' weights),
    ``esft-token`` / ``esft-gate`` (ESFT, arXiv 2407.01906: per MoE layer only the experts of
    ``experts``, chosen on a sample of the data as the smallest set whose token-selection ratio or
    average gate score sums to at least ``top_p``; everything else frozen). ``experts`` is filled by the
    selection (MoE layer id as a string -> expert ids) and kept in the run's config, so that a resumed or
    rebuilt run trains the same ones."""

    method: str = "full"
    top_p: float = 0.2  # ESFT's threshold p, in (0, 1] (ESFT's scripts use 0.2 for token, the paper 0.1 for gate)
    sample_sequences: int = 32  # sequences of the data whose routing selects the experts
    bias_update: bool = False  # update the gates' biases (train.bias_update_speed) while fine-tuning
    dead_fraction: float = 0.1  # an expert is dead in a step when its load is below this fraction of uniform
    general_every: int = 10  # loss on the general held-out set every this many steps (0: at the end only)
    general_batches: int = 4  # batches of the general held-out set per evaluation
    experts: dict[str, list[int]] = field(default_factory=dict)


@dataclass(kw_only=True)
class RaymoeConfig:
    """The whole configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------- loading


def preset_path(preset: str) -> Path:
    """The YAML file of a named preset, or ``preset`` itself when it is a path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = PRESET_DIR / f"{preset}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or a .yaml path")
    return candidate


def load_config(preset: str = "small", overrides: list[str] | None = None) -> RaymoeConfig:
    """Build a validated config from a preset (name or YAML path) and dotted overrides."""
    schema = OmegaConf.structured(RaymoeConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.load(preset_path(preset)))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not of the form section.field=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    validate(cfg)
    return cfg


def config_from_dict(d: dict[str, Any]) -> RaymoeConfig:
    """The inverse of :func:`config_to_dict` (a checkpoint's config), validated."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RaymoeConfig), d))
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    validate(cfg)
    return cfg


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config field {key!r}: {msg}"
    return f"config field {key!r}: {msg}" if key else msg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (for MLflow params, JSON, checkpoints)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"hidden_size": 8}}`` -> ``{"model.hidden_size": 8}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------- validation


def _positive(section: str, obj: Any, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if name in allow_zero:
            if value < 0:
                raise ConfigError(f"{section}.{name} must be >= 0, got {value}")
        elif value <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value}")


def validate_model(m: ModelConfig, section: str = "model") -> None:
    """Check a model config; raise :class:`ConfigError` naming the first wrong field."""
    _positive(
        section,
        m,
        (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
            "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
            "routed_scaling_factor", "max_position_embeddings", "rope_theta", "rms_norm_eps",
            "first_k_dense_replace", "num_nextn_predict_layers",
        ),
        allow_zero=("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"),
    )  # fmt: skip
    if m.qk_rope_head_dim % 2:
        raise ConfigError(f"{section}.qk_rope_head_dim must be even (RoPE rotates pairs), got {m.qk_rope_head_dim}")
    if m.first_k_dense_replace > m.num_hidden_layers:
        raise ConfigError(
            f"{section}.first_k_dense_replace ({m.first_k_dense_replace}) is more than "
            f"{section}.num_hidden_layers ({m.num_hidden_layers})"
        )
    if m.n_routed_experts % m.n_group:
        raise ConfigError(
            f"{section}.n_routed_experts ({m.n_routed_experts}) must be divisible by {section}.n_group ({m.n_group})"
        )
    if m.n_group > 1 and m.n_routed_experts // m.n_group < 2:
        raise ConfigError(
            f"{section}.n_group ({m.n_group}) leaves fewer than 2 experts per group; a group scores "
            f"the sum of its top-2 experts"
        )
    if m.topk_group > m.n_group:
        raise ConfigError(f"{section}.topk_group ({m.topk_group}) is more than {section}.n_group ({m.n_group})")
    reachable = m.topk_group * (m.n_routed_experts // m.n_group)
    if m.num_experts_per_tok > reachable:
        raise ConfigError(
            f"{section}.num_experts_per_tok ({m.num_experts_per_tok}) is more than the {reachable} experts "
            f"in {section}.topk_group ({m.topk_group}) groups of {m.n_routed_experts // m.n_group}"
        )
    if m.scoring_func != "sigmoid":
        raise ConfigError(f"{section}.scoring_func must be 'sigmoid' (DeepSeek-V3), got {m.scoring_func!r}")
    if m.hidden_act != "silu":
        raise ConfigError(f"{section}.hidden_act must be 'silu', got {m.hidden_act!r}")
    if m.tie_word_embeddings:
        raise ConfigError(f"{section}.tie_word_embeddings must be false: DeepSeek-V3 has untied embeddings")
    if m.rope_scaling is not None:
        rs = m.rope_scaling
        if rs.type != "yarn":
            raise ConfigError(f"{section}.rope_scaling.type must be 'yarn', got {rs.type!r}")
        _positive(f"{section}.rope_scaling", rs, ("factor", "original_max_position_embeddings", "beta_fast"))
        if rs.beta_slow < 0:
            raise ConfigError(f"{section}.rope_scaling.beta_slow must be >= 0, got {rs.beta_slow}")
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(m, name)
        if value is not None and not 0 <= value < m.vocab_size:
            raise ConfigError(f"{section}.{name} ({value}) is outside the vocabulary [0, {m.vocab_size})")


def validate(cfg: RaymoeConfig) -> None:
    """Check a whole config; raise :class:`ConfigError` naming the first wrong field."""
    validate_model(cfg.model)
    p = cfg.parallel
    _positive("parallel", p, ("dp", "pp", "ep", "micro_batches"))
    _positive("parallel", p, ("num_cpus_per_actor", "num_gpus_per_actor"), ("num_cpus_per_actor", "num_gpus_per_actor"))
    _positive("parallel", p, ("timeout_s", "long_timeout_s", "reserve_timeout_s"))
    _positive("parallel", p, ("memory_per_actor_gb",), ("memory_per_actor_gb",))
    if p.expert_placement not in EXPERT_PLACEMENTS:
        raise ConfigError(f"parallel.expert_placement must be one of {', '.join(EXPERT_PLACEMENTS)}, "
                          f"got {p.expert_placement!r}")  # fmt: skip
    if p.placement not in PLACEMENTS:
        raise ConfigError(f"parallel.placement must be one of {', '.join(PLACEMENTS)}, got {p.placement!r}")
    if p.transport not in TRANSPORTS:
        raise ConfigError(f"parallel.transport must be one of {', '.join(TRANSPORTS)}, got {p.transport!r}")
    from raymoe.platform.devices import check_device_name

    try:
        check_device_name(p.device, "parallel.device")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    e = cfg.elastic
    _positive("elastic", e, ("max_failures", "window_s", "backoff_s", "max_backoff_s", "min_dp", "min_ep"),
              ("max_failures", "backoff_s", "max_backoff_s"))  # fmt: skip
    if e.min_dp > p.dp or e.min_ep > p.ep:
        raise ConfigError(
            f"elastic.min_dp/min_ep ({e.min_dp}/{e.min_ep}) must not exceed parallel.dp/ep ({p.dp}/{p.ep})"
        )
    if p.pp > cfg.model.num_hidden_layers:
        raise ConfigError(f"parallel.pp ({p.pp}) is more than model.num_hidden_layers ({cfg.model.num_hidden_layers})")
    if p.ep > cfg.model.n_routed_experts:
        raise ConfigError(f"parallel.ep ({p.ep}) is more than model.n_routed_experts ({cfg.model.n_routed_experts})")
    t = cfg.train
    _positive("train", t, ("steps", "batch_size", "seq_len", "lr", "beta1", "beta2"))
    _positive(
        "train",
        t,
        ("warmup_steps", "weight_decay", "grad_clip", "mtp_lambda", "bias_update_speed", "seq_aux_alpha",
         "log_every", "eval_every", "checkpoint_every", "min_lr_ratio", "keep_last"),
        allow_zero=("warmup_steps", "weight_decay", "grad_clip", "mtp_lambda", "bias_update_speed",
                    "seq_aux_alpha", "log_every", "eval_every", "checkpoint_every", "min_lr_ratio", "keep_last"),
    )  # fmt: skip
    if not (t.beta1 < 1 and t.beta2 < 1):
        raise ConfigError(f"train.beta1/train.beta2 must be < 1, got {t.beta1}/{t.beta2}")
    if t.min_lr_ratio > 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.dtype not in TRAIN_DTYPES:
        raise ConfigError(f"train.dtype must be one of {', '.join(TRAIN_DTYPES)}, got {t.dtype!r}")
    if t.batch_size % (p.micro_batches * p.dp):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by parallel.micro_batches × parallel.dp "
            f"({p.micro_batches} × {p.dp})"
        )
    if t.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len ({t.seq_len}) is more than model.max_position_embeddings "
            f"({cfg.model.max_position_embeddings})"
        )
    if t.bias_update_speed_final is not None and t.bias_update_speed_final < 0:
        raise ConfigError(f"train.bias_update_speed_final must be >= 0, got {t.bias_update_speed_final}")
    validate_finetune(cfg.finetune, cfg.model)


def validate_finetune(f: FinetuneConfig, m: ModelConfig) -> None:
    """Check the ``finetune`` section against the model; :class:`ConfigError` naming the first wrong field."""
    if f.method not in FINETUNE_METHODS:
        raise ConfigError(f"finetune.method must be one of {', '.join(FINETUNE_METHODS)}, got {f.method!r}")
    if not 0.0 < f.top_p <= 1.0:
        raise ConfigError(f"finetune.top_p must be in (0, 1], got {f.top_p}")
    if not 0.0 <= f.dead_fraction < 1.0:
        raise ConfigError(f"finetune.dead_fraction must be in [0, 1), got {f.dead_fraction}")
    _positive("finetune", f, ("sample_sequences", "general_batches", "general_every"), ("general_every",))
    last = m.num_hidden_layers + m.num_nextn_predict_layers
    for layer, experts in f.experts.items():
        if not str(layer).isdigit() or not m.first_k_dense_replace <= int(layer) < last:
            raise ConfigError(
                f"finetune.experts: {layer!r} is not a MoE layer id in [{m.first_k_dense_replace}, {last})"
            )
        bad = [e for e in experts if not 0 <= e < m.n_routed_experts]
        if bad:
            raise ConfigError(f"finetune.experts[{layer}]: expert {bad[0]} is outside [0, {m.n_routed_experts})")


# --------------------------------------------------------------------------- Hugging Face config.json

_HF_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope_scaling", "rope_theta"}
# config.json keys of the architecture that carry nothing this model needs
_HF_IGNORED = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "num_key_value_heads", "pretraining_tp", "use_cache", "attention_dropout", "aux_loss_alpha",
    "seq_aux", "ep_size", "moe_layer_freq", "topk_method", "pad_token_id", "output_router_logits",
    "quantization_config", "head_dim", "qk_head_dim", "_name_or_path", "tie_word_embeddings",
    "num_mtp_layers", "id2label", "label2id", "return_dict", "output_hidden_states", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "tokenizer_class", "task_specific_params",
}  # fmt: skip


def model_config_from_hf(hf: dict[str, Any] | str | Path) -> ModelConfig:
    """Read a Hugging Face DeepseekV3 ``config.json`` (a dict or a path) into a validated ModelConfig."""
    if not isinstance(hf, dict):
        path = Path(hf)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read Hugging Face config {path}: {exc}") from None
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type != "deepseek_v3":
        raise ConfigError(f"config.json model_type is {model_type!r}; raymoe loads 'deepseek_v3'")
    kwargs: dict[str, Any] = {k: v for k, v in hf.items() if k in _HF_FIELDS}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    if hf.get("tie_word_embeddings"):
        raise ConfigError("config.json tie_word_embeddings is true; DeepSeek-V3 has untied embeddings")
    # transformers 5 writes rope_parameters; older checkpoints write rope_theta + rope_scaling
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or legacy.get("type") or legacy.get("rope_type") or "default"
    scaling = None
    if rope_type == "yarn":
        src = {**legacy, **rope}
        scaling = RopeScalingConfig(
            factor=float(src["factor"]),
            original_max_position_embeddings=int(
                src.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
            ),
            beta_fast=float(src.get("beta_fast") or 32),
            beta_slow=float(src.get("beta_slow") or 1),
            mscale=float(src.get("mscale") or 1.0),
            mscale_all_dim=float(src.get("mscale_all_dim") or 0.0),
        )
    elif rope_type != "default":
        raise ConfigError(f"config.json rope type {rope_type!r} is not supported (default or yarn)")
    try:
        cfg = ModelConfig(**kwargs, rope_theta=float(rope_theta), rope_scaling=scaling)
    except TypeError as exc:
        raise ConfigError(f"config.json: {exc}") from None
    validate_model(cfg, section="config.json")
    return cfg


def model_config_to_hf(m: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` that transformers' ``DeepseekV3Config`` and raymoe both load."""
    out: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **{k: v for k, v in dataclasses.asdict(m).items() if k in _HF_FIELDS},
        "num_key_value_heads": m.num_attention_heads,
        "tie_word_embeddings": False,
        "rope_theta": m.rope_theta,
    }
    if m.rope_scaling is None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rope_theta}
    else:
        rs = m.rope_scaling
        out["rope_parameters"] = {
            "rope_type": "yarn",
            "rope_theta": m.rope_theta,
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
            "mscale": rs.mscale,
            "mscale_all_dim": rs.mscale_all_dim,
        }
        out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in out["rope_parameters"].items() if k != "rope_type"}}
    return out
