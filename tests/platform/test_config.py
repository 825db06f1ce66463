"""Presets, dotted overrides, Hugging Face config.json, and validation errors that name the field."""

from __future__ import annotations

import json

import pytest

from raymoe.platform.config import (
    PRESETS,
    ConfigError,
    load_config,
    model_config_from_hf,
    model_config_to_hf,
)

BENCH = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=6,
    first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
    topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=2048,
    num_nextn_predict_layers=0, tie_word_embeddings=False,
)  # fmt: skip


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.model.hidden_size > 0


def test_bench_preset_is_exactly_the_issue() -> None:
    m = load_config("bench").model
    for key, value in BENCH.items():
        assert getattr(m, key) == value, key


def test_deepseek_v3_preset_equals_transformers_defaults() -> None:
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config()
    m = load_config("deepseek-v3").model
    for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob"):  # fmt: skip
        assert getattr(m, key) == getattr(hf, key), key
    assert m.rope_scaling.factor == 40 and m.rope_scaling.original_max_position_embeddings == 4096


def test_dotted_overrides() -> None:
    cfg = load_config("tiny", ["model.n_routed_experts=16", "train.steps=7", "train.dtype=bf16"])
    assert cfg.model.n_routed_experts == 16
    assert cfg.train.steps == 7 and cfg.train.dtype == "bf16"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.no_such_field=1"], "model.no_such_field"),
        (["nosection.x=1"], "nosection"),
        (["model.hidden_size=0"], "model.hidden_size"),
        (["model.kv_lora_rank=-4"], "model.kv_lora_rank"),
        (["model.n_routed_experts=10"], "model.n_routed_experts"),
        (["model.topk_group=5"], "model.topk_group"),
        (["model.num_experts_per_tok=5"], "model.num_experts_per_tok"),
        (["model.first_k_dense_replace=4"], "model.first_k_dense_replace"),
        (["model.n_group=8"], "model.n_group"),
        (["model.qk_rope_head_dim=7"], "model.qk_rope_head_dim"),
        (["model.tie_word_embeddings=true"], "model.tie_word_embeddings"),
        (["model.hidden_size=abc"], "model.hidden_size"),
        (["train.dtype=fp16"], "train.dtype"),
        (["train.batch_size=3", "parallel.micro_batches=2"], "train.batch_size"),
        (["train.seq_len=4096"], "train.seq_len"),
        (["train.lr=0"], "train.lr"),
        (["parallel.ep=9"], "parallel.ep"),
        (["parallel.pp=0"], "parallel.pp"),
        (["parallel.placement=STRICT"], "parallel.placement"),
        (["parallel.transport=nccl"], "parallel.transport"),
        (["serve.port=70000"], "unknown config field 'serve'"),  # no serve section: raymoe serve has flags
        (["train.steps"], "train.steps"),
    ],
)
def test_validation_names_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert field in str(info.value)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_hf_config_round_trip_and_transformers(tmp_path) -> None:
    from transformers import DeepseekV3Config

    m = load_config("deepseek-v3").model
    path = tmp_path / "config.json"
    path.write_text(json.dumps(model_config_to_hf(m)))
    assert model_config_from_hf(path) == m
    hf = DeepseekV3Config.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert hf.n_routed_experts == 256 and hf.num_mtp_layers == 1


def test_hf_config_legacy_rope_scaling_and_errors(tmp_path) -> None:
    legacy = {
        "model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 4, "n_routed_experts": 8,
        "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {"quant_method": "fp8"}, "eos_token_id": [1, 2],
    }  # fmt: skip
    m = model_config_from_hf(legacy)
    assert m.rope_scaling is not None and m.rope_scaling.factor == 40 and m.eos_token_id == 1
    with pytest.raises(ConfigError, match="n_group"):
        model_config_from_hf({**legacy, "n_group": 3})
    with pytest.raises(ConfigError, match="model_type"):
        model_config_from_hf({**legacy, "model_type": "llama"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        model_config_from_hf(bad)
