"""MLflow tracking: what a run holds when read back, a tracking server that is down, the UI command."""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from raymoe.pipelines import ui
from raymoe.platform.checkpoint.layout import SHARDS_FILE, STATE_FILE, CheckpointError, resolve
from raymoe.platform.config import TrackingConfig, config_to_dict, flatten, load_config
from raymoe.platform.plots import RunHistory, normalized_loads
from raymoe.platform.tracking import (
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_KIND_TRAINING,
    HEATMAP_FILE,
    LOSS_CURVE_FILE,
    TIMELINE_FILE,
    Tracker,
)
from raymoe.platform.train.trainer import StepMetrics

N_LAYERS, N_EXPERTS = 2, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HTTP_ENV_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
DOWN_BUDGET_S = 4.0  # a dead server may cost this much in all, not minutes


def fake_step(step: int, mtp_loss: float | None = 1.5) -> StepMetrics:
    """A StepMetrics as the trainer makes it, without training: expert 0 is the hot one."""
    loads = torch.full((N_LAYERS, N_EXPERTS), 10.0)
    loads[:, 0] = 30.0
    mean = loads.mean(dim=1)
    return StepMetrics(
        step=step, loss=5.0 - 0.1 * step, main_loss=4.0 - 0.1 * step, mtp_loss=mtp_loss, aux_loss=None,
        lr=1e-3, grad_norm=0.5 + step, tokens=512, seconds=0.25, loads=loads,
        max_vio=(loads.max(dim=1).values - mean) / mean, bias_min=-0.01 * step, bias_max=0.01 * step,
        biases=torch.linspace(-0.01 * step, 0.01 * step, N_LAYERS * N_EXPERTS).reshape(N_LAYERS, N_EXPERTS),
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty working directory with no MLFLOW_TRACKING_URI (so nothing leaks into the repo)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in HTTP_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return cwd


def sqlite_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlruns.db'}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_run_contents_read_back(store: Path, in_empty_dir: Path) -> None:
    cfg = load_config("tiny")
    params = flatten(config_to_dict(cfg)) | {f"extra.p{i}": i for i in range(120)}  # > 100: two batches
    tracker = Tracker(TrackingConfig(uri=sqlite_uri(store), experiment="contents"), run_name="r1", tags={"k": "v"})
    tracker.start(params)
    n_steps = 6
    for step in range(n_steps):
        tracker.log_step(fake_step(step, mtp_loss=None if step == 2 else 1.5))
    tracker.log_eval(3, 3.0, torch.tensor([0.5, 1.0]))
    tracker.log_eval(6, 2.0, torch.tensor([0.2, 0.4]))
    assert tracker.history.main_losses[4] == pytest.approx(3.6) and tracker.history.losses[4] == pytest.approx(4.6)
    _, _, biases_TLE = tracker.history.timeline.arrays()  # the over-time plot gets each step's biases
    assert biases_TLE.shape == (n_steps, N_LAYERS, N_EXPERTS) and biases_TLE[5, -1, -1] == pytest.approx(0.05)
    summary = tracker.finish(checkpoint="/ckpt/step_000006")

    client = MlflowClient(sqlite_uri(store))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["model.hidden_size"] == str(cfg.model.hidden_size)
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert len(run.data.params) == len(params)
    assert run.data.tags["checkpoint"] == "/ckpt/step_000006" and run.data.tags["k"] == "v"

    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(n_steps))
    assert {m.step: m.value for m in history}[4] == pytest.approx(4.6)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "mtp_loss")) == [0, 1, 3, 4, 5]
    metrics = run.data.metrics
    assert "aux_loss" not in metrics
    for key in ("main_loss", "lr", "grad_norm", "tokens_per_s", "bias/min", "bias/max", "maxvio/mean"):
        assert key in metrics, key
    assert metrics["tokens_per_s"] == pytest.approx(512 / 0.25)
    assert metrics["maxvio/layer_0"] == pytest.approx(1.4) and metrics["maxvio/layer_1"] == pytest.approx(1.4)
    assert len(client.get_metric_history(run.info.run_id, "maxvio/layer_1")) == n_steps
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/loss")) == [3, 6]
    assert metrics["val/perplexity"] == pytest.approx(math.exp(2.0))
    assert metrics["val/maxvio_global/layer_1"] == pytest.approx(0.4)
    assert metrics["val/maxvio_global"] == pytest.approx(0.3)

    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {f"plots/{LOSS_CURVE_FILE}", f"plots/{HEATMAP_FILE}", f"plots/{TIMELINE_FILE}"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(in_empty_dir.parent / "dl")))
    for name in (LOSS_CURVE_FILE, HEATMAP_FILE, TIMELINE_FILE):
        assert (local / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert (local / "checkpoint.txt").read_text().strip() == "/ckpt/step_000006"
    assert run.info.artifact_uri.startswith(store.as_uri())  # beside the database, not in the cwd
    assert list(in_empty_dir.iterdir()) == []

    n_points = 11 * n_steps - 1 + 2 * 5  # 11 per step (no aux_loss; one step without MTP), 5 per eval
    assert summary.sent_points == n_points and summary.dropped_points == 0
    assert not summary.degraded and summary.warning is None and summary.lost == []


def test_two_trackers_and_a_resumed_run(store: Path, in_empty_dir: Path) -> None:
    uri = sqlite_uri(store)
    a = Tracker(TrackingConfig(uri=uri, experiment="pair"), run_name="a")
    b = Tracker(TrackingConfig(uri=uri, experiment="pair"), run_name="b")
    a.start({"train": {"steps": 3}})
    b.start({"train": {"steps": 3}})
    for step in range(3):
        a.log_metrics({"x": 1.0}, step)
        b.log_metrics({"x": 2.0}, step)
    a.finish(status="KILLED")
    b.finish()
    client = MlflowClient(uri)
    assert a.run_id != b.run_id
    assert {m.value for m in client.get_metric_history(a.run_id, "x")} == {1.0}
    assert client.get_run(a.run_id).info.status == "KILLED"

    resumed = Tracker(TrackingConfig(uri=uri, experiment="pair"), run_id=a.run_id)
    resumed.start({"train": {"steps": 5}})  # a changed param is reported, not an error
    resumed.log_metrics({"x": 1.0}, 3)
    summary = resumed.finish()
    assert resumed.run_id == a.run_id and summary.warning is None
    assert sorted(m.step for m in client.get_metric_history(a.run_id, "x")) == [0, 1, 2, 3]
    assert client.get_run(a.run_id).data.params["train.steps"] == "3"


def test_experiments_are_marked_as_model_training(store: Path, in_empty_dir: Path) -> None:
    """New, reused and resumed-into experiments carry the kind that opens MLflow 3's training view."""
    uri = sqlite_uri(store)
    client = MlflowClient(uri)

    def kind(name: str) -> str | None:
        return client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)

    def one_run(name: str, run_id: str | None = None) -> str:
        tracker = Tracker(TrackingConfig(uri=uri, experiment=name), run_id=run_id)
        tracker.log_metrics({"x": 1.0}, 0)
        tracker.finish()
        return tracker.run_id

    one_run("kind-new")
    assert kind("kind-new") == EXPERIMENT_KIND_TRAINING
    client.create_experiment("kind-untagged")  # made before the tag existed, or by another tool
    client.create_experiment("kind-genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    client.create_experiment("kind-finetuning", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    for name in ("kind-untagged", "kind-genai", "kind-finetuning"):
        one_run(name)
    assert kind("kind-untagged") == kind("kind-genai") == EXPERIMENT_KIND_TRAINING
    assert kind("kind-finetuning") == "finetuning"  # a model-training kind a user chose is kept

    run_id = one_run("kind-resumed")
    client.delete_experiment_tag(client.get_experiment_by_name("kind-resumed").experiment_id, EXPERIMENT_KIND_TAG)
    assert one_run("kind-resumed", run_id=run_id) == run_id
    assert kind("kind-resumed") == EXPERIMENT_KIND_TRAINING


def test_final_checkpoint_is_a_model_version_that_resolves(
    store: Path, in_empty_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = sqlite_uri(store)
    checkpoints = []
    for step in (6, 8):
        ckpt = in_empty_dir.parent / "out" / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / STATE_FILE).write_text("{}")
        (ckpt / SHARDS_FILE).write_text("{}")
        checkpoints.append(str(ckpt))

    def one_run(checkpoint: str, status: str = "FINISHED") -> Tracker:
        tracker = Tracker(TrackingConfig(uri=uri, experiment="registry"), register_as="tiny-model")
        tracker.log_metrics({"x": 1.0}, 0)
        tracker.finish(status=status, checkpoint=checkpoint)
        return tracker

    first = one_run(checkpoints[0])
    assert first.summary.model_version == "models:/tiny-model/1" and first.summary.lost == []
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).data.tags["registered_model_version"] == "models:/tiny-model/1"
    assert one_run(checkpoints[1], status="FAILED").summary.model_version is None  # a failed run is not a model
    assert one_run(checkpoints[1]).summary.model_version == "models:/tiny-model/2"
    assert client.get_model_version("tiny-model", "1").run_id == first.run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where serve and resolve look
    client.set_registered_model_alias("tiny-model", "prod", "1")
    assert resolve("models:/tiny-model/1").location == checkpoints[0]
    assert resolve("models:/tiny-model/latest").location == checkpoints[1]
    assert resolve("models:/tiny-model@prod").location == checkpoints[0]
    assert resolve(str(in_empty_dir / "models:/tiny-model/2")).location == checkpoints[1]  # made absolute by a caller
    with pytest.raises(CheckpointError, match="models:/tiny-model/9: not in the Model Registry"):
        resolve("models:/tiny-model/9")
    with pytest.raises(CheckpointError, match="is not a model URI"):
        resolve("models:/tiny-model")


@pytest.mark.parametrize("via", ["config", "env", "silent"])
def test_server_down_does_not_stop_training(
    via: str, in_empty_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, request
) -> None:
    if via == "silent":
        uri = f"http://127.0.0.1:{request.getfixturevalue('silent_server')}"
    else:
        uri = f"http://127.0.0.1:{closed_port()}"
    cfg = TrackingConfig(uri=uri if via != "env" else None)
    if via == "env":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    caplog.set_level(logging.WARNING, logger="raymoe.platform.tracking")
    t0 = time.monotonic()
    tracker = Tracker(cfg, http_timeout_s=1)
    tracker.start(flatten(config_to_dict(load_config("tiny"))))
    n_steps = 50
    for step in range(n_steps):
        tracker.log_step(fake_step(step))
    tracker.log_eval(n_steps, 2.0, torch.tensor([0.1, 0.2]))
    tracker.set_tag("note", "x")
    summary = tracker.finish(checkpoint="/ckpt/last")
    elapsed = time.monotonic() - t0

    assert elapsed < DOWN_BUDGET_S, f"a dead tracking server cost {elapsed:.1f} s"
    assert tracker.uri == uri and tracker.run_id is None
    assert summary is tracker.summary and tracker.degraded
    assert tracker.dropped == summary.dropped_points == 11 * n_steps + 5 and summary.sent_points == 0
    assert "the run itself" in summary.lost and "checkpoint.txt" in summary.lost
    assert f"{11 * n_steps + 5} metric points" in summary.warning
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1  # one warning for the outage, not one per step
    assert summary.warning in caplog.text  # and the summary at the end
    assert not any(name in os.environ for name in HTTP_ENV_VARS)  # MLflow's settings restored


def _failing_log_batch(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[int]:
    """Make the first ``failures`` MlflowClient.log_batch calls fail as a dropped connection would."""
    calls = [0]
    original = MlflowClient.log_batch

    def log_batch(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] <= failures:
            raise ConnectionError("tracking server unreachable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    return calls


def test_buffered_points_are_sent_when_the_store_is_back(
    store: Path, in_empty_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _failing_log_batch(monkeypatch, failures=3)
    caplog.set_level(logging.WARNING, logger="raymoe.platform.tracking")
    uri = sqlite_uri(store)
    tracker = Tracker(TrackingConfig(uri=uri, experiment="recover"), retry_interval_s=0.0)
    tracker.start({"a": 1})
    for step in range(5):
        tracker.log_step(fake_step(step))
    summary = tracker.finish()
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == list(range(5))
    assert client.get_run(tracker.run_id).data.params == {"a": "1"}
    assert summary.degraded and summary.dropped_points == 0 and summary.warning is None
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"MLflow tracking at {uri} failed",
        f"MLflow tracking at {uri} reachable again; sending 33 buffered points",
    ]


def test_buffer_is_bounded_and_retries_wait(store: Path, in_empty_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _failing_log_batch(monkeypatch, failures=1)
    tracker = Tracker(TrackingConfig(uri=sqlite_uri(store), experiment="bounded"), max_buffered_points=20)
    tracker.start({"a": 1})  # fails; the next try is due only after the retry interval
    for step in range(10):
        tracker.log_step(fake_step(step))
    assert calls[0] == 1  # no attempt per step while the store is failing
    summary = tracker.finish()  # the final flush always tries
    assert summary.dropped_points == 11 * 10 - 20 and summary.sent_points == 20
    assert f"{11 * 10 - 20} metric points" in summary.warning
    steps = {m.step for m in MlflowClient(sqlite_uri(store)).get_metric_history(tracker.run_id, "loss")}
    assert steps == {9}  # only the newest points were kept


def test_disabled_tracker_is_a_no_op(in_empty_dir: Path) -> None:
    tracker = Tracker(TrackingConfig(enabled=False))
    tracker.start({"a": 1})
    tracker.log_step(fake_step(0))
    tracker.log_eval(0, 1.0, torch.zeros(N_LAYERS))
    tracker.set_tag("k", "v")
    assert tracker.log_artifact(__file__) is False and tracker.log_text("t", "t.txt") is False
    summary = tracker.finish(checkpoint="/ckpt")
    assert tracker.run_id is None and summary.warning is None and summary.sent_points == 0
    assert list(in_empty_dir.iterdir()) == []


def test_run_history_plots(tmp_path: Path) -> None:
    rel = normalized_loads(torch.tensor([[1.0, 3.0], [0.0, 0.0]]).numpy())
    assert rel.tolist() == [[0.5, 1.5], [0.0, 0.0]]  # per layer; an unused layer stays 0
    history = RunHistory()
    for step in (3, 4):
        history.add_step(step, 2.0, fake_step(step).loads.numpy())
    history.add_eval(4, float("nan"))
    assert history.val_steps == [] and history.load_sum_LE[0, 0] == 60.0
    files = history.write(tmp_path, earlier_losses=[(0, 3.0), (3, 9.9)])  # a resumed run's earlier points
    assert sorted(f.name for f in files) == sorted([LOSS_CURVE_FILE, HEATMAP_FILE, TIMELINE_FILE])
    assert all(f.read_bytes()[:8] == PNG_MAGIC for f in files)


def _ui(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raymoe")
    ui.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui", *argv])
    return args.func(args)


def test_ui_dry_run_serves_the_default_store(in_empty_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _ui(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--backend-store-uri sqlite:///{in_empty_dir}/mlruns.db" in out
    assert f"--default-artifact-root {(in_empty_dir / 'mlruns').as_uri()}" in out
    assert "--host 127.0.0.1 --port 5000 --workers 1" in out
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in out and "http://127.0.0.1:5000" in out
    assert list(in_empty_dir.iterdir()) == []


def test_ui_store_choice(in_empty_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://u@db/mlflow")
    _ui(["--dry-run", "--port", "5001"])
    assert "--backend-store-uri postgresql+psycopg2://u@db/mlflow --host" in capsys.readouterr().out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # a server: serve the local store
    _ui(["--dry-run", "--backend-store-uri", "sqlite:////data/x.db", "--host", "0.0.0.0"])
    out = capsys.readouterr().out
    assert "--backend-store-uri sqlite:////data/x.db" in out and "http://127.0.0.1:5000" in out
