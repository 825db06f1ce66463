"""``raymoe bench kernels``: its options, and its answer without a GPU (timings are never asserted)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from raymoe.pipelines.benchmarks import kernel_bench


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    kernel_bench.add_arguments(parser)
    return parser


def test_arguments() -> None:
    args = _parser().parse_args([])
    assert args.kernels == kernel_bench.KERNELS and args.tokens == (4096, 16384) and not args.json
    args = _parser().parse_args(["--json", "--kernels", "mla_decode,fp8_gemm", "--tokens", "128", "--iters", "3"])
    assert args.kernels == ("mla_decode", "fp8_gemm") and args.tokens == (128,) and args.iters == 3 and args.json


@pytest.mark.parametrize("bad", [["--kernels", "flash"], ["--tokens", "4k"], ["--tokens", "0"]])
def test_bad_arguments_are_refused(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(bad)
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU answer")
def test_without_cuda_exits_nonzero_with_a_json_error(tmp_path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    out = tmp_path / "k.json"
    code = kernel_bench.main(_parser().parse_args(["--json", "--out", str(out)]))
    captured = capsys.readouterr()
    assert code == 1
    assert "needs a CUDA GPU" in captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert "CUDA" in report["error"] and report["results"] == []
    assert json.loads(out.read_text()) == report


def test_report_arithmetic() -> None:
    """Fractions of the ceilings and the targets, from made-up timings."""
    ceilings = {"matmul_tflops": 800.0, "copy_gbps": 4000.0}
    ffn = kernel_bench._row("grouped_ffn", "s", 2.0, 3.0, 0.0, flops=1e12)  # 500 TFLOP/s
    mla = kernel_bench._row("mla_decode", "s", 1.0, 5.0, 0.0, bytes_moved=2.5e9)  # 2500 GB/s
    fp8 = kernel_bench._row("fp8_gemm", "s", 1.0, 1.6, 0.0, flops=1e12)
    for row in (ffn, mla, fp8):
        kernel_bench._add_fractions(row, ceilings)
    assert ffn["tflops"] == pytest.approx(500) and ffn["of_matmul"] == pytest.approx(0.625) and ffn["meets_target"]
    assert mla["gbps"] == pytest.approx(2500) and mla["of_copy"] == pytest.approx(0.625) and not mla["meets_target"]
    assert fp8["speedup"] == pytest.approx(1.6) and fp8["meets_target"]
    table = kernel_bench.format_report(
        {"date": "d", "device": "dev", "torch": "t", "triton": "3.9", "ceilings": ceilings, "results": [ffn, mla]}
    )
    assert "500 TFLOP/s" in table and "62%" in table and "✗" in table
