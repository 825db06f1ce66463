"""Capacity plans (serve and train) against hand arithmetic, on the meta device."""

from __future__ import annotations

import pytest

from raymoe.actors.placement import split_evenly as placement_split_evenly
from raymoe.platform.config import ConfigError, ModelConfig, load_config
from raymoe.platform.plan import (
    expert_bytes,
    fill_tiers,
    model_anatomy,
    parse_size,
    parse_size_or_percent,
    serve_plan,
    split_evenly,
)

GiB = 2**30
MiB = 2**20

# DeepSeek-V3: D = 7168, moe_intermediate_size I = 2048, 58 MoE layers of 256 routed experts
V3_EXPERT_PARAMS = 3 * 7168 * 2048  # gate_up [2I, D] + down [D, I]
V3_EXPERT_BF16 = 2 * V3_EXPERT_PARAMS  # 88,080,384
V3_EXPERT_FP8 = V3_EXPERT_PARAMS + 4 * ((4096 // 128) * (7168 // 128) + (7168 // 128) * (2048 // 128))
V3_NON_EXPERT_PARAMS = 671_026_404_352 - 58 * 256 * V3_EXPERT_PARAMS  # count_params' total less the routed experts
V3_GATE_BIAS_BYTES = 58 * 256 * 4  # float32 e_score_correction_bias


@pytest.fixture(scope="module")
def v3() -> ModelConfig:
    return load_config("deepseek-v3").model


@pytest.fixture(scope="module")
def v3_anatomy(v3):
    return model_anatomy(v3)


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return load_config("tiny").model


def tiny_non_expert_bytes() -> dict[str, int]:
    """The tiny preset's replicated parts in bf16, by hand: V=512, D=64, 3 layers (1 dense), H=4, E=8."""
    D, V, H = 64, 512, 4
    attention_per_layer = (
        D * 32  # q_a_proj (q_lora_rank 32)
        + 32  # q_a_layernorm
        + 32 * H * (16 + 8)  # q_b_proj: qk_head_dim = nope 16 + rope 8
        + D * (16 + 8)  # kv_a_proj_with_mqa: kv_lora_rank 16 + rope 8
        + 16  # kv_a_layernorm
        + 16 * H * (16 + 16)  # kv_b_proj: nope 16 + v 16
        + H * 16 * D  # o_proj
    )
    return {
        "embedding": 2 * V * D,
        "head": 2 * V * D,
        "attention": 2 * 3 * attention_per_layer,
        "dense_mlp": 2 * 3 * D * 128,  # one dense SwiGLU, intermediate_size 128
        "shared_experts": 2 * 2 * 3 * D * 32,  # 2 MoE layers, one shared expert of moe_intermediate_size 32
        "gates": 2 * 2 * 8 * D + 4 * 2 * 8,  # router weights in bf16, float32 biases
        "norms": 2 * (3 * 2 * D + D),  # two per layer and the final norm
    }


def test_sizes_parse_and_name_the_flag():
    assert parse_size("141GiB", "--device-memory") == 141 * GiB
    assert parse_size("2TiB", "--host-memory") == 2 * 2**40
    assert parse_size("80GB", "--device-memory") == 80 * 10**9
    assert parse_size("1.5 kib", "--x") == 1536
    assert parse_size("4096", "--x") == 4096
    assert parse_size_or_percent("25%", "--expert-budget", 1000) == 250
    assert parse_size_or_percent("12.5%", "--expert-budget", 1001) == 125  # floored
    assert parse_size_or_percent("1MiB", "--expert-budget", 1000) == MiB
    with pytest.raises(ConfigError, match=r"--device-memory '12XB' is not a size"):
        parse_size("12XB", "--device-memory")
    with pytest.raises(ConfigError, match="--expert-budget"):
        parse_size_or_percent("lots", "--expert-budget", 1000)
    with pytest.raises(ConfigError, match="at most 100%"):
        parse_size_or_percent("150%", "--expert-budget", 1000)


def test_split_evenly_is_the_placements():
    for n, parts in [(256, 8), (8, 3), (58, 16), (5, 5)]:
        assert split_evenly(n, parts) == placement_split_evenly(n, parts)


def test_expert_bytes_by_hand():
    tiny_matrices = ((64, 64), (64, 32))  # gate_up [2I, D], down [D, I] with D = 64, I = 32
    assert expert_bytes(tiny_matrices, "bf16").total == 2 * 6144
    fp8 = expert_bytes(tiny_matrices, "fp8")
    assert (fp8.weight_bytes, fp8.scale_bytes) == (6144, 4 * (1 + 1))  # one partial 128x128 block each
    assert expert_bytes(tiny_matrices, "int8").total == 6144 + 2 * (64 * 1 + 64 * 1)  # a group per row each
    assert expert_bytes(tiny_matrices, "int4").total == 3072 + 2 * 128
    # groups of 16: 64 rows x 4 groups + 64 rows x 2 groups, bf16 scales
    assert expert_bytes(tiny_matrices, "int4", group_size=16).total == 3072 + 2 * (64 * 4 + 64 * 2)
    v3_matrices = ((4096, 7168), (7168, 2048))
    assert expert_bytes(v3_matrices, "fp8").total == V3_EXPERT_FP8 == 44_050_944
    assert expert_bytes(v3_matrices, "int8").total == V3_EXPERT_PARAMS + 2 * (4096 * 56 + 7168 * 16)
    assert expert_bytes(v3_matrices, "int4", 64).total == V3_EXPERT_PARAMS // 2 + 2 * (4096 * 112 + 7168 * 32)
    with pytest.raises(ConfigError, match=r"--warm-dtype 'fp4' is not one of"):
        expert_bytes(v3_matrices, "fp4", flag="--warm-dtype")
    with pytest.raises(ConfigError, match="--group-size"):
        expert_bytes(v3_matrices, "int8", group_size=0)


def test_fill_tiers_resident_first_then_precise():
    # 10 experts: hot 100 B, warm 50 B, offloaded cold (0 on the device, 100 on the host), staging 200 B
    all_hot = fill_tiers(10, 1000, 100, 50, 0, staging=200, cold_host=100)
    assert (all_hot.hot, all_hot.warm, all_hot.cold, all_hot.cold_device_bytes) == (10, 0, 0, 0)
    some_hot = fill_tiers(10, 720, 100, 50, 0, staging=200, cold_host=100)
    assert (some_hot.hot, some_hot.warm, some_hot.cold) == (4, 6, 0)  # (720 - 500) // 50
    offloaded = fill_tiers(10, 480, 100, 50, 0, staging=200, cold_host=100)
    assert (offloaded.hot, offloaded.warm, offloaded.cold) == (0, 5, 5)  # (480 - 200) // 50
    assert (offloaded.cold_device_bytes, offloaded.cold_host_bytes) == (200, 500)
    quantized = fill_tiers(10, 400, 100, 50, 25)  # cold kept at 25 B
    assert (quantized.hot, quantized.warm, quantized.cold) == (0, 6, 4)  # (400 - 250) // 25
    assert quantized.warm_bytes + quantized.cold_device_bytes == 400


def test_tiny_serve_plan_by_hand(tiny):
    plan = serve_plan(
        tiny,
        devices=3,
        device_memory="1MiB",
        host_memory=0,
        expert_budget="50%",
        warm_dtype="int8",
        cold="quantized",
        cold_dtype="int4",
        reserve=0,
    )
    parts = tiny_non_expert_bytes()
    assert plan.non_expert == parts
    assert plan.non_expert_bytes == sum(parts.values()) == 284_896
    # 8 experts on 3 devices: 3 + 3 + 2 per layer, 2 MoE layers; device 0 holds 6
    assert plan.experts_per_layer == (3, 3, 2)
    assert plan.routed_experts_bf16 == 6 * 12_288
    assert plan.expert_budget == 6 * 12_288 // 2 == 36_864
    # 6 x int8 (6,400 B) = 38,400 > 36,864: none hot; warm = (36,864 - 6 x 3,328) // (6,400 - 3,328) = 5
    t = plan.tiers
    assert (t.hot, t.warm, t.cold) == (0, 5, 1)
    assert (t.warm_bytes, t.cold_device_bytes) == (5 * 6_400, 3_328)
    # device 2 holds 4: 4 x 6,400 = 25,600 fit; hot = (36,864 - 25,600) // (12,288 - 6,400) = 1
    assert (plan.total_hot, plan.total_warm, plan.total_cold) == (1, 5 + 5 + 3, 1 + 1 + 0)
    assert plan.host_cold_bytes == 0
    # MLA cache: (kv_lora_rank 16 + rope 8) x 3 layers x 2 B = 144 B a token
    assert plan.kv_bytes_per_token == 144
    assert plan.kv_cache_bytes == MiB - 284_896 - 36_864 == 726_816
    assert plan.kv_tokens == 726_816 // 144 == 5_047
    assert plan.total_kv_tokens == 3 * 5_047


def test_deepseek_v3_on_8_h200s_by_hand(v3, v3_anatomy):
    plan = serve_plan(
        v3,
        devices=8,
        device_memory="141GiB",
        host_memory="2TiB",
        expert_budget="60GiB",
        warm_dtype="fp8",
        cold="offload",
        anatomy=v3_anatomy,
    )
    assert plan.non_expert_bytes == 2 * V3_NON_EXPERT_PARAMS + V3_GATE_BIAS_BYTES == 34_235_326_464
    assert plan.reserve == 141 * GiB // 10  # the default reserve, 10 %, floored
    usable = 141 * GiB - 141 * GiB // 10
    assert plan.usable == usable
    experts = 58 * 256 // 8  # 32 of each MoE layer per device
    assert plan.routed_experts_bf16 == experts * V3_EXPERT_BF16
    assert plan.total_routed_experts_bf16 == 8 * experts * V3_EXPERT_BF16
    assert plan.expert_budget == 60 * GiB
    # all fp8 would need 1,856 x 44,050,944 B = 81.8 GB > 60 GiB: none hot; 8 bf16 experts of staging
    staging = 8 * V3_EXPERT_BF16
    warm = (60 * GiB - staging) // V3_EXPERT_FP8
    t = plan.tiers
    assert (t.hot, t.warm, t.cold) == (0, warm, experts - warm) == (0, 1446, 410)
    assert t.cold_device_bytes == staging
    assert plan.host_cold_bytes == 8 * 410 * V3_EXPERT_BF16
    assert plan.kv_cache_bytes == usable - 34_235_326_464 - 60 * GiB
    assert plan.kv_tokens == plan.kv_cache_bytes // 70_272 == 535_035
    assert plan.total_kv_tokens == 8 * 535_035


def test_full_budget_is_all_hot_and_the_automatic_budget_leaves_the_cache(v3, v3_anatomy, tiny):
    full = serve_plan(tiny, devices=2, device_memory="1MiB", expert_budget="100%", reserve=0)
    assert (full.tiers.hot, full.tiers.warm, full.tiers.cold) == (8, 0, 0)
    assert full.total_hot == 16 and full.host_cold_bytes == 0
    auto = serve_plan(v3, devices=8, device_memory="141GiB", host_memory="2TiB", kv_tokens=100_000, anatomy=v3_anatomy)
    assert auto.expert_budget_auto
    assert auto.expert_budget == auto.usable - auto.non_expert_bytes - 100_000 * 70_272
    assert auto.kv_tokens == 100_000
    fits = (auto.expert_budget - 1856 * V3_EXPERT_FP8) // (V3_EXPERT_BF16 - V3_EXPERT_FP8)
    assert (auto.tiers.hot, auto.tiers.warm, auto.tiers.cold) == (fits, 1856 - fits, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": 0}, r"--devices\) must be >= 1"),
        ({"devices": 300}, r"--devices\) 300 is more than model.n_routed_experts"),
        ({"warm_dtype": "fp4"}, r"--warm-dtype\) 'fp4' is not one of fp8, int8, int4"),
        ({"cold": "drop"}, r"--cold\) 'drop' is not one of offload, quantized"),
        ({"cold": "quantized", "cold_dtype": "int2"}, r"--cold-dtype"),
        ({"device_memory": "12XB"}, r"--device-memory '12XB' is not a size"),
        ({"host_memory": "lots"}, r"--host-memory 'lots' is not a size"),
        ({"device_memory": "24GiB"}, r"non-expert weights .* do not fit the usable"),
        ({"expert_budget": "100MiB"}, r"below what must be resident: .*staging area of num_experts_per_tok=8"),
        ({"expert_budget": "1%", "cold": "quantized"}, r"below what must be resident: .*all 1856 experts"),
        ({"expert_budget": "100GiB"}, r"--expert-budget '100GiB' .* exceed the usable"),
        ({"expert_budget": "20GiB", "host_memory": "100GiB"}, r"more than --host-memory"),
        (
            {"expert_budget": None, "device_memory": "40GiB", "kv_tokens": 200_000},
            r"--kv-tokens 200000 .* below what must be resident",
        ),
    ],
)
def test_bad_serve_flags_are_named(v3, v3_anatomy, kwargs, message):
    args = {"devices": 8, "device_memory": "141GiB", "host_memory": "2TiB", "expert_budget": "60GiB"} | kwargs
    with pytest.raises(ConfigError, match=message):
        serve_plan(v3, anatomy=v3_anatomy, **args)
