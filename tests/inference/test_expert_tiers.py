"""Routed experts in tiers under a byte budget (issue 17 §2): the plan's arithmetic, outputs equal to the
model whose experts carry the tiers' effective weights, every chosen expert computed at any budget,
the cache never evicting what the current call uses, and bad flags named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.platform.checkpoint.quant import quantize_weight
from raymoe.platform.checkpoint.reader import load_model, open_checkpoint
from raymoe.platform.config import ConfigError, config_to_dict, load_config
from raymoe.platform.inference.batch import SeqRun, build_step
from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
from raymoe.platform.inference.expert_store import ExpertCache, MappedSource, _Copy, load_tiered
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams
from raymoe.platform.inference.tiers import TierConfig, plan_tiers, rank_experts
from raymoe.platform.model.forward import ExpertCall
from raymoe.platform.train.trainer import LocalTrainer

F32 = torch.float32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A training checkpoint of the tiny preset after one step (so that its experts differ from their init)."""
    cfg = load_config("tiny", ["tracking.enabled=false"])
    trainer = LocalTrainer(cfg)
    rows = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    trainer.train_step([(rows[:, :-1], rows[:, 1:])])
    return trainer.save_checkpoint(str(tmp_path_factory.mktemp("tiers") / "run"), {"config": config_to_dict(cfg)})


def _plan(location: str, dtype: torch.dtype = F32, **kw):
    reader = open_checkpoint(location)
    cfg = reader.model_config
    layers = list(load_model(reader, routed_experts=False).moe_by_layer())
    kw.setdefault("policy", "uniform")
    return reader, plan_tiers(cfg, layers, dtype, TierConfig(**kw))


def _effective_model(location: str, plan, dtype: torch.dtype = F32):
    """The full model with every warm (and quantized cold) expert's weights replaced by their dequantized values."""
    model = load_model(location, dtype=dtype)
    moe = model.moe_by_layer()
    with torch.no_grad():
        for layer in plan.layers:
            experts = moe[layer].experts
            quantized = {e: plan.config.warm_dtype for e in plan.ids(layer, "warm")}
            if plan.config.cold == "quantized":
                quantized |= {e: plan.config.cold_dtype for e in plan.ids(layer, "cold")}
            for e, qd in quantized.items():
                for w in (experts.gate_up_proj, experts.down_proj):
                    q = quantize_weight(w[e].float(), qd, plan.config.group_size)
                    w[e] = q.dequantize(dtype)
    return model


def _step_logits(runner: LocalRunner, ids: list[int]) -> torch.Tensor:
    batch = build_step([SeqRun(ids, 0, list(range(1, 6)))], runner.block_size)
    logits, _ = runner.main(batch, torch.arange(len(ids)))
    return logits


def test_plan_arithmetic_by_hand(checkpoint: str) -> None:
    """tiny: 3 MoE layers (2 main, 1 MTP) × 8 experts; one float32 expert is (64·64 + 64·32) · 4 bytes."""
    _, plan = _plan(checkpoint, budget="25%", warm_dtype="int8")
    hot = (64 * 64 + 64 * 32) * 4  # 24,576
    warm = 64 * 64 + 64 * 32 + (64 + 64) * 2  # int8 weights + one bf16 scale per row (each row is one group)
    assert plan.expert_bytes == {"hot": hot, "warm": warm, "cold": hot}
    assert plan.routed_bytes == 24 * hot and plan.budget_bytes == 24 * hot // 4
    staging = 2 * hot  # num_experts_per_tok working copies
    n_warm = (plan.budget_bytes - staging) // warm  # all 24 warm do not fit: resident first
    assert plan.counts == {"hot": 0, "warm": n_warm, "cold": 24 - n_warm} == {"hot": 0, "warm": 15, "cold": 9}
    assert plan.cache_bytes == plan.budget_bytes - 15 * warm >= staging
    assert plan.resident_bytes == plan.budget_bytes
    _, full = _plan(checkpoint, budget="100%")
    assert full.all_hot and full.cache_bytes == 0
    _, roomy = _plan(checkpoint, budget=24 * warm + staging + 3 * (hot - warm))  # all warm, then 3 upgraded
    assert roomy.counts == {"hot": 3, "warm": 21, "cold": 0}


def test_ranking_policies() -> None:
    freq = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    assert rank_experts(2, 3, "frequency", freq)[:3] == [(1, 0), (0, 1), (0, 2)]
    assert rank_experts(2, 3, "uniform")[:4] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    rnd = rank_experts(2, 3, "random", seed=3)
    assert sorted(rnd) == sorted(rank_experts(2, 3, "uniform")) and rnd == rank_experts(2, 3, "random", seed=3)


def test_full_budget_is_token_identical_to_plain_serving(checkpoint: str) -> None:
    """At 100 % every expert is hot and runs through the layer's own Experts call: the same tokens, bf16."""
    reader, plan = _plan(checkpoint, torch.bfloat16, budget="100%")
    model, store = load_tiered(reader, plan, torch.bfloat16)
    plain = load_model(checkpoint, dtype=torch.bfloat16)
    prompts = [[5, 17, 3, 99, 4], [7], [300, 2, 11, 8, 9, 10, 1]]
    params = [SamplingParams(max_tokens=10, temperature=0.0)] * 3
    outs = []
    for runner in (LocalRunner(plain, cache_blocks(512, 16), 16),
                   LocalRunner(model, cache_blocks(512, 16), 16, experts=store)):  # fmt: skip
        engine = Engine(runner, EngineConfig(cache_tokens=512, block_size=16, max_batch_size=3))
        outs.append(run_to_completion(engine, prompts, params))
    assert outs[0] == outs[1]
    assert store.stats()["expert_cache"]["uses"] == 0  # nothing left the hot path


@pytest.mark.parametrize(
    "flags",
    [
        {"budget": "50%", "warm_dtype": "int8"},
        {"budget": "25%", "warm_dtype": "int4", "eviction": "lfu"},
        {"budget": "12.5%", "warm_dtype": "fp8"},
        {"budget": "40%", "warm_dtype": "int8", "cold": "quantized", "cold_dtype": "int4", "prefetch": "off"},
        {"budget": "75%", "warm_dtype": "int8", "policy": "random"},
    ],
)
def test_every_chosen_expert_is_computed_at_any_budget(checkpoint: str, flags: dict) -> None:
    """A call whose rows choose every expert: the tiered answer equals the effective model's experts, and
    each warm/cold expert is used once; then whole forwards through the runner agree with the effective model."""
    reader, plan = _plan(checkpoint, **flags)
    assert plan.counts["hot"] + plan.counts["warm"] + plan.counts["cold"] == 24
    model, store = load_tiered(reader, plan, F32)
    ref = _effective_model(checkpoint, plan)
    layer = plan.layers[0]
    x = torch.randn(8, 64)
    idx = torch.stack([torch.arange(8), (torch.arange(8) + 3) % 8], dim=1)  # every expert twice over 8 rows
    weights = torch.rand(8, 2)
    got = store(ExpertCall(layer, x, idx, weights))
    want = ref.moe_by_layer()[layer].experts(x, idx, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert store.counters["uses"] == len(plan.ids(layer, "warm")) + len(plan.ids(layer, "cold"))
    # whole forwards (prefill then decode, every layer and the MTP module) through the engine's runner
    tiered = LocalRunner(model, cache_blocks(256, 16), 16, experts=store)
    plain = LocalRunner(ref, cache_blocks(256, 16), 16)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(_step_logits(tiered, ids), _step_logits(plain, ids), rtol=1e-4, atol=1e-5)
    store.drain()
    held = store.held_bytes()
    assert held["cache"] <= plan.cache_bytes and held["total"] <= plan.budget_bytes
    store.close()


def test_offloaded_experts_are_exact_and_memory_mapped(checkpoint: str) -> None:
    """A budget of the staging area alone: every expert cold, read from the checkpoint's mapped file; exact."""
    reader, plan = _plan(checkpoint, budget=2 * (64 * 64 + 64 * 32) * 4)
    assert plan.counts == {"hot": 0, "warm": 0, "cold": 24}
    model, store = load_tiered(reader, plan, F32)
    assert isinstance(store.source, MappedSource)
    runner = LocalRunner(model, cache_blocks(256, 16), 16, experts=store)
    plain = LocalRunner(load_model(checkpoint), cache_blocks(256, 16), 16)
    ids = list(range(3, 40, 2))
    torch.testing.assert_close(_step_logits(runner, ids), _step_logits(plain, ids), rtol=1e-5, atol=1e-6)
    stats = runner.stats()
    c = stats["expert_cache"]
    assert c["misses"] > 0 and c["uses"] == c["hits"] + c["misses"]
    assert stats["expert_held_bytes"]["hot"] == 0 == stats["expert_held_bytes"]["warm"]
    # live counts: each main layer saw the step's rows, K choices each (the MTP module's layer ran no step)
    loads = torch.tensor(stats["expert_loads"]["loads"])
    assert loads.sum(1).tolist() == [len(ids) * 2.0, len(ids) * 2.0, 0.0]
    assert stats["expert_loads"]["tokens"] == [len(ids), len(ids), 0]


def _copy(n: int = 4) -> _Copy:
    return _Copy(torch.zeros(n), torch.zeros(n))  # 32 bytes


def test_cache_never_evicts_a_pinned_expert() -> None:
    cache = ExpertCache(capacity=64)  # two copies
    assert cache.put((1, 0), _copy()) and cache.put((1, 1), _copy())
    cache.pin([(1, 0), (1, 1)])
    assert not cache.put((1, 2), _copy())  # everything is in use: refused, nothing evicted
    assert list(cache.entries) == [(1, 0), (1, 1)] and cache.evictions == 0
    cache.unpin([(1, 0)])
    assert cache.put((1, 2), _copy())  # evicts the one no longer in use
    assert list(cache.entries) == [(1, 1), (1, 2)] and cache.used == 64
    cache.pin([(1, 1)])  # pinned twice (two calls): one unpin keeps it pinned
    cache.unpin([(1, 1)])
    assert cache.put((1, 3), _copy()) and (1, 1) in cache.entries and (1, 2) not in cache.entries


def test_lfu_evicts_the_least_used() -> None:
    cache = ExpertCache(capacity=64, eviction="lfu")
    cache.put((0, 0), _copy())
    cache.put((0, 1), _copy())
    for _ in range(3):
        cache.get((0, 0))  # (0, 0) is now the most recently and most often used; (0, 1) used never
    cache.get((0, 1))
    cache.put((0, 2), _copy())  # LRU would evict (0, 0); LFU evicts (0, 1)
    assert list(cache.entries) == [(0, 0), (0, 2)]


def test_prefetch_readies_the_next_layers_experts(checkpoint: str) -> None:
    """Decode steps with prefetch on: some uses are served by a prefetch, and outputs equal prefetch off."""
    outs = []
    for prefetch in ("on", "off"):
        reader, plan = _plan(checkpoint, budget="25%", warm_dtype="int8", prefetch=prefetch)
        model, store = load_tiered(reader, plan, F32)
        runner = LocalRunner(model, cache_blocks(256, 16), 16, experts=store)
        engine = Engine(runner, EngineConfig(cache_tokens=256, block_size=16, speculative=False))
        outs.append(run_to_completion(engine, [[1, 2, 3, 4]], [SamplingParams(max_tokens=12, temperature=0.0)]))
        store.drain()
        c = store.stats()["expert_cache"]
        if prefetch == "on":
            assert c["prefetched"] > 0 and c["prefetch_hits"] > 0
        else:
            assert c["prefetched"] == 0 and c["prefetch_hit_rate"] is None
        store.close()
    assert outs[0] == outs[1]


def test_bad_flags_are_named(checkpoint: str) -> None:
    with pytest.raises(ConfigError, match="--warm-dtype 'int3'"):
        _plan(checkpoint, budget="25%", warm_dtype="int3")
    with pytest.raises(ConfigError, match="--cold 'disk'"):
        _plan(checkpoint, budget="25%", cold="disk")
    with pytest.raises(ConfigError, match="--expert-budget .* below what must be resident"):
        _plan(checkpoint, budget="1KiB")
    with pytest.raises(ConfigError, match="--expert-budget 'lots' is not a size"):
        _plan(checkpoint, budget="lots")
    with pytest.raises(ConfigError, match="--expert-policy frequency needs expert statistics"):
        _plan(checkpoint, budget="25%", policy="frequency")
    with pytest.raises(ConfigError, match="all 24 experts in --cold-dtype int4"):
        _plan(checkpoint, budget=3 * 24576, cold="quantized")


def test_plan_layers_must_match_the_model(checkpoint: str, tmp_path: Path) -> None:
    reader, plan = _plan(checkpoint, budget="50%")
    plan.layers = plan.layers[:-1]
    with pytest.raises(ValueError, match="MoE layers"):
        load_tiered(reader, plan, F32)


def test_int8_kernel_equals_the_dequantized_product() -> None:
    """Int8Linear (the int8 codes through the int8 kernel, group by group) against x @ dequantize(w).T, bf16."""
    from raymoe.platform.checkpoint.quant import Int8Linear

    g = torch.Generator().manual_seed(0)
    for out, cols, group in ((96, 320, 128), (64, 64, 128), (32, 256, 64)):  # a partial group, one group, many
        w = quantize_weight(torch.randn(out, cols, generator=g) * 0.05, "int8", group)
        x = torch.randn(5, cols, generator=g).bfloat16()
        want = (x.float() @ w.dequantize(F32).T).bfloat16()
        got = Int8Linear(w)(x)
        assert got.dtype == torch.bfloat16 and got.shape == (5, out)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)  # bf16 ulps at ~1
        assert Int8Linear(w).nbytes == w.nbytes


def test_bf16_int8_experts_go_through_the_kernel(checkpoint: str) -> None:
    """In bf16 on the CPU, warm int8 experts are computed from their codes (no copy), close to the effective model."""
    reader, plan = _plan(checkpoint, torch.bfloat16, budget="50%", warm_dtype="int8")
    model, store = load_tiered(reader, plan, torch.bfloat16)
    assert sum(len(le.direct) for le in store.layers.values()) == plan.counts["warm"] > 0
    assert all(not le.warm for le in store.layers.values())
    ref = _effective_model(checkpoint, plan, torch.bfloat16)
    layer = plan.layers[0]
    x = torch.randn(8, 64).bfloat16()
    idx = torch.stack([torch.arange(8), (torch.arange(8) + 3) % 8], dim=1)
    weights = torch.rand(8, 2)
    got = store(ExpertCall(layer, x, idx, weights))
    want = ref.moe_by_layer()[layer].experts(x, idx, weights)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-3)
    assert store.counters["direct"] == len(plan.ids(layer, "warm"))
    assert store.counters["uses"] == len(plan.ids(layer, "cold"))


def test_a_reservation_holds_room_for_a_prefetch() -> None:
    """What a prefetch reserved cannot be taken by another copy; its own copy then fills it."""
    cache = ExpertCache(capacity=64)
    assert cache.put((0, 0), _copy())
    cache.pin([(0, 0)])
    assert cache.reserve((0, 1), 32)  # the last 32 bytes
    assert not cache.put((0, 2), _copy()) and cache.used == 64  # a miss cannot take the reserved room
    assert not cache.reserve((0, 3), 32)
    assert cache.put((0, 1), _copy()) and cache.used == 64 and not cache.reserved
    cache.release((0, 1))  # nothing reserved any more: a no-op
    assert cache.used == 64
