"""The Ray Train engine (``--trainer train``): the local trainer's losses and parameters at the same global batch,
MLflow from rank 0 only, and a killed worker recovered through Ray Train's FailureConfig."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from raymoe.actors.ray_train import RAY_TRAIN_DIR, check_engine, scaling_config, train_with_ray_train
from raymoe.platform.checkpoint.layout import latest_checkpoint
from raymoe.platform.checkpoint.reader import load_model, open_checkpoint
from raymoe.platform.config import ConfigError, load_config
from raymoe.platform.train.loop import pretrain

REL_TOL = 1e-5


def _cfg(tmp_path: Path, steps: int, *extra: str):
    # two workers of half a CPU each fit the session's 2-CPU Ray; min_dp=2: a fixed worker count
    return load_config(
        "tiny",
        [f"train.steps={steps}", "train.checkpoint_every=2", "parallel.dp=2", "parallel.num_cpus_per_actor=0.5",
         "elastic.min_dp=2", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", *extra],
    )  # fmt: skip


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= REL_TOL * abs(w) for g, w in zip(got, want))


def test_two_workers_train_as_the_local_trainer_on_the_same_global_batch(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, 4)
    # parallel.dp=2: the loop cuts every global batch into 2 × micro_batches, for the local trainer too
    local = pretrain(cfg, tiny_data, tmp_path / "local", progress=False, experiment="local")
    train = train_with_ray_train(cfg, tiny_data, tmp_path / "train", progress=False, experiment="train")
    assert _close(train.losses, local.losses), (train.losses, local.losses)
    assert (train.steps, train.failures) == (4, 0)
    assert abs(train.val_loss - local.val_loss) <= REL_TOL * local.val_loss
    # the checkpoints are the project's training layout, written once, by rank 0
    assert Path(train.checkpoint) == tmp_path / "train" / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    state = open_checkpoint(train.checkpoint).state
    assert (state["trainer"], state["step"]) == ("train", 4)
    ours, theirs = load_model(train.checkpoint), load_model(local.checkpoint)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name  # the expert biases included
    # Ray Train knows both checkpoints: a pointer to each in its run folder
    (run_dir,) = (tmp_path / "train" / RAY_TRAIN_DIR).iterdir()
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000002-attempt_01", "step_00000004-attempt_01"]
    # one MLflow run (rank 0's), with every step
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.run_id == train.run_id and run.data.params["trainer"] == "train"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2, 3]
    assert run.data.metrics["train/workers"] == 2


def _kill_rank_1_once(marker: Path, at_step: int):  # noqa: ANN202
    def on_step(rank: int, metrics) -> None:  # noqa: ANN001 - runs in every worker, pickled by value
        if rank == 1 and metrics.step == at_step and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


@pytest.mark.slow
def test_a_killed_worker_recovers_through_ray_train_with_every_step_done(tiny_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, 6, "tracking.enabled=false")
    local = pretrain(cfg, tiny_data, tmp_path / "local", progress=False)
    marker = tmp_path / "killed"
    # after step 2 (the checkpoint of step 2 is written and reported): steps 2.. are done again
    train = train_with_ray_train(cfg, tiny_data, tmp_path / "train", progress=False,
                                 on_step=_kill_rank_1_once(marker, at_step=2))  # fmt: skip
    assert marker.exists(), "the worker was not killed"
    assert train.failures == 1 and train.steps == 6
    # the second start resumed from the checkpoint of step 2 (not from step 0): it reported steps 4 and 6 only
    (run_dir,) = (tmp_path / "train" / RAY_TRAIN_DIR).iterdir()
    assert sorted(p.name for p in run_dir.glob("step_*")) == [
        "step_00000002-attempt_01", "step_00000004-attempt_02", "step_00000006-attempt_02"]  # fmt: skip
    assert _close(train.losses, local.losses), (train.losses, local.losses)
    assert latest_checkpoint(str(tmp_path / "train")) == str(tmp_path / "train" / "checkpoints" / "step_00000006")
    ours, theirs = load_model(train.checkpoint), load_model(local.checkpoint)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_elastic_workers_fewer_than_dp_train_the_same_global_batch(tiny_data: Path, tmp_path: Path) -> None:
    """num_workers=(1, 3) on 2 CPUs of 1 each: Ray Train starts 2 workers, which share 3 micro-batches unevenly."""
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, 3, "parallel.dp=3", "elastic.min_dp=1", "parallel.num_cpus_per_actor=1", "train.batch_size=6")
    local = pretrain(cfg, tiny_data, tmp_path / "local", progress=False, experiment="local")
    train = train_with_ray_train(cfg, tiny_data, tmp_path / "train", progress=False, experiment="elastic")
    assert _close(train.losses, local.losses), (train.losses, local.losses)
    workers = MlflowClient(tracking_uri=cfg.tracking.uri).get_metric_history(train.run_id, "train/workers")
    assert {m.value for m in workers} == {2.0}


def test_the_engine_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="parallel.pp and parallel.ep must be 1"):
        check_engine(load_config("tiny", ["parallel.ep=2"]))
    with pytest.raises(ConfigError, match="parallel.num_gpus_per_actor"):
        check_engine(load_config("tiny", ["parallel.device=cuda"]))


def test_scaling_is_elastic_only_below_parallel_dp() -> None:
    fixed = scaling_config(load_config("tiny", ["parallel.dp=2", "elastic.min_dp=2", "parallel.num_cpus_per_actor=1"]))
    assert (fixed.num_workers, fixed.resources_per_worker) == (2, {"CPU": 1.0})
    elastic = scaling_config(load_config("tiny", ["parallel.dp=4", "elastic.min_dp=2"]))
    assert elastic.num_workers == (2, 4) and elastic.use_gpu is False
    off = scaling_config(load_config("tiny", ["parallel.dp=4", "elastic.enabled=false"]))
    assert off.num_workers == 4
