"""The local pretraining loop: exact resume, checkpoints, and what MLflow receives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.platform.config import load_config
from raymoe.platform.train.checkpointing import latest_checkpoint
from raymoe.platform.train.loop import pretrain


class Crash(RuntimeError):
    """Stands for a process killed mid-run."""


def tiny_cfg(tmp_path: Path, steps: int = 10):
    return load_config(
        "tiny",
        [
            f"train.steps={steps}",
            "train.checkpoint_every=4",
            "train.eval_every=5",
            "parallel.micro_batches=2",
            f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        ],
    )


def test_resume_reproduces_an_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    full = pretrain(cfg, tiny_data, tmp_path / "full", progress=False)
    assert len(full.losses) == 10

    def crash_after_step_6(m) -> None:
        if m.step == 6:
            raise Crash

    with pytest.raises(Crash):
        pretrain(cfg, tiny_data, tmp_path / "crashed", progress=False, on_step=crash_after_step_6)
    assert latest_checkpoint(tmp_path / "crashed").name == "step_00000004"
    resumed = pretrain(cfg, tiny_data, tmp_path / "crashed", resume=True, progress=False)
    assert resumed.losses == full.losses[4:]  # bit-identical: same weights, biases, optimizer, data position
    from raymoe.platform.checkpoint import load_hf_checkpoint

    a = load_hf_checkpoint(full.checkpoint).state_dict()
    b = load_hf_checkpoint(resumed.checkpoint).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run continues the same MLflow run: every step's loss is there once
    from mlflow.tracking import MlflowClient

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
    for key in ("loss", "main_loss", "mtp_loss", "lr", "tokens_per_s", "maxvio/layer_0", "bias/max", "val/loss"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(result.run_id, "loss")) == 6
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/loss_curve.png", "plots/expert_load_heatmap.png"}
    assert "tokenizer.json" in {a.path for a in client.list_artifacts(result.run_id)}
    assert run.data.tags["checkpoint"] == str(result.checkpoint)


def test_a_half_written_checkpoint_is_ignored(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, steps=4)
    result = pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    # a crash while writing leaves only a temporary directory, never a step_ directory
    (result.output / "checkpoints" / ".tmp-step_00000008-deadbeef").mkdir()
    (result.output / "checkpoints" / ".tmp-step_00000008-deadbeef" / "config.json").write_text("{}")
    assert latest_checkpoint(result.output) == result.checkpoint


def test_data_that_does_not_fit_the_model_is_a_config_error(tiny_data: Path, tmp_path: Path) -> None:
    from raymoe.platform.config import ConfigError

    cfg = load_config("tiny", ["train.seq_len=64", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    with pytest.raises(ConfigError, match="train.seq_len"):
        pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    cfg = load_config("tiny", ["model.vocab_size=256", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    with pytest.raises(ConfigError, match="model.vocab_size"):
        pretrain(cfg, tiny_data, tmp_path / "run", progress=False)


def test_training_goes_on_when_the_tracking_server_is_down(tiny_data: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("tiny", ["train.steps=3", f"tracking.uri=http://127.0.0.1:{port}"])
    result = pretrain(cfg, tiny_data, tmp_path / "run", progress=False)
    assert len(result.losses) == 3 and result.checkpoint.is_dir()
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
