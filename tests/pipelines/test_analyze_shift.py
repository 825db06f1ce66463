"""``raymoe analyze shift`` end to end on a tiny run: its outputs, its MLflow run, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_run import write_tiny_run

from raymoe.pipelines.cli import main
from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint
from raymoe.platform.model.transformer import DeepseekV3

from conftest import tiny_variant
from hf_reference import train_tokenizer

SMALL = ["--seq-len", "32", "--sequences", "4", "--batch-size", "2", "--train-batch", "2", "--steps", "4",
         "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("analyze_shift"), steps=2)


def test_analyze_shift_writes_its_report_and_an_mlflow_run(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "report"
    args = ["analyze", "shift", "--checkpoint", str(tiny_run), "--in", "code", "--out", "docs"]
    assert main([*args, "--output-dir", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "bias adapting: 4 steps on docs" in printed and "mean (main)" in printed and "MLflow run" in printed
    report = json.loads((out / "shift.json").read_text())
    assert {"checkpoint", "step", "runner", "config", "domains", "frozen", "adapting"} <= set(report)
    assert report["step"] == 2 and report["domains"]["in"]["name"] == "code"
    assert report["domains"]["out"]["tokens"] == 4 * 32 and report["domains"]["train"]["sequences"] == 4 * 2
    frozen = report["frozen"]
    assert [e["name"] for e in frozen["layers"]] == ["layer 1", "layer 2", "MTP 1"]
    for e in frozen["layers"]:
        assert 0.0 <= e["overlap"] <= 1.0 and sum(e["in"]["distribution"]) == pytest.approx(1.0)
    ad = report["adapting"]
    assert ad["gamma"] == 0.05 and ad["held_out"]["steps"] == [0, 1, 2, 3, 4] and ad["tolerance"] == 0.1
    assert ad["steps_to_rebalance"] is None or 0 <= ad["steps_to_rebalance"] <= 4
    assert ad["threshold"] == pytest.approx(frozen["maxvio_in"] * 1.1)
    html = (out / "shift.html").read_text()
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == ["shift_loads.png", "shift_maxvio.png"] and html.count("data:image/png;base64,") == 2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("raymoe-analysis")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["raymoe.command"] == "analyze shift" and "frozen/overlap/layer_1" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "adapt/maxvio_out")) == 5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"shift.json", "shift.html", "figures"} <= artifacts


def test_user_domain_paths_and_frozen_only(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "report"
    args = ["analyze", "shift", "--checkpoint", str(tiny_run), "--in", "code", "--out", f"fox={tmp_path / 'prose.txt'}",
            "--output-dir", str(out), "--no-mlflow", *SMALL, "--steps", "0"]  # fmt: skip
    assert main(args) == 0
    assert "bias adapting" not in capsys.readouterr().out
    report = json.loads((out / "shift.json").read_text())
    assert report["domains"]["out"]["name"] == "fox" and report["domains"]["out"]["source"].endswith("prose.txt")
    assert report["adapting"] is None and sorted(p.name for p in (out / "figures").glob("*.png")) == ["shift_loads.png"]


def test_bad_input_is_one_line_naming_it(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["analyze", "shift", "--no-mlflow", "--output-dir", str(tmp_path / "out"), *SMALL]
    missing = tmp_path / "nowhere.jsonl"
    assert main([*base, "--checkpoint", str(tiny_run), "--in", "code", "--out", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out {missing}: unknown domain path {missing}" in err
    assert main([*base, "--checkpoint", str(tiny_run), "--in", "recipes", "--out", "docs"]) == 2
    err = capsys.readouterr().err
    assert "--in recipes: unknown domain path recipes" in err and "code, docs, tests" in err
    (tmp_path / "short.txt").write_text("a few words only, " * 4)
    assert main([*base, "--checkpoint", str(tiny_run), "--in", "code", "--out", str(tmp_path / "short.txt")]) == 2
    assert "no sequences of 32 tokens left to train on" in capsys.readouterr().err
    dense = DeepseekV3(tiny_variant(first_k_dense_replace=3, num_nextn_predict_layers=0))
    dense.init_weights(0)
    ckpt = save_hf_checkpoint(dense, tmp_path / "dense", extra_files=[train_tokenizer(tmp_path / "tokenizer.json")])
    assert main([*base, "--checkpoint", str(ckpt), "--in", "code", "--out", "docs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint {ckpt} has no routing layers" in err
    assert main([*base, "--checkpoint", str(tiny_run), "--in", "code", "--out", "docs", "--lr", "0"]) == 2
    assert "lr must be > 0" in capsys.readouterr().err
