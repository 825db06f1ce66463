"""Placement of layers on stages and experts on shards (pure functions, no Ray)."""

from __future__ import annotations

import json

import pytest

from raymoe.actors.placement import Placement, build_placement, split_evenly
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
