"""``raymoe bench experts`` end to end at toy sizes: every configuration in its own process, the table, the figure."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raymoe.pipelines.cli import main as cli
from raymoe.platform.config import config_to_dict, load_config
from raymoe.platform.train.trainer import LocalTrainer


def test_bench_experts_on_a_tiny_checkpoint(tiny_data: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg = load_config("tiny", ["tracking.enabled=false"])
    trainer = LocalTrainer(cfg)
    rows = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    trainer.train_step([(rows[:, :-1], rows[:, 1:])])
    ckpt = trainer.save_checkpoint(str(tmp_path / "run"), {"config": config_to_dict(cfg)})
    figure = tmp_path / "pareto.png"
    argv = ["bench", "experts", "--checkpoint", ckpt, "--data", str(tiny_data), "--budgets", "100,25",
            "--policies", "frequency,uniform", "--eval-sequences", "2", "--prompt-len", "8", "--new-tokens", "4",
            "--repeats", "1", "--no-compile", "--calibration-batches", "1", "--figure", str(figure),
            "--json"]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    names = [r["name"] for r in report["rows"]]
    assert names == ["full, eager", "100 %", "25 %, frequency", "25 %, uniform"]
    full, hundred, freq, _ = report["rows"]
    assert hundred["ppl"] == full["ppl"] and hundred["agreement"] == 1.0  # every expert hot: the same path
    assert freq["expert_held_bytes"] <= 0.25 * full["expert_held_bytes"]
    assert freq["tiers"]["hot"] + freq["tiers"]["warm"] + freq["tiers"]["cold"] == 24
    assert freq["ranking"].startswith("frequency (calibration")
    assert "| 25 %, frequency |" in out and "goal at 25 %" in out
    assert figure.stat().st_size > 10_000
