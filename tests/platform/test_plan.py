"""Capacity plans (serve and train) against hand arithmetic, on the meta device."""

from __future__ import annotations

import pytest

from raymoe.actors.placement import split_evenly as placement_split_evenly
from raymoe.platform.config import ConfigError, ModelConfig, load_config
from raymoe.platform.info import H800_BF16_PEAK_TFLOPS, train_flops_per_token
from raymoe.platform.plan import (
    expert_bytes,
    fill_tiers,
    model_anatomy,
    parse_size,
    parse_size_or_percent,
    serve_plan,
    split_evenly,
    train_plan,
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


# --------------------------------------------------------------------------- training

# the tiny preset's parameters other than routed experts, by hand (see tiny_non_expert_bytes)
TINY_ATTENTION = 64 * 32 + 32 + 32 * 4 * 24 + 64 * 24 + 16 + 16 * 4 * 32 + 4 * 16 * 64  # 12,848 a layer
TINY_DENSE_LAYER = TINY_ATTENTION + 2 * 64 + 3 * 64 * 128  # + two norms + the dense SwiGLU
TINY_MOE_LAYER = TINY_ATTENTION + 2 * 64 + 8 * 64 + 3 * 64 * 32  # + two norms + gate + shared expert
TINY_MTP = 64 + 64 + 2 * 64 * 64 + 64 + TINY_MOE_LAYER  # enorm, hnorm, eh_proj, shared_head.norm, a MoE block
TINY_EMBEDDING = TINY_HEAD = 512 * 64
# bf16 values a token keeps for the backward (see attention_values_per_token and ffn_values_per_token)
TINY_ATTENTION_VALUES = 2 * 64 + 2 * 32 + 4 * 24 + (16 + 8) + 16 + 4 * (16 + 16) + 4 * 16  # 520
TINY_DENSE_VALUES = TINY_ATTENTION_VALUES + 2 * 64 + 3 * 128  # 1,032
TINY_MOE_VALUES = TINY_ATTENTION_VALUES + 2 * 64 + 8 + 3 * 32  # 752 (router scores, shared expert)
TINY_MTP_VALUES = 3 * 64 + TINY_MOE_VALUES  # 944: enorm, hnorm, eh_proj outputs
TINY_ROUTED_VALUES = 64 + 3 * 32  # per chosen expert: the dispatched row, gate, up, product


def test_tiny_train_plan_by_hand(tiny):
    # 4 GPUs, pp 2 -> dp 2, ep 4; 3 micro-batches of 2 sequences of 32 tokens a replica
    plan = train_plan(
        tiny, nodes=2, gpus_per_node=2, interconnect_gbps=1.0, device_memory="1GiB", pp=2,
        micro_batch=2, micro_batches=3, seq_len=32, peak_tflops=100.0, mfu=0.5,
    )  # fmt: skip
    assert (plan.gpus, plan.dp, plan.pp, plan.ep) == (4, 2, 2, 4)
    assert plan.tokens_per_step == 2 * 3 * 2 * 32 == 384
    assert plan.precision["per_param"] == 2 + 2 + 4 + 2 * 4
    # 3 layers on 2 stages: [0, 2) with the embedding, [2, 3) with the head, final norm and MTP
    stage0 = TINY_DENSE_LAYER + TINY_MOE_LAYER + TINY_EMBEDDING
    stage1 = TINY_MOE_LAYER + TINY_HEAD + 64 + TINY_MTP
    act0 = 2 * 3 * 64 * (TINY_DENSE_VALUES + TINY_MOE_VALUES)  # bf16 x micro-batches x tokens x values
    logits = 3 * 64 * 2 * 512 * 4  # micro-batches x tokens x (main + MTP head) x vocab x fp32
    act1 = 2 * 3 * 64 * (TINY_MOE_VALUES + TINY_MTP_VALUES) + logits
    assert 16 * stage1 + act1 > 16 * stage0 + act0  # the last stage is the largest
    assert (plan.stage_index, plan.stage_layers, plan.stage_params) == (1, (2, 3), stage1)
    assert plan.stage_bytes == {
        "weights": 2 * stage1, "gradients": 2 * stage1, "master": 4 * stage1, "moments": 8 * stage1,
        "activations": act1,
    }  # fmt: skip
    # 8 experts on 4 shards: 2 per MoE layer, 3 MoE layers (2 main + MTP), 6,144 params each
    assert plan.shard_params == 2 * 3 * 6144
    choices = 384 * 2 * 2 // 8  # tokens x top-k x this shard's share of the experts, per MoE layer
    assert plan.shard_bytes["activations"] == 2 * choices * 3 * TINY_ROUTED_VALUES
    assert plan.gpu_bytes == 16 * stage1 + act1 + 16 * 2 * 3 * 6144 + 2 * choices * 3 * TINY_ROUTED_VALUES
    # all-to-all: 3 MoE layers x 4 passes x top-2 x D 64 x 2 B a token, 3/4 of it leaving the GPU
    assert plan.a2a_bytes_per_token == 3 * 4 * 2 * 64 * 2 == 3072
    assert plan.a2a_bytes_per_step == 384 * 3072 * 3 // 4
    assert plan.a2a_bytes_per_gpu == 384 * 3072 * 3 // 4 // 4
    assert plan.a2a_s == pytest.approx(221_184 * 8 / 1e9)
    flops = train_flops_per_token(tiny, 32)
    assert plan.compute_s == pytest.approx(384 * flops / (4 * 100e12 * 0.5))
    assert plan.step_s == pytest.approx(plan.compute_s + plan.a2a_s)
    assert plan.tokens_per_s == pytest.approx(384 / plan.step_s)


def test_tiny_recompute_overlap_and_the_fewest_stages_that_fit(tiny):
    args = {"nodes": 1, "gpus_per_node": 4, "micro_batch": 2, "micro_batches": 3, "seq_len": 32, "reserve": 0}
    rc = train_plan(tiny, pp=2, recompute=True, overlap=True, **args)
    logits = 3 * 64 * 2 * 512 * 4
    # a block keeps its input (64 values a token); the largest block (the MTP's) is rebuilt for one micro-batch
    assert rc.stage_bytes["activations"] == 2 * (3 * 64 * 2 * 64 + 64 * TINY_MTP_VALUES) + logits
    assert rc.shard_bytes["activations"] == 2 * 192 * (3 * 64 + TINY_ROUTED_VALUES)
    assert rc.a2a_bytes_per_token == 3 * 6 * 2 * 64 * 2  # the recomputed forward dispatches again
    assert rc.compute_s == pytest.approx(384 * train_flops_per_token(tiny, 32) * 4 / 3 / (4 * 989e12 * 0.4))
    assert rc.step_s == max(rc.compute_s, rc.a2a_s)
    # pp = 1 needs the whole model on a GPU with 4 replicas' routed tokens: 5,808,128 B by hand
    stage = TINY_DENSE_LAYER + 2 * TINY_MOE_LAYER + TINY_EMBEDDING + TINY_HEAD + 64 + TINY_MTP
    values = TINY_DENSE_VALUES + 2 * TINY_MOE_VALUES + TINY_MTP_VALUES
    one = 16 * stage + 2 * 3 * 64 * values + logits + 16 * 2 * 3 * 6144 + 2 * (768 * 4 // 8) * 3 * TINY_ROUTED_VALUES
    assert train_plan(tiny, pp=1, **args).gpu_bytes == one == 5_808_128
    assert train_plan(tiny, device_memory=one, **args).pp == 1
    auto = train_plan(tiny, device_memory=one - 1, **args)
    assert auto.pp == 2 and auto.pp_auto and auto.gpu_bytes < one


def test_deepseek_v3_on_2048_h800s(v3, v3_anatomy):
    plan = train_plan(v3, nodes=256, gpus_per_node=8, interconnect_gbps=400, moment_dtype="bf16", anatomy=v3_anatomy)
    assert (plan.gpus, plan.ep) == (2048, 256)
    assert plan.precision["per_param"] == 12
    assert plan.shard_params == 59 * V3_EXPERT_PARAMS  # one expert of each of 58 MoE layers and the MTP's
    assert plan.a2a_bytes_per_token == 59 * 4 * 8 * 7168 * 2 == 27_066_368
    tokens = plan.dp * 4096
    assert plan.tokens_per_step == tokens
    assert plan.a2a_bytes_per_step == round(tokens * 27_066_368 * 2047 / 2048)
    assert plan.a2a_s == pytest.approx(plan.a2a_bytes_per_step // 2048 * 8 / 400e9)
    flops = train_flops_per_token(v3, 4096, counts=v3_anatomy.counts)
    assert plan.compute_s == pytest.approx(tokens * flops / (2048 * H800_BF16_PEAK_TFLOPS * 1e12 * 0.4))
    assert plan.gpu_bytes <= plan.usable == 80 * GiB - 8 * GiB
    # smaller pipelines do not fit; with fp32 moments no depth does
    assert plan.pp == 32
    with pytest.raises(ConfigError, match=r"no layout fits.*--recompute"):
        train_plan(v3, nodes=256, gpus_per_node=8, anatomy=v3_anatomy)
    overlapped = train_plan(v3, nodes=256, gpus_per_node=8, moment_dtype="bf16", overlap=True, anatomy=v3_anatomy)
    # compute-bound: tokens/s = GPUs x peak x MFU / FLOPs per token
    assert overlapped.tokens_per_s == pytest.approx(2048 * H800_BF16_PEAK_TFLOPS * 1e12 * 0.4 / flops)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, r"nodes \(--nodes\) must be >= 1"),
        ({"gpus_per_node": -1}, r"--gpus-per-node"),
        ({"interconnect_gbps": 0}, r"--interconnect-gbps"),
        ({"micro_batch": 0}, r"--micro-batch\)"),
        ({"pp": 3}, r"pp \(--pp\) must divide the 4 GPUs"),
        ({"ep": 9}, r"ep \(--ep\) must be in \[1, 4\]"),
        ({"moment_dtype": "fp16"}, r"--moment-dtype\) 'fp16' is not one of fp32, bf16"),
        ({"mfu": 1.5}, r"--mfu in \(0, 1\]"),
        ({"device_memory": "1MiB"}, r"no layout fits: the smallest, pp=2"),
        ({"device_memory": "1ZB"}, r"--device-memory '1ZB' is not a size"),
    ],
)
def test_bad_train_flags_are_named(tiny, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        train_plan(tiny, **({"nodes": 1, "gpus_per_node": 4} | kwargs))
