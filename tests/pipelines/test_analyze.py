"""``raymoe analyze experts`` end to end on a tiny run: its outputs, its MLflow run, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_run import write_tiny_run

from raymoe.pipelines.cli import main
from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint
from raymoe.platform.model.transformer import DeepseekV3

from conftest import tiny_variant
from hf_reference import train_tokenizer

SMALL = ["--seq-len", "32", "--sequences", "4", "--batch-size", "2", "--ablation-sequences", "2",
         "--saturation-sequences", "2", "--min-count", "2", "--ratios", "0.25,0.5", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("analyze"), steps=2)


def test_analyze_experts_writes_its_report_and_an_mlflow_run(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    assert main(["analyze", "experts", "--checkpoint", str(tiny_run), "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "router saturation against step 2" in printed and "MLflow run" in printed
    report = json.loads((out / "experts.json").read_text())
    assert list(report["domains"]) == ["code", "docs", "tests"] and report["step"] == 2
    assert [e["name"] for e in report["layers"]] == ["layer 1", "layer 2", "MTP 1"]
    assert report["saturation"]["steps"] == [1, 2] and report["ablation"]["masked_experts"] == [0, 2, 4]
    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(pngs) == 7 and html.count("data:image/png;base64,") == 7 and 'src="figures' not in html
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("raymoe-analysis")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's training view
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["checkpoint"].endswith("step_00000002") and "maxvio/layer_1" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"experts.json", "report.html", "figures"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "figures")) == 7


def test_user_domains(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 40}) + "\n")
    out = tmp_path / "out"
    args = ["analyze", "experts", "--checkpoint", str(tiny_run), "--out", str(out), "--no-mlflow", *SMALL,
            "--domain", f"prose={tmp_path / 'prose.txt'}", "--domain", f"code={tmp_path / 'code.jsonl'}"]  # fmt: skip
    assert main([*args, "--saturation-sequences", "0", "--ablation-sequences", "0"]) == 0
    report = json.loads((out / "experts.json").read_text())
    assert report["domains"]["prose"]["source"].endswith("prose.txt") and report["domains"]["code"]["tokens"] == 128
    assert report["ablation"] is None and report["saturation"] is None


def test_bad_input_is_one_line_naming_it(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["analyze", "experts", "--no-mlflow", "--out", str(tmp_path / "out"), *SMALL]
    missing = tmp_path / "nowhere.jsonl"
    assert main([*base, "--checkpoint", str(tiny_run), "--domain", f"web={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unknown domain path {missing}" in err
    assert main([*base, "--checkpoint", str(tiny_run), "--domain", "web"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    dense = DeepseekV3(tiny_variant(first_k_dense_replace=3, num_nextn_predict_layers=0))
    dense.init_weights(0)
    ckpt = save_hf_checkpoint(dense, tmp_path / "dense", extra_files=[train_tokenizer(tmp_path / "tokenizer.json")])
    assert main([*base, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint {ckpt} has no routing layers" in err
    assert main([*base, "--checkpoint", str(tmp_path / "no-such-checkpoint")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tiny_run), "--seq-len", "4096"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert torch.get_default_dtype() == torch.float32
