"""The shift analysis' library: overlap and rebalance counts against hand-computed values, the continued
training's config, and the whole analysis on the local engine and on the in-process actor graph."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_run import write_tiny_run

from raymoe.platform.analysis.options import AnalysisError
from raymoe.platform.analysis.shift import (
    TrainerSource,
    analyze_shift,
    balanced_from,
    continued_training_config,
    frozen_report,
    load_distribution,
    resolve_gamma,
    routing_overlap,
    split_rows,
    steps_to_rebalance,
    train_batch,
)
from raymoe.platform.analysis.shift_options import DEFAULT_GAMMA, ShiftConfig
from raymoe.platform.checkpoint.reader import open_checkpoint
from raymoe.platform.config import ParallelConfig
from raymoe.platform.train.trainer import LocalTrainer

LOSS_RTOL = 1e-5  # float32: the graph adds the experts' outputs in another order


def test_overlap_is_one_against_itself_and_zero_for_disjoint_experts() -> None:
    a = torch.tensor([3.0, 1.0, 0.0, 4.0])
    assert routing_overlap(a, a) == pytest.approx(1.0)
    assert routing_overlap(a, 10 * a) == pytest.approx(1.0)  # a distribution: the token count does not matter
    assert routing_overlap(torch.tensor([2.0, 2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 5.0, 1.0])) == 0.0
    # p = (.5, .5, 0, 0) and q = (.25, .25, .25, .25): Σ min = .25 + .25
    assert routing_overlap(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.ones(4)) == pytest.approx(0.5)
    assert routing_overlap(torch.zeros(4), torch.ones(4)) == 0.0  # no tokens: no overlap
    assert load_distribution(torch.tensor([1.0, 3.0])).tolist() == [0.25, 0.75]


def test_frozen_report_by_hand() -> None:
    loads_in = {1: torch.tensor([2.0, 2.0, 2.0, 2.0]), 2: torch.tensor([4.0, 0.0, 2.0, 2.0]), 3: torch.ones(4)}
    loads_out = {1: torch.tensor([6.0, 2.0, 0.0, 0.0]), 2: torch.tensor([4.0, 0.0, 2.0, 2.0]), 3: torch.ones(4)}
    r = frozen_report(loads_in, loads_out, num_hidden_layers=3)
    assert [(e["name"], e["main"]) for e in r["layers"]] == [("layer 1", True), ("layer 2", True), ("MTP 1", False)]
    l1, l2, _ = r["layers"]
    assert l1["in"]["maxvio"] == 0.0 and l1["out"]["maxvio"] == pytest.approx(2.0)  # (6 - 2) / 2
    assert l1["overlap"] == pytest.approx(0.25 + 0.25)  # min(.25, .75) + min(.25, .25)
    assert l2["overlap"] == pytest.approx(1.0) and l2["in"]["maxvio"] == pytest.approx(1.0)
    assert l1["out"]["distribution"] == [0.75, 0.25, 0.0, 0.0] and l1["out"]["tokens"] == 8
    assert r["maxvio_in"] == pytest.approx(0.5) and r["maxvio_out"] == pytest.approx(1.5)  # main layers only
    assert r["overlap"] == pytest.approx(0.75)


def test_steps_to_rebalance_on_a_hand_made_series() -> None:
    steps = [0, 2, 4, 6, 8]
    vio = [1.0, 0.8, 0.54, 0.6, 0.5]
    assert steps_to_rebalance(steps, vio, reference=0.5, tolerance=0.1) == 4  # 0.54 <= 0.55, first
    assert balanced_from(steps, vio, reference=0.5, tolerance=0.1) == 8  # 0.6 at step 6 is above again
    assert steps_to_rebalance(steps, vio, reference=0.5, tolerance=0.0) == 8
    assert steps_to_rebalance(steps, vio, reference=0.4, tolerance=0.1) is None  # never within the steps
    assert balanced_from(steps, vio, reference=0.4, tolerance=0.1) is None
    assert steps_to_rebalance(steps, vio, reference=1.0, tolerance=0.0) == 0  # balanced before any step
    assert balanced_from(steps, [0.5, 0.5, 0.5, 0.5, 0.5], 0.5, 0.0) == 0


def test_split_rows_and_train_batches() -> None:
    ids = torch.arange(5 * 3).reshape(5, 3)
    batches = [(ids[:2], ids[:2] + 100), (ids[2:], ids[2:] + 100)]
    held, pool = split_rows(batches, held_out=3, batch_size=2)
    assert [b[0].shape[0] for b in held] == [2, 1] and torch.equal(torch.cat([b[0] for b in held]), ids[:3])
    assert torch.equal(pool[0], ids[3:]) and torch.equal(pool[1], ids[3:] + 100)
    assert split_rows(batches, held_out=5, batch_size=2)[1] is None
    step1 = train_batch(pool, step=1, sequences=3, micro_batches=1)  # rows 3, 4, 5 of a pool of 2: cycling
    assert len(step1) == 1 and step1[0][0][:, 0].tolist() == [12, 9, 12]
    assert [b[0].shape[0] for b in train_batch(pool, 0, 4, 2)] == [2, 2]


def test_options_are_validated_naming_the_field() -> None:
    for bad, field in ((dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(tolerance=-0.5), "tolerance"),
                       (dict(train_batch=6, batch_size=4), "train_batch"), (dict(gamma=-1.0), "gamma")):  # fmt: skip
        with pytest.raises(AnalysisError, match=field):
            ShiftConfig(**bad).validate()
    assert ShiftConfig(train_batch=8, batch_size=2).micro_batches() == 4
    assert ShiftConfig(train_batch=2, batch_size=8).micro_batches() == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("shift"), steps=2)


def test_continued_training_config_takes_the_checkpoints_training(tiny_run: Path) -> None:
    reader = open_checkpoint(str(tiny_run))
    cfg = ShiftConfig(seq_len=32, steps=5, train_batch=4, batch_size=2, lr=2e-5)
    assert resolve_gamma(cfg, reader.state) == 0.05  # the tiny run's train.bias_update_speed
    assert resolve_gamma(cfg, None) == DEFAULT_GAMMA and resolve_gamma(ShiftConfig(gamma=0.0), reader.state) == 0.0
    run = continued_training_config(reader.model_config, reader.location, reader.state, cfg)
    t = run.train
    assert (t.init_from, t.steps, t.batch_size, t.seq_len, t.lr) == (reader.location, 5, 4, 32, 2e-5)
    assert (t.bias_update_speed, t.warmup_steps, t.min_lr_ratio, t.bias_update_speed_final) == (0.05, 0, 1.0, None)
    assert t.mtp_lambda == reader.state["config"]["train"]["mtp_lambda"] and run.parallel.micro_batches == 2
    assert not run.tracking.enabled


def _domains(seq: int = 32) -> dict:
    out = {}
    for role, seed, n in (("in", 1, 4), ("out", 2, 10)):
        x = torch.randint(0, 100 * seed, (n, seq + 1), generator=torch.Generator().manual_seed(seed))
        held, pool = split_rows([(x[:, :-1].contiguous(), x[:, 1:].contiguous())], 4, 2)
        out[role] = {"name": role, "source": "random", "held_out": held, "pool": pool if role == "out" else None}
    return out


def _shift(location: str, trainer, source, cfg: ShiftConfig, runner: str) -> dict:  # noqa: ANN001
    reader = open_checkpoint(location)
    return analyze_shift(reader.location, reader.state["step"], reader.model_config, _domains(), trainer, source,
                         cfg, resolve_gamma(cfg, reader.state), runner)  # fmt: skip


def test_local_and_graph_give_the_same_shift_report(tiny_run: Path) -> None:
    from raymoe.actors.analysis import GraphSource
    from raymoe.actors.driver import GraphTrainer

    reader = open_checkpoint(str(tiny_run))
    cfg = ShiftConfig(seq_len=32, sequences=4, batch_size=2, steps=3, train_batch=2, lr=1e-4)
    run = continued_training_config(reader.model_config, reader.location, reader.state, cfg)
    local = LocalTrainer(run)
    want = _shift(str(tiny_run), local, TrainerSource(local.model), cfg, "local")
    assert local.model.training  # the routing passes left the trainer's model training
    graph_cfg = continued_training_config(reader.model_config, reader.location, reader.state, cfg,
                                          ParallelConfig(pp=2, ep=2))  # fmt: skip
    graph = GraphTrainer(graph_cfg, in_process=True)
    try:
        got = _shift(str(tiny_run), graph, GraphSource(graph), cfg, "graph")
    finally:
        graph.shutdown()
    assert got["frozen"]["layers"] == want["frozen"]["layers"]  # the same routing, the same numbers
    assert [e["name"] for e in want["frozen"]["layers"]] == ["layer 1", "layer 2", "MTP 1"]
    # the trainer's forward-only evaluation measures what the frozen routing does (main layers)
    assert want["frozen"]["evaluate_maxvio_in"] == pytest.approx(want["frozen"]["maxvio_in"])
    w, g = want["adapting"], got["adapting"]
    assert w["held_out"]["steps"] == [0, 1, 2, 3] and w["held_out"]["maxvio_mean"][0] == pytest.approx(
        want["frozen"]["maxvio_out"]
    )
    assert w["gamma"] == 0.05 and w["reference"] == want["frozen"]["maxvio_in"]
    assert w["steps_to_rebalance"] == steps_to_rebalance(w["held_out"]["steps"], w["held_out"]["maxvio_mean"],
                                                         w["reference"], cfg.tolerance)  # fmt: skip
    assert g["held_out"]["maxvio_mean"][0] == w["held_out"]["maxvio_mean"][0]
    for gl, wl in zip(g["held_out"]["loss"], w["held_out"]["loss"]):
        assert math.isclose(gl, wl, rel_tol=LOSS_RTOL)
    assert len(w["train"]["loss"]) == 3 and [e["name"] for e in w["layers_after"]] == ["layer 1", "layer 2", "MTP 1"]
