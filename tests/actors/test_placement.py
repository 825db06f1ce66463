"""Placement of layers on stages and experts on shards (pure functions, no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from raymoe.actors.placement import Placement, build_placement, imbalance, shard_loads, split_evenly
from raymoe.platform.config import ConfigError, ParallelConfig, load_config


def test_split_evenly() -> None:
    assert split_evenly(32, 3) == [11, 11, 10]
    assert split_evenly(6, 2) == [3, 3]
    assert split_evenly(2, 3) == [1, 1, 0]
    with pytest.raises(ValueError):
        split_evenly(4, 0)


def test_uneven_expert_shards_cover_every_expert_once() -> None:
    model = load_config("bench").model  # 32 experts, 5 MoE layers
    p = build_placement(model, ParallelConfig(pp=4, ep=3))
    assert [p.experts_on(s, 1) for s in range(3)] == [list(range(0, 11)), list(range(11, 22)), list(range(22, 32))]
    for layer in p.moe_layers:
        held = sorted(e for s in range(3) for e in p.experts_on(s, layer))
        assert held == list(range(32))
        assert all(p.shard_of(layer, e) == (0 if e < 11 else 1 if e < 22 else 2) for e in range(32))
    # 6 layers on 4 stages: contiguous, covering, 2 + 2 + 1 + 1
    assert p.stage_bounds == ((0, 2), (2, 4), (4, 5), (5, 6))
    assert [p.stage_of(layer) for layer in range(6)] == [0, 0, 1, 1, 2, 3]


def test_mtp_layers_are_on_the_last_stage_and_have_experts() -> None:
    model = load_config("tiny").model  # 3 layers, first dense, 1 MTP module
    p = build_placement(model, ParallelConfig(pp=2, ep=3))
    assert p.moe_layers == (1, 2, 3)
    assert p.stage_of(3) == 1
    assert sorted(e for s in range(3) for e in p.experts_on(s, 3)) == list(range(8))


def test_round_trip_through_json() -> None:
    p = build_placement(load_config("tiny").model, ParallelConfig(pp=3, ep=2))
    assert Placement.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_impossible_layouts_name_the_field() -> None:
    model = load_config("tiny").model
    with pytest.raises(ConfigError, match="parallel.pp"):
        build_placement(model, ParallelConfig(pp=4))
    with pytest.raises(ConfigError, match="parallel.ep"):
        build_placement(model, ParallelConfig(ep=9))


# --------------------------------------------------------------------------- balanced, replicated


def test_balanced_placement_by_hand() -> None:
    """E=4, ep=2 (the tiny model's layers cut to 4 experts): the greedy by hand, without and with copies."""
    import dataclasses

    from raymoe.actors.placement import balanced_placement

    model = dataclasses.replace(load_config("tiny").model, n_routed_experts=4, n_group=1, topk_group=1,
                                num_experts_per_tok=2)  # fmt: skip
    loads = torch.tensor([[10.0, 1.0, 1.0, 0.0]] * 3)  # 3 MoE layers (2 main, 1 MTP)
    p = balanced_placement(model, ParallelConfig(ep=2), loads)
    # heaviest first, each to the least-loaded shard with room (2 a shard): e0->0, e1->1, e2->1, e3->0
    assert p.expert_shards == ((0, 1, 1, 0),) * 3 and p.replicas == ()
    # 2 copies: e0 (10) gets the first; e1 and e2 tie at 1 and the lower id wins. Room 3 a shard:
    # e0->0, e0->1, e2->0, e1->1, e1->0 (not again on 1), e3->1
    r = balanced_placement(model, ParallelConfig(ep=2), loads, redundant=2)
    assert r.holders(1) == [(0, 1), (1, 0), (0,), (1,)]
    assert r.experts_on(0, 1) == [0, 1, 2] and r.experts_on(1, 1) == [0, 1, 3]
    assert shard_loads(r, loads)[0].tolist() == [6.5, 5.5] and shard_loads(p, loads)[0].tolist() == [10.0, 2.0]
    assert Placement.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    routing = r.routing(1)
    assert routing.copies.tolist() == [2, 2, 1, 1]
    # row i's choice of expert e goes to copy (i + e) % copies: expert 0's rows alternate between the shards
    idx = torch.tensor([[0, 2], [0, 3], [0, 1], [1, 0]])
    shard, local = routing.assign(idx)
    assert shard.tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]
    assert local.tolist() == [[0, 2], [0, 2], [0, 1], [1, 0]]


def test_balanced_placement_evens_a_skewed_load() -> None:
    from raymoe.actors.placement import balanced_placement

    model = load_config("bench").model  # 32 experts, 5 MoE layers
    g = torch.Generator().manual_seed(0)
    loads = torch.rand(5, 32, generator=g) ** 8 * 1000  # a few hot experts per layer
    contiguous = build_placement(model, ParallelConfig(ep=4))
    for redundant in (0, 4, 8):
        p = balanced_placement(model, ParallelConfig(ep=4), loads, redundant)
        for layer in p.moe_layers:
            held = [p.experts_on(k, layer) for k in range(4)]
            assert sorted({e for h in held for e in h}) == list(range(32))  # no expert dropped
            assert sum(map(len, held)) == 32 + redundant and max(map(len, held)) <= -(-(32 + redundant) // 4)
        per_shard = shard_loads(p, loads)
        assert torch.allclose(per_shard.sum(1), loads.sum(1).double())  # every token counted once
        assert imbalance(per_shard) < imbalance(shard_loads(contiguous, loads))
    assert imbalance(shard_loads(balanced_placement(model, ParallelConfig(ep=4), loads, 8), loads)) <= imbalance(
        shard_loads(balanced_placement(model, ParallelConfig(ep=4), loads, 0), loads)
    )


def test_bad_placements_are_clear_errors(tmp_path) -> None:  # noqa: ANN001
    from raymoe.actors.placement import balanced_placement, placement_for

    model = load_config("tiny").model
    with pytest.raises(ConfigError, match="redundant experts must be 0..8"):
        balanced_placement(model, ParallelConfig(ep=2), torch.ones(3, 8), redundant=9)
    with pytest.raises(ConfigError, match=r"expert loads are \[3, 4\]"):
        balanced_placement(model, ParallelConfig(ep=2), torch.ones(3, 4))
    with pytest.raises(ValueError, match="two copies on one shard"):
        dataclasses_replace = build_placement(model, ParallelConfig(ep=2)).to_dict()
        dataclasses_replace["replicas"] = [[[0, 0]], [], []]  # expert 0 sits on shard 0 already
        Placement.from_dict(dataclasses_replace)
    with pytest.raises(ConfigError, match="parallel.expert_placement must be one of"):
        load_config("tiny", ["parallel.expert_placement=hot"])
    with pytest.raises(ConfigError, match="needs expert loads"):
        placement_for(load_config("tiny", ["parallel.expert_placement=balanced", "parallel.ep=2"]))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="no field 'version'"):
        placement_for(load_config("tiny", ["parallel.expert_placement=balanced", "parallel.ep=2",
                                           f"parallel.expert_loads={tmp_path / 'bad.json'}"]))  # fmt: skip


def test_relabeling_keeps_experts_where_they_are() -> None:
    """A new placement's shard labels are permuted to move the fewest copies; no shard's load changes."""
    from raymoe.actors.placement import balanced_placement, moves, relabel_like

    model = load_config("bench").model
    g = torch.Generator().manual_seed(1)
    loads = torch.rand(5, 32, generator=g) ** 6 * 100
    old = balanced_placement(model, ParallelConfig(ep=4), loads, 4)
    swapped = Placement.from_dict({**old.to_dict(), "expert_shards": [[3 - s for s in layer] for layer in
                                   old.expert_shards], "replicas": [[[e, 3 - s] for e, s in layer] for layer in
                                   old.replicas]})  # fmt: skip
    assert moves(swapped, old) > 0 and moves(relabel_like(swapped, old), old) == 0
    noisy = balanced_placement(model, ParallelConfig(ep=4), loads * (1 + 0.2 * torch.rand(5, 32, generator=g)), 4)
    kept = relabel_like(noisy, old)
    assert moves(kept, old) <= moves(noisy, old)
    # per layer the same loads on other labels
    assert torch.allclose(shard_loads(kept, loads).sort(1).values, shard_loads(noisy, loads).sort(1).values)
