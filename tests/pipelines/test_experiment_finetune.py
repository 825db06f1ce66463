"""``raymoe experiment finetune`` end to end at tiny sizes: the four-way table, its figure and the MLflow runs."""

from __future__ import annotations

from pathlib import Path

from raymoe.pipelines.cli import main
from raymoe.pipelines.experiment import format_finetune_table
from raymoe.pipelines.finetune import FinetuneResult
from raymoe.platform.config import load_config
from raymoe.platform.train.loop import pretrain


def test_table_rows() -> None:
    r = FinetuneResult(method="esft-token", checkpoint="c", steps=5, domain_loss=4.0, domain_loss_before=5.0,
                       general_loss=3.5, general_loss_before=3.25, trained_params=10, total_params=1000,
                       saved_bytes=3 * 2**20, delta="d", seconds=12.4)  # fmt: skip
    table = format_finetune_table([r])
    assert "| esft-token | 5.000 → 4.000 | 3.250 → 3.500 | 10 (1.0 %) | 3.00 MiB (delta) | 12 |" in table


def test_experiment_runs_the_methods(tmp_path: Path, tiny_data: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = pretrain(load_config("tiny", ["train.steps=2"]), tiny_data, tmp_path / "base", progress=False).checkpoint
    rc = main(["experiment", "finetune", "--from", base, "--general", str(tiny_data), "--steps", "2",
               "--methods", "full,esft-token,frozen-router", "--output", str(tmp_path / "exp"), "--no-progress",
               "finetune.sample_sequences=4", "finetune.general_batches=1"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "→" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["full", "esft-token", "frozen-router"]
    assert "(delta)" in rows[1] and "(checkpoint)" in rows[0]
    assert (tmp_path / "exp" / "finetune.png").stat().st_size > 10_000
    assert (tmp_path / "exp" / "esft-token" / "delta" / "delta.json").is_file()
