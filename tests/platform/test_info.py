"""The paper check (parameter counts, MLA cache) and the economics calculator, on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from raymoe.pipelines import cli
from raymoe.platform.config import ConfigError, ModelConfig, load_config, model_config_to_hf
from raymoe.platform.info import (
    DEEPSEEK_V3_PRETRAIN_GPU_HOURS,
    DEEPSEEK_V3_PRETRAIN_TOKENS,
    H800_BF16_PEAK_TFLOPS,
    attention_flops_per_token,
    count_params,
    gpu_hours,
    kv_cache_bytes_per_token_mha,
    kv_cache_bytes_per_token_mla,
    mfu_for_gpu_hours,
    resolve_model_config,
    train_flops_per_token,
)

from conftest import tiny_variant
from hf_reference import hf_config

# the MFU at which our FLOPs per token reproduce the report's 2.664M H800 GPU-hours
DEEPSEEK_V3_REPRODUCING_MFU = 0.407
GPU_HOURS_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def v3() -> ModelConfig:
    return load_config("deepseek-v3").model


@pytest.fixture(scope="module")
def v3_counts(v3):
    return count_params(v3)


def _hf_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated) counted on transformers' DeepseekV3ForCausalLM built on the meta device."""
    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(hf_config(cfg))
    total = sum(p.numel() for p in model.parameters())
    routed = sum(
        p.numel()
        for layer in model.model.layers
        if hasattr(layer.mlp, "experts")
        for p in layer.mlp.experts.parameters()
    )
    return total, total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts


def test_deepseek_v3_matches_the_paper(v3, v3_counts):
    c = v3_counts
    assert round(c.total / 1e9, 1) == 671.0
    assert 37.5e9 <= c.activated <= 37.6e9
    assert 11.5e9 <= c.mtp <= 11.7e9  # "11.5B unique" in DeepSeek's weight documentation; 11.61B counted
    assert c.embedding == c.head == 129280 * 7168
    assert c.routed_experts == 58 * 256 * 3 * 7168 * 2048
    assert c.routed_experts_activated == 58 * 8 * 3 * 7168 * 2048
    assert c.activated_matrix == c.activated - c.embedding - c.norms - (c.attention - _attention_matrices(v3))
    assert kv_cache_bytes_per_token_mla(v3) == 70_272
    assert kv_cache_bytes_per_token_mha(v3) == 128 * (192 + 128) * 61 * 2
    assert round(kv_cache_bytes_per_token_mha(v3) / 1e6, 1) == 5.0


def _attention_matrices(cfg: ModelConfig) -> int:
    """Matrix scalars of MLA in all main layers, in closed form (DeepSeek-V3 has q_lora_rank)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    per_layer = (
        D * cfg.q_lora_rank
        + cfg.q_lora_rank * H * cfg.qk_head_dim
        + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + H * cfg.v_head_dim * D
    )
    return per_layer * cfg.num_hidden_layers


@pytest.mark.parametrize("name", ["deepseek-v3", "tiny", "tiny-no-shared-mla-q"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_counts_match_transformers(name, v3, v3_counts):
    if name == "deepseek-v3":
        cfg, counts = v3, v3_counts
    elif name == "tiny":
        cfg = load_config("tiny").model
        counts = count_params(cfg)
    else:
        cfg = tiny_variant(n_shared_experts=0, q_lora_rank=None, num_nextn_predict_layers=2)
        counts = count_params(cfg)
    total, activated = _hf_counts(cfg)
    assert counts.total == total
    assert counts.activated == activated
    if name == "deepseek-v3":
        assert total == 671_026_404_352  # REFERENCE.md: 671.026B on the meta device


def test_mtp_counts_are_unique_and_scale_with_depth():
    one = count_params(tiny_variant(num_nextn_predict_layers=1))
    two = count_params(tiny_variant(num_nextn_predict_layers=2))
    none = count_params(tiny_variant(num_nextn_predict_layers=0))
    assert one.total == two.total == none.total
    assert none.mtp == none.mtp_activated == none.mtp_activated_matrix == 0
    assert two.mtp == 2 * one.mtp
    # each module runs the shared head once more, but does not own it; its norms are no matrices
    assert two.mtp_activated_matrix == 2 * one.mtp_activated_matrix
    assert 0 < one.mtp_activated_matrix - one.head < one.mtp_activated


def test_flops_formula(v3, v3_counts):
    L = 4096
    attn = attention_flops_per_token(v3, L)
    assert attn == 6 * 62 * 128 * (192 + 128) * L / 2  # causal: L/2 keys per query on average
    with_mtp = train_flops_per_token(v3, L, counts=v3_counts)
    without = train_flops_per_token(v3, L, include_mtp=False, counts=v3_counts)
    assert with_mtp == 6 * (v3_counts.activated_matrix + v3_counts.mtp_activated_matrix) + attn
    assert without == 6 * v3_counts.activated_matrix + attention_flops_per_token(v3, L, num_layers=61)
    assert 255e9 < with_mtp < 265e9
    assert train_flops_per_token(v3, 2 * L, counts=v3_counts) - with_mtp == pytest.approx(attn)


def test_gpu_hours_reproduce_the_report(v3, v3_counts):
    flops = train_flops_per_token(v3, counts=v3_counts)
    hours = gpu_hours(DEEPSEEK_V3_PRETRAIN_TOKENS, flops, H800_BF16_PEAK_TFLOPS, DEEPSEEK_V3_REPRODUCING_MFU)
    assert abs(hours / DEEPSEEK_V3_PRETRAIN_GPU_HOURS - 1) < GPU_HOURS_TOLERANCE
    mfu = mfu_for_gpu_hours(DEEPSEEK_V3_PRETRAIN_TOKENS, flops, H800_BF16_PEAK_TFLOPS, DEEPSEEK_V3_PRETRAIN_GPU_HOURS)
    assert round(mfu, 3) == DEEPSEEK_V3_REPRODUCING_MFU
    assert gpu_hours(DEEPSEEK_V3_PRETRAIN_TOKENS, flops, H800_BF16_PEAK_TFLOPS, mfu) == pytest.approx(
        DEEPSEEK_V3_PRETRAIN_GPU_HOURS
    )
    with pytest.raises(ValueError, match="mfu"):
        gpu_hours(1e9, flops, H800_BF16_PEAK_TFLOPS, 0.0)


def test_resolve_hf_config_with_overrides(tmp_path):
    cfg = load_config("tiny").model
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(cfg)))
    assert resolve_model_config(str(tmp_path)) == cfg
    changed = resolve_model_config(str(tmp_path / "config.json"), ["model.n_routed_experts=16"])
    assert changed.n_routed_experts == 16
    with pytest.raises(ConfigError, match="model.field=value"):
        resolve_model_config(str(tmp_path), ["train.steps=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_config(str(tmp_path / "missing.json"))


@pytest.fixture
def info_only_cli(monkeypatch):
    """The real ``raymoe`` parser with only the ``info`` subcommand (the others are not needed here)."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", ("info",))


def test_cli_json(info_only_cli, capsys):
    assert cli.main(["info", "deepseek-v3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == 671_026_404_352
    assert 37.5e9 <= out["activated_params"] <= 37.6e9
    assert 11.5e9 <= out["mtp_params"] <= 11.7e9
    assert out["kv_cache_bytes_per_token_mla"] == 70_272
    assert out["kv_cache_bytes_per_token_mha"] == 4_997_120
    assert out["seq_len"] == 4096
    assert 255e9 < out["train_flops_per_token"] < 265e9
    assert out["mfu"] == 0.4
    assert abs(out["gpu_hours"] / DEEPSEEK_V3_PRETRAIN_GPU_HOURS - 1) < GPU_HOURS_TOLERANCE


def test_cli_overrides_table_and_errors(info_only_cli, capsys):
    assert cli.main(["info", "tiny", "model.n_routed_experts=16", "--json", "--seq-len", "64", "--mfu", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == count_params(tiny_variant(n_routed_experts=16)).total
    assert out["seq_len"] == 64 and out["mfu"] == 0.5
    assert cli.main(["info", "tiny"]) == 0
    table = capsys.readouterr().out
    assert "MLA cache per token" in table and "GPU-hours" in table
    assert cli.main(["info", "tiny", "model.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert cli.main(["info", "tiny", "--mfu", "1.5"]) == 2
