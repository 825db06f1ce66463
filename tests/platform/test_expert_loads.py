"""Expert load statistics (issue 17 §1): the format, the training run's counts in its checkpoints, a
calibration pass against a count by hand, and where serving finds them (``raymoe calibrate``:
tests/pipelines/test_calibrate_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raymoe.platform.analysis.loads import ExpertLoads, LoadsError, calibrate, find_loads, loads_file, training_loads
from raymoe.platform.checkpoint.layout import STATE_FILE, latest_checkpoint
from raymoe.platform.checkpoint.reader import load_model
from raymoe.platform.config import ConfigError, load_config
from raymoe.platform.data.loader import ShardStore, to_batch
from raymoe.platform.inference.tiers import TierConfig, plan_for_checkpoint
from raymoe.platform.model.forward import loss
from raymoe.platform.train.balance import LoadCounter
from raymoe.platform.train.loop import pretrain
from raymoe.platform.train.trainer import LocalTrainer, StepRewound

RUN = ["train.steps=4", "train.checkpoint_every=2", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 4-step tiny pretraining run, with every step's metrics."""
    cfg = load_config("tiny", RUN)
    steps = []
    result = pretrain(cfg, tiny_data, tmp_path_factory.mktemp("loads") / "run", progress=False, on_step=steps.append)
    return result, steps


def test_format_round_trip_and_errors(tmp_path: Path) -> None:
    loads = ExpertLoads([1, 2], torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), 2, "calibration", {"x": 1})
    freq = loads.frequency()
    assert freq[0].tolist() == [0.75, 0.25, 0.0] and freq[1].tolist() == [0.0, 0.0, 0.0]
    path = str(tmp_path / "l.json")
    loads.save(path)
    back = ExpertLoads.load(path)
    assert back.layers == [1, 2] and torch.equal(back.loads, loads.loads) and back.detail == {"x": 1}
    good = loads.to_dict()
    for broken, field in [({k: v for k, v in good.items() if k != "loads"}, "no field 'loads'"),
                          (good | {"loads": [[1, 2, 3]]}, r"\[2 layers, experts\]"),
                          (good | {"source": "guess"}, "source 'guess'"),
                          (good | {"loads": [[1, -1, 0], [0, 0, 0]]}, "non-negative"),
                          (good | {"version": 9}, "version 9")]:  # fmt: skip
        with pytest.raises(LoadsError, match=field):
            ExpertLoads.from_dict(broken, "where.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LoadsError, match="bad.json is not JSON"):
        ExpertLoads.load(str(tmp_path / "bad.json"))
    with pytest.raises(LoadsError, match="n_routed_experts=8"):
        loads.check_against(load_config("tiny").model, "l.json")


def test_training_counts_are_in_every_checkpoint(run) -> None:  # noqa: ANN001
    result, steps = run
    got = training_loads(result.checkpoint)
    assert got is not None and got.source == "training" and got.detail["steps"] == 4
    want = sum(m.loads.double() for m in steps)
    assert torch.equal(got.loads, want)
    cfg = load_config("tiny").model
    got.check_against(cfg, "checkpoint")  # the model's MoE layers, main then MTP
    assert got.tokens == 4 * 4 * 32 and got.loads[0].sum() == got.tokens * cfg.num_experts_per_tok
    first = json.loads(Path(result.checkpoint).parent.joinpath("step_00000002", STATE_FILE).read_text())
    assert torch.equal(torch.tensor(first["expert_loads"]["loads"], dtype=torch.float64),
                       sum(m.loads.double() for m in steps[:2]))  # fmt: skip


class FailsOnce(LocalTrainer):
    """A local trainer whose step ``at`` fails once, after which it restores its latest checkpoint and
    says so by StepRewound, as the elastic graph does."""

    def __init__(self, cfg, root: Path, at: int) -> None:  # noqa: ANN001
        super().__init__(cfg)
        self.root, self.at, self.failed = root, at, False

    def train_step(self, micro_batches):  # noqa: ANN001, ANN201
        if self.step == self.at and not self.failed:
            self.failed = True
            raise StepRewound("injected failure", self.load_checkpoint(latest_checkpoint(str(self.root))))
        return super().train_step(micro_batches)


def test_a_rewound_step_is_counted_once(run, tiny_data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = load_config("tiny", RUN)
    trainer, steps = FailsOnce(cfg, tmp_path, at=3), []  # step 2 is done, then redone from the step-2 checkpoint
    result = pretrain(cfg, tiny_data, tmp_path, progress=False, on_step=steps.append, trainer=trainer)
    assert trainer.failed and [m.step for m in steps] == [0, 1, 2, 2, 3]
    got, undisturbed = training_loads(result.checkpoint), training_loads(run[0].checkpoint)
    assert got.detail["steps"] == 4 and torch.equal(got.loads, undisturbed.loads)  # the redone step's loads once
    assert not torch.equal(got.loads, sum(m.loads.double() for m in steps))


def test_calibration_equals_a_count_by_hand(run, tiny_data: Path) -> None:  # noqa: ANN001
    result, _ = run
    got = calibrate(result.checkpoint, str(tiny_data), batches=2, batch_size=3, dtype=torch.float32, seed=5)
    model = load_model(result.checkpoint)
    counter = LoadCounter(list(model.moe_by_layer()), 8)
    store = ShardStore(tiny_data, "train")
    order = torch.randperm(len(store), generator=torch.Generator().manual_seed(5))[:6]
    with torch.no_grad():
        for chunk in order.split(3):
            ids, labels = to_batch(store.rows(chunk))
            loss(model, ids, labels, mtp_lambda=1.0, hooks=counter)
    assert torch.equal(got.loads, counter.loads().double())
    assert got.tokens == 6 * 32 and (got.loads.sum(-1) == 6 * 32 * 2).all()  # MTP layer too
    with pytest.raises(LoadsError, match="batches"):
        calibrate(result.checkpoint, str(tiny_data), batches=0)


def test_serving_finds_the_calibration_beside_the_checkpoint(run, tiny_data: Path) -> None:  # noqa: ANN001
    result, _ = run
    cfg = load_config("tiny").model
    plan = plan_for_checkpoint(result.checkpoint, cfg, torch.float32, TierConfig(budget="50%"))
    assert plan.ranking.startswith("frequency (training")
    beside = loads_file(result.checkpoint)
    calibrate(result.checkpoint, str(tiny_data), batches=1, batch_size=2).save(beside)
    try:
        assert find_loads(result.checkpoint).source == "calibration"
        plan = plan_for_checkpoint(result.checkpoint, cfg, torch.float32, TierConfig(budget="50%"))
        assert plan.ranking.startswith("frequency (calibration")
        freq = find_loads(result.checkpoint).frequency()
        hottest = int(freq[0].argmax())
        assert plan.tier[0][hottest] in ("hot", "warm")  # the most used expert is resident
    finally:
        Path(beside).unlink()


def test_frequency_without_statistics_is_named(tmp_path: Path) -> None:
    from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint
    from raymoe.platform.model.transformer import DeepseekV3

    cfg = load_config("tiny").model
    model = DeepseekV3(cfg)
    model.init_weights(0)
    hf = str(save_hf_checkpoint(model, tmp_path / "hf"))
    with pytest.raises(ConfigError, match="needs expert statistics.*raymoe calibrate"):
        plan_for_checkpoint(hf, cfg, torch.float32, TierConfig(budget="50%"))
    (tmp_path / "l.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(ConfigError, match="--expert-stats: .*l.json"):
        plan_for_checkpoint(hf, cfg, torch.float32, TierConfig(budget="50%"), str(tmp_path / "l.json"))
