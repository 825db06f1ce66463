"""``raymoe calibrate`` end to end: the file beside the checkpoint or at --out, the per-layer summary,
and bad input named with exit code 2."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from raymoe.pipelines.cli import main
from raymoe.platform.analysis.loads import ExpertLoads
from raymoe.platform.checkpoint.layout import LOADS_FILE, TOKENIZER_FILE
from raymoe.platform.config import load_config
from raymoe.platform.train.trainer import LocalTrainer


@pytest.fixture(scope="module")
def output(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training output with one untrained tiny checkpoint, saved with the data's tokenizer."""
    out = tmp_path_factory.mktemp("calibrate") / "run"
    LocalTrainer(load_config("tiny")).save_checkpoint(str(out), {}, [str(tiny_data / TOKENIZER_FILE)])
    return out


def test_writes_the_loads_beside_the_checkpoint_and_a_summary(output: Path, tiny_data: Path, capsys) -> None:  # noqa: ANN001
    assert main(["calibrate", "--checkpoint", str(output), "--data", str(tiny_data), "--batches", "2",
                 "--batch-size", "3", "--dtype", "float32"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    (beside,) = output.glob(f"checkpoints/step_*/{LOADS_FILE}")  # the resolved checkpoint's directory
    loads = ExpertLoads.load(str(beside))
    cfg = load_config("tiny").model
    loads.check_against(cfg, str(beside))
    assert loads.source == "calibration" and loads.tokens == 2 * 3 * 32 and loads.detail["sequences"] == 6
    assert f"192 tokens (6 sequences of {tiny_data})" in printed and f"wrote {beside}" in printed
    lines = [line.strip() for line in printed.splitlines() if "hottest" in line]
    assert [line.split(":")[0] for line in lines] == ["layer 1", "layer 2", "MTP 1"]  # every MoE layer, MTP too
    freq = loads.frequency()
    for line, row, counts in zip(lines, freq, loads.loads):
        hottest, share = re.search(r"192 tokens; hottest (\d+) ([\d.]+) %", line).groups()
        assert row[int(hottest)] == row.max() and share == f"{100 * float(row.max()):.1f}"
        assert line.endswith(f"max/mean {float(counts.max() / counts.mean()):.2f}")
    beside.unlink()


def test_out_elsewhere(output: Path, tiny_data: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "stats" / "loads.json"
    assert main(["calibrate", "--checkpoint", str(output), "--data", str(tiny_data), "--batches", "1",
                 "--batch-size", "2", "--out", str(out)]) == 0  # fmt: skip
    assert "64 tokens" in capsys.readouterr().out
    assert ExpertLoads.load(str(out)).tokens == 64 and not list(output.glob(f"checkpoints/*/{LOADS_FILE}"))


def test_bad_input_is_named(output: Path, tiny_data: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    base = ["calibrate", "--data", str(tiny_data)]
    assert main([*base, "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(output), "--data", str(tmp_path)]) == 2  # not prepared data
    assert str(tmp_path) in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(output), "--batches", "0"]) == 2
    assert "batches and batch_size must be >= 1, got 0" in capsys.readouterr().err
    other = tmp_path / "other"  # the same checkpoint with another tokenizer
    shutil.copytree(next(output.glob("checkpoints/step_*")), other)
    (other / TOKENIZER_FILE).write_text('{"model": "another"}')
    assert main([*base, "--checkpoint", str(other)]) == 2
    assert f"--data {tiny_data} was tokenized with another tokenizer" in capsys.readouterr().err
    assert main([*base, "--checkpoint", f"file://{output}"]) == 2  # a URI: nowhere to put the file by default
    assert "--out is needed" in capsys.readouterr().err
    assert not list(output.glob(f"checkpoints/*/{LOADS_FILE}"))
