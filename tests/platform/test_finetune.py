"""Fine-tuning: ESFT's scores and selection by hand, what trains (bit-identical elsewhere, on the local engine and
on the graph, where frozen shards take no step), and the delta that loads back as the full save."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from raymoe.platform.analysis.capture import LayerRouting, RoutingRecord
from raymoe.platform.checkpoint.delta import write_delta
from raymoe.platform.checkpoint.layout import CheckpointError
from raymoe.platform.checkpoint.reader import load_model, open_checkpoint
from raymoe.platform.config import ConfigError, load_config
from raymoe.platform.train.finetune import (
    expert_scores,
    restrict,
    routing_metrics,
    select_experts,
    trained_parameters,
    trained_rows,
)
from raymoe.platform.train.loop import micro_batches
from raymoe.platform.train.trainer import LocalTrainer


def _record(idx: list[list[int]], weights: list[list[float]], layer: int = 1) -> RoutingRecord:
    n = len(idx)
    rec = RoutingRecord(torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long), num_hidden_layers=3)
    rec.layers[layer] = LayerRouting(torch.tensor(idx), torch.tensor(weights))
    return rec


def test_scores_by_hand() -> None:
    # 4 tokens, top-2 of 4 experts
    rec = _record([[0, 1], [0, 2], [0, 1], [3, 0]], [[0.75, 0.25], [0.5, 0.5], [1.5, 0.5], [1.0, 3.0]])
    token = expert_scores([rec], 4, "token")[1]
    assert token.tolist() == pytest.approx([4 / 8, 2 / 8, 1 / 8, 1 / 8])
    gate = expert_scores([rec], 4, "gate")[1]  # per token normalized: 0.75+0.5+0.75+0.75 for expert 0
    assert gate.tolist() == pytest.approx([(0.75 + 0.5 + 0.75 + 0.75) / 4, (0.25 + 0.25) / 4, 0.5 / 4, 0.25 / 4])
    assert float(token.sum()) == pytest.approx(1.0) and float(gate.sum()) == pytest.approx(1.0)


def test_selection_is_the_smallest_set_reaching_p() -> None:
    s = {1: torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)}
    assert select_experts(s, 0.4) == {1: [1]}
    assert select_experts(s, 0.41) == {1: [1, 2]}
    assert select_experts(s, 0.7) == {1: [1, 2]}
    assert select_experts(s, 0.75) == {1: [1, 2, 3]}
    assert select_experts(s, 1.0) == {1: [0, 1, 2, 3]}
    ties = {2: torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)}
    assert select_experts(ties, 0.5) == {2: [0, 1]}  # ties: lower id first
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="top_p"):
            select_experts(s, bad)


def test_config_rejects_bad_finetune_values() -> None:
    for item, match in (("finetune.top_p=0", "top_p"), ("finetune.top_p=1.2", "top_p"),
                        ("finetune.method=lora", "method"), ("finetune.experts={'0': [1]}", "MoE layer"),
                        ("finetune.experts={'1': [9]}", "outside")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", [item])


def test_routing_metrics_by_hand() -> None:
    loads = torch.tensor([[4.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    m = routing_metrics(loads, ["layer 1", "MTP 1"], dead_fraction=0.5)
    assert m["experts/usage/layer 1"] == 0.5 and m["experts/usage/MTP 1"] == 1.0
    assert m["experts/dead/layer 1"] == 2 and m["experts/dead/MTP 1"] == 0
    assert m["experts/effective/layer 1"] == pytest.approx(2.0) and m["experts/effective/MTP 1"] == pytest.approx(4.0)


def _esft_cfg(*extra: str):
    # layer 1 and 2 main MoE layers, 3 the MTP module; 8 experts each; weight decay on
    return load_config("tiny", ["finetune.method=esft-token", "finetune.experts={'1': [0, 5], '2': [3], '3': [1]}",
                                "train.weight_decay=0.1", "train.steps=4", "train.warmup_steps=1",
                                "train.bias_update_speed=0", *extra])  # fmt: skip


def _steps(trainer, n: int = 3) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randint(0, 512, (4, 33), generator=gen)
        trainer.train_step(micro_batches(x[:, :-1].contiguous(), x[:, 1:].contiguous(), 2))


def test_esft_trains_only_the_selected_experts() -> None:
    cfg = _esft_cfg()
    trainer = LocalTrainer(cfg)
    before = {n: t.clone() for n, t in trainer.model.state_dict().items()}
    _steps(trainer)
    after = trainer.model.state_dict()
    selected = {1: [0, 5], 2: [3], 3: [1]}
    changed_rows = 0
    for name, t in after.items():
        if ".experts." in name:
            layer = int(name.split(".")[2]) + (3 if ".mtp." in name else 0)
            for e in range(t.shape[0]):
                same = torch.equal(t[e], before[name][e])
                assert same == (e not in selected[layer]), (name, e)
                changed_rows += not same
        else:
            assert torch.equal(t, before[name]), name  # attention, router, shared experts, biases, norms, head
    assert changed_rows == 2 * 4  # gate_up and down of the 4 selected experts
    per_expert = 64 * 2 * 32 + 32 * 64  # gate_up [2I, D] and down [D, I] of the tiny model
    assert trained_parameters(cfg)[0] == 4 * per_expert


def test_frozen_router_and_full() -> None:
    cfg = load_config("tiny", ["finetune.method=frozen-router", "train.bias_update_speed=0"])
    trainer = LocalTrainer(cfg)
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    _steps(trainer, 2)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]) == name.endswith(".mlp.gate.weight"), name
    assert trained_rows("model.layers.1.mlp.gate.weight", 8, load_config("tiny").finetune, 3) is True


def test_esft_without_a_selection_is_an_error() -> None:
    cfg = load_config("tiny", ["finetune.method=esft-gate"])
    with pytest.raises(ConfigError, match="needs finetune.experts"):
        restrict([], cfg)


def test_esft_on_the_graph_steps_only_the_shards_with_selected_experts() -> None:
    from raymoe.actors.driver import GraphTrainer

    # ep=2: experts 0-3 on shard 0, 4-7 on shard 1; only shard 0 holds selected experts
    common = ["finetune.experts={'1': [0, 2], '2': [3], '3': [1]}", "parallel.micro_batches=2"]
    local = LocalTrainer(_esft_cfg(*common))
    graph = GraphTrainer(_esft_cfg(*common, "parallel.ep=2", "parallel.pp=2"), in_process=True)
    try:
        before = graph.full_state_dict()
        _steps(local)
        _steps(graph)
        reports = [graph.rt.get(graph.rt.call(s, "finish"), "finish")[0] for s in graph.shards]
        assert [r["steps"] for r in reports] == [True, False]
        assert [r["steps_taken"] for r in reports] == [3, 0]
        after = graph.full_state_dict()
        want = local.model.state_dict()
        for name, t in after.items():
            torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6, msg=name)
            if ".experts." in name:
                layer = int(name.split(".")[2]) + (3 if ".mtp." in name else 0)
                for e in range(4, 8):
                    assert torch.equal(t[e], before[name][e]), (name, e)
                for e in {1: [0, 2], 2: [3], 3: [1]}[layer]:
                    assert not torch.equal(t[e], before[name][e]), (name, e)
            else:
                assert torch.equal(t, before[name]), name
    finally:
        graph.shutdown()


def test_delta_loads_back_as_the_full_save(tmp_path: Path) -> None:
    base_trainer = LocalTrainer(load_config("tiny"))
    base = base_trainer.save_checkpoint(str(tmp_path / "base"), {"loader": {}})
    cfg = dataclasses.replace(_esft_cfg(), train=dataclasses.replace(_esft_cfg().train, init_from=base))
    tuned_trainer = LocalTrainer(cfg)
    _steps(tuned_trainer)
    tuned = tuned_trainer.save_checkpoint(str(tmp_path / "tuned"), {"loader": {}})
    meta = write_delta(tuned, base, str(tmp_path / "delta"), {"method": "esft-token"})
    assert sorted(meta["changed"]) == sorted(
        f"model.{part}.mlp.experts.{e}.{w}" for part, e in (("layers.1", 0), ("layers.1", 5), ("layers.2", 3),
                                                           ("mtp.0", 1))
        for w in ("gate_up_proj", "down_proj")
    )  # fmt: skip
    full = load_model(tuned).state_dict()
    from_delta = load_model(str(tmp_path / "delta")).state_dict()
    assert full.keys() == from_delta.keys()
    for name in full:
        assert torch.equal(full[name], from_delta[name]), name
    base_size = sum(open_checkpoint(base).info(n).nbytes for n in open_checkpoint(base).names())
    assert meta["bytes"] < base_size / 10
    (tmp_path / "base" / "checkpoints").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="its base"):
        open_checkpoint(str(tmp_path / "delta"))
