"""``raymoe finetune`` end to end: from a transformers-written checkpoint, ESFT with a delta, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raymoe.pipelines.cli import main
from raymoe.platform.checkpoint.reader import load_model

from conftest import tiny_variant
from hf_reference import save_hf_checkpoint


def _no_mlflow(monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_esft_from_a_transformers_checkpoint_with_a_delta(tmp_path: Path, tiny_data: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    _no_mlflow(monkeypatch, tmp_path)
    hf = tmp_path / "hf"
    save_hf_checkpoint(tiny_variant(), hf)  # transformers writes no MTP modules: the model has none
    out = tmp_path / "ft"
    rc = main(["finetune", "--from", str(hf), "--data", str(tiny_data), "--general", str(tiny_data), "--method",
               "esft-gate", "--steps", "3", "--output", str(out), "--save-delta", "--no-progress",
               "train.batch_size=4", "finetune.sample_sequences=8", "finetune.general_every=2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ESFT experts per MoE layer" in printed and "delta:" in printed
    report = json.loads((out / "finetune.json").read_text())
    assert report["steps"] == 3 and set(report["selected"]) == {"1", "2"}
    assert 0 < report["trained_params"] < report["total_params"] and report["general_loss"] is not None
    tuned = load_model(report["checkpoint"]).state_dict()
    from_delta = load_model(report["delta"]).state_dict()
    assert all(torch.equal(tuned[n], from_delta[n]) for n in tuned)
    delta = json.loads((out / "delta" / "delta.json").read_text())
    assert delta["changed"] and all(".experts." in n for n in delta["changed"])


def test_bad_input_is_named(tmp_path: Path, tiny_data: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    _no_mlflow(monkeypatch, tmp_path)
    hf = tmp_path / "hf"
    save_hf_checkpoint(tiny_variant(), hf)
    base = ["finetune", "--from", str(hf), "--data", str(tiny_data), "--output", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--method", "esft-token", "--top-p", "0"]) == 2
    assert "finetune.top_p must be in (0, 1], got 0.0" in capsys.readouterr().err
    assert main([*base, "--method", "esft-token", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    dense = tmp_path / "dense"
    save_hf_checkpoint(tiny_variant(first_k_dense_replace=3), dense)
    assert main(["finetune", "--from", str(dense), "--data", str(tiny_data), "--output", str(tmp_path / "d")]) == 2
    assert "has no routing layers" in capsys.readouterr().err
    assert main(["finetune", "--from", str(tmp_path / "nowhere"), "--data", str(tiny_data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "nodata")]) == 2
    assert "nodata" in capsys.readouterr().err
