"""The pretraining loop: exact resume (on the local trainer and across trainers), checkpoints, and what MLflow
receives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raymoe.platform.checkpoint import TrainingCheckpoint, latest_checkpoint, load_model, save_hf_checkpoint
from raymoe.platform.checkpoint.layout import CHECKPOINTS_DIR, SHARDS_FILE, STATE_FILE, experts_file, stage_file
from raymoe.platform.config import ConfigError, ModelConfig, config_to_dict, load_config
from raymoe.platform.model import DeepseekV3
from raymoe.platform.train.loop import micro_batches, pretrain
from raymoe.platform.train.trainer import LocalTrainer, StepMetrics

from conftest import tiny_variant

GRAPH_REL_TOL = 1e-5  # the actor graph sums the same terms in another order


class Crash(RuntimeError):
    """Stands for a process killed mid-run."""


def tiny_cfg(tmp_path: Path, steps: int = 10, *extra: str):
    return load_config(
        "tiny",
        [
            f"train.steps={steps}",
            "train.checkpoint_every=4",
            "train.eval_every=5",
            "parallel.micro_batches=2",
            f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
            *extra,
        ],
    )


def untracked_cfg(steps: int, *extra: str):
    return load_config("tiny", [f"train.steps={steps}", "tracking.enabled=false", *extra])


def _state(checkpoint: str) -> dict:
    return json.loads(Path(checkpoint, STATE_FILE).read_text())


def _tensors(checkpoint: str) -> dict[str, torch.Tensor]:
    reader = TrainingCheckpoint(checkpoint)
    return reader.read(reader.names())


def _initialized(cfg: ModelConfig, seed: int) -> DeepseekV3:
    model = DeepseekV3(cfg)
    model.init_weights(seed)
    return model


def test_resume_reproduces_an_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    full = pretrain(cfg, tiny_data, tmp_path / "full", progress=False)
    assert len(full.losses) == 10

    def crash_after_step_6(m: StepMetrics) -> None:
        if m.step == 6:
            raise Crash

    with pytest.raises(Crash):
        pretrain(cfg, tiny_data, tmp_path / "crashed", progress=False, on_step=crash_after_step_6)
    cut = latest_checkpoint(str(tmp_path / "crashed"))
    assert cut == str(tmp_path / "crashed" / CHECKPOINTS_DIR / "step_00000004")
    # the checkpoint holds the data position and RNG of the unbroken run at that step
    same_step = _state(str(tmp_path / "full" / CHECKPOINTS_DIR / "step_00000004"))
    assert _state(cut)["loader"] == same_step["loader"] and _state(cut)["rng"] == same_step["rng"]

    resumed = pretrain(cfg, tiny_data, tmp_path / "crashed", resume=True, progress=False)

    assert resumed.losses == full.losses[4:]  # bit-identical: same weights, biases, optimizer, data position
    assert resumed.checkpoint.endswith("step_00000010") and full.checkpoint.endswith("step_00000010")
    a, b = _tensors(full.checkpoint), _tensors(resumed.checkpoint)  # the model and AdamW's state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loader", "rng", "biases", "step", "expert_loads"):  # the run's expert loads: counted once per step
        assert _state(resumed.checkpoint)[key] == _state(full.checkpoint)[key], key
    # the resumed run continues the same MLflow run: every step's loss is there once
    from mlflow.tracking import MlflowClient

    assert resumed.run_id == _state(cut)["mlflow_run_id"]
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    history = client.get_metric_history(resumed.run_id, "loss")
    assert sorted({p.step for p in history}) == list(range(10))


def test_run_contents_in_mlflow(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = tiny_cfg(tmp_path, steps=6)
    result = pretrain(cfg, tiny_data, tmp_path / "run", progress=False, run_name="contents")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == str(cfg.model.hidden_size)
    assert run.data.params["train.steps"] == "6"
    assert run.data.params["trainer"] == "local"
    for key in ("loss", "main_loss", "mtp_loss", "lr", "tokens_per_s", "maxvio/layer_0", "bias/max", "val/loss"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(result.run_id, "loss")) == 6
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/loss_curve.png", "plots/expert_load_heatmap.png", "plots/expert_load_over_time.png"}
    assert "tokenizer.json" in {a.path for a in client.list_artifacts(result.run_id)}
    assert run.data.tags["checkpoint"] == result.checkpoint
    assert run.data.tags["registered_model_version"] == "models:/raymoe/1"  # the Model Registry has it
    (version,) = client.search_model_versions("name = 'raymoe'")
    assert version.source == result.checkpoint and version.run_id == result.run_id


def test_a_half_written_checkpoint_is_ignored(tiny_data: Path, tmp_path: Path) -> None:
    cfg = untracked_cfg(4, "train.checkpoint_every=2")
    result = pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    checkpoints = Path(result.output) / CHECKPOINTS_DIR
    # a crash while writing leaves a temporary directory (local disk) or a step without its state (object store)
    (checkpoints / ".tmp-step_00000008-deadbeef").mkdir()
    (checkpoints / ".tmp-step_00000008-deadbeef" / STATE_FILE).write_text("{}")
    (checkpoints / "step_00000006").mkdir()
    (checkpoints / "step_00000006" / SHARDS_FILE).write_text("{}")
    assert latest_checkpoint(result.output) == result.checkpoint

    resumed = pretrain(
        untracked_cfg(6, "train.checkpoint_every=2"), tiny_data, result.output, resume=True, progress=False
    )

    assert len(resumed.losses) == 2 and resumed.checkpoint == str(checkpoints / "step_00000006")
    assert not (checkpoints / ".tmp-step_00000008-deadbeef").exists()  # the next save removed it


def test_keep_last_keeps_the_newest_complete_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / CHECKPOINTS_DIR
    half_written = checkpoints / "step_00000000"  # a step being written elsewhere, or cut short: left alone
    half_written.mkdir(parents=True)
    (half_written / SHARDS_FILE).write_text("{}")

    result = pretrain(
        untracked_cfg(5, "train.checkpoint_every=1", "train.keep_last=2"), tiny_data, tmp_path / "run", progress=False
    )

    assert sorted(os.listdir(checkpoints)) == ["step_00000000", "step_00000004", "step_00000005"]
    assert result.checkpoint == latest_checkpoint(str(tmp_path / "run")) == str(checkpoints / "step_00000005")
    assert (half_written / SHARDS_FILE).read_text() == "{}"


def test_init_from_an_hf_checkpoint_starts_from_its_weights(tiny_data: Path, tmp_path: Path) -> None:
    source = load_config("tiny").model
    model = _initialized(source, seed=11)
    hf = save_hf_checkpoint(model, str(tmp_path / "hf"))
    cfg = untracked_cfg(2, f"train.init_from={hf}")

    trainer = LocalTrainer(cfg)

    assert trainer.step == 0 and not trainer.optimizer.state
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in trainer.model.state_dict().items())
    result = pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    reference = pretrain(
        untracked_cfg(2),
        tiny_data,
        tmp_path / "ref",
        progress=False,
        trainer=LocalTrainer(untracked_cfg(2), model=load_model(hf).train()),
    )
    assert result.losses == reference.losses and result.steps == 2
    fresh = pretrain(untracked_cfg(1), tiny_data, tmp_path / "fresh", progress=False)
    assert fresh.losses[0] != result.losses[0]

    other = save_hf_checkpoint(_initialized(tiny_variant(moe_intermediate_size=16), seed=0), str(tmp_path / "other"))
    differs = f"train.init_from={other}: its model differs from model.* in moe_intermediate_size"
    with pytest.raises(ConfigError, match=re.escape(differs)):
        LocalTrainer(untracked_cfg(2, f"train.init_from={other}"))


def test_a_local_checkpoint_resumes_on_the_graph_and_back(tmp_path: Path) -> None:
    """The one training layout: the local trainer's checkpoint loads into a graph of another layout, and back."""
    from raymoe.actors.driver import GraphTrainer

    cfg = untracked_cfg(6, "parallel.micro_batches=2")
    graph_cfg = untracked_cfg(6, "parallel.dp=2", "parallel.pp=2", "parallel.ep=2", "parallel.micro_batches=1")
    rows = torch.randint(0, 512, (6, 4, 33), generator=torch.Generator().manual_seed(0))
    steps = [micro_batches(r[:, :-1], r[:, 1:], 2) for r in rows]  # the same 2 micro-batches for both trainers
    local = LocalTrainer(cfg)
    for batch in steps[:2]:
        local.train_step(batch)
    at_2 = local.save_checkpoint(str(tmp_path / "local"), {"loader": {}, "config": config_to_dict(cfg)})
    expected = {k: v.clone() for k, v in local.model.state_dict().items()}
    want = [local.train_step(batch).loss for batch in steps[2:4]]

    graph = GraphTrainer(graph_cfg, in_process=True)
    try:
        assert graph.load_checkpoint(at_2)["step"] == graph.step == 2
        loaded = graph.full_state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        got = graph.train_step(steps[2]).loss
        at_3 = graph.save_checkpoint(str(tmp_path / "graph"), {"loader": {}, "config": config_to_dict(graph_cfg)})
    finally:
        graph.shutdown()
    assert abs(got - want[0]) <= GRAPH_REL_TOL * want[0]
    assert _state(at_3)["trainer"] == "graph" and _state(at_3)["parallel"] == {"dp": 2, "pp": 2, "ep": 2}
    files = set(json.loads(Path(at_3, SHARDS_FILE).read_text())["weight_map"].values())
    assert files == {stage_file(0), stage_file(1), experts_file(0), experts_file(1)}

    back = LocalTrainer(cfg)
    assert back.load_checkpoint(at_3)["step"] == back.step == 3
    assert abs(back.train_step(steps[3]).loss - want[1]) <= GRAPH_REL_TOL * want[1]


def test_data_that_does_not_fit_the_model_is_a_config_error(tiny_data: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny", ["train.seq_len=64", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match="train.seq_len"):
        pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    cfg = load_config("tiny", ["model.vocab_size=256", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match="model.vocab_size"):
        pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_bad_data_path_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "raymoe.pipelines.cli",
        "pretrain",
        "tiny",
        "--trainer",
        "local",
        "--data",
        "/nonexistent",
        "--output",
        "X",
        "tracking.enabled=false",
    ]

    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert done.returncode == 2, done.stderr
    assert not (tmp_path / "X").exists() and os.listdir(tmp_path) == []  # no output folder, nor anything else
    assert done.stderr.startswith("raymoe pretrain: ") and "/nonexistent" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_training_goes_on_when_the_tracking_server_is_down(tiny_data: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("tiny", ["train.steps=3", f"tracking.uri=http://127.0.0.1:{port}"])
    result = pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    assert len(result.losses) == 3 and Path(result.checkpoint).is_dir()
    assert result.run_id is None and result.tracking_warning  # said, not raised


def test_balance_experiment_runs_three_tracked_variants(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from raymoe.platform.train.experiment import balance_experiment, format_table, variants

    cfg = load_config("tiny", ["train.steps=3", "train.eval_every=0", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    configs = variants(cfg, gamma=0.01)
    assert configs["loss-free"].train.bias_update_speed == 0.01 and configs["loss-free"].train.seq_aux_alpha == 0
    assert configs["aux-loss"].train.bias_update_speed == 0 and configs["aux-loss"].train.seq_aux_alpha == 0.001
    assert configs["none"].train.bias_update_speed == 0 and configs["none"].train.seq_aux_alpha == 0
    rows = balance_experiment(cfg, tiny_data, tmp_path / "out", gamma=0.01, experiment="balance-test", progress=False)
    assert [r.method for r in rows] == ["loss-free", "aux-loss", "none"]
    assert all(r.val_loss > 0 and r.max_vio_global >= 0 for r in rows)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name("balance-test")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["balance/aux-loss", "balance/loss-free", "balance/none"]
    assert "| loss-free |" in format_table(rows)
