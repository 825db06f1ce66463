"""``raymoe bench model``: the report's shape and arithmetic; timings are never asserted."""

from __future__ import annotations

import json

import pytest

from raymoe.pipelines import cli
from raymoe.pipelines.bench import format_table
from raymoe.pipelines.benchmarks.model_bench import COMPILED, OURS, BenchOptions, Job, compiled, plan_jobs, summarize
from raymoe.platform.config import load_config

REPORT_KEYS = {"train_speedup", "decode_speedup", "configs", "matmul_tflops", "peak_mib", "flops_per_token"}
CONFIG_KEYS = [f"{mode}_{what}" for mode in ("train", "decode") for what in ("tokens_per_s", "mfu", "peak_mib")]


def test_bench_model_quick_prints_a_table_and_a_json_last_line(tmp_path, capsys):
    """Ours and transformers' eager experts, fp32, on the tiny preset: every configuration ran in its own
    worker, and every number it reports is there and plausible (timings themselves are never asserted)."""
    out_file = tmp_path / "bench.json"
    code = cli.main(["bench", "model", "--quick", "--json", "--no-progress", "--out", str(out_file)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    lines = stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert REPORT_KEYS <= report.keys()
    assert json.loads(out_file.read_text()) == report
    assert report["preset"] == "tiny" and report["matmul_error"] is None
    assert report["train_speedup"] > 0 and report["decode_speedup"] > 0
    assert report["matmul_tflops"]["fp32"] > 0
    assert report["flops_per_token"]["train"] > report["flops_per_token"]["decode"] > 0  # backward: ~2x forward
    assert [(c["impl"], c["dtype"]) for c in report["configs"]] == [(OURS, "fp32"), ("eager", "fp32")]
    for config in report["configs"]:
        name = config["impl"]
        assert config["train_error"] is None and config["decode_error"] is None, config
        for key in CONFIG_KEYS:
            assert config[key] > 0, (name, key)
        # model FLOPs per second can only be a fraction of the measured matmul rate
        assert config["train_mfu"] < 1 and config["decode_mfu"] < 1, name
        assert len(config["train_seconds"]) == report["train_steps"]
        assert len(config["decode_seconds"]) == report["decode_repeats"]
        # its own worker process: torch imported (>= 50 MiB) before the model; building and training one allocates
        assert 50 < config["train_base_mib"] < config["train_peak_mib"] < report["memory_limit_mib"], name
    assert report["fastest"]["train"] == {"ours": "ours fp32", "transformers": "eager fp32"}
    table = "\n".join(lines[:-1])
    assert "train tok/s" in table and "hf eager" in table and "train speedup" in table


@pytest.mark.parametrize(
    "argv", [["--impls", "ours,nope"], ["--dtypes", "fp16"], ["--train-steps", "0"], ["--decode-tokens", "5000"]]
)
def test_bench_model_rejects_bad_options_before_running(argv, capsys):
    assert cli.main(["bench", "model", "--quick", "--no-progress", *argv]) == 2
    assert "configuration error" in capsys.readouterr().err


def _ok(tokens_per_s: float, peak_mib: float) -> dict:
    return {"ok": True, "tokens_per_s": tokens_per_s, "peak_mib": peak_mib, "base_mib": 100.0, "seconds": [1.0]}


def test_summary_takes_fastest_of_each_side_and_reports_failures():
    """Speedups are our fastest over transformers' fastest; a failed run is listed, not counted."""
    opts = BenchOptions.quick()
    opts.impls, opts.dtypes = (OURS, "eager", "batched_mm"), ("fp32", "bf16")
    results = {Job("matmul"): {"ok": True, "tflops": {"fp32": 0.25, "bf16": 1.5}, "shapes": [], "threads": 2}}
    speeds = {
        (OURS, "fp32"): (300.0, 40.0),
        (OURS, "bf16"): (900.0, 30.0),
        ("eager", "fp32"): (450.0, 20.0),
        ("eager", "bf16"): (400.0, 10.0),
    }
    for (impl, dtype), (train, decode) in speeds.items():
        results[Job("train", impl, dtype)] = _ok(train, 2000.0 + train)
        results[Job("decode", impl, dtype)] = _ok(decode, 500.0 + decode)
    for dtype in opts.dtypes:
        results[Job("train", "batched_mm", dtype)] = {"ok": False, "error": "out of memory (limit 100 MiB)"}
        results[Job("decode", "batched_mm", dtype)] = _ok(5.0, 400.0)
    report = summarize(load_config("tiny"), opts, results, {"seconds": 1.0, "load_average": [0.0, 0.0]})

    # each side's fastest, per mode: train takes ours bf16, decode ours fp32; a failed run is never the fastest
    assert report["fastest"]["train"] == {"ours": "ours bf16", "transformers": "eager fp32"}
    assert report["fastest"]["decode"] == {"ours": "ours fp32", "transformers": "eager fp32"}
    assert report["peak_mib"]["train"] == {"ours": 2900.0, "transformers": 2450.0}
    by_name = {(c["impl"], c["dtype"]): c for c in report["configs"]}
    assert by_name[("batched_mm", "bf16")]["train_tokens_per_s"] is None
    assert "out of memory" in by_name[("batched_mm", "bf16")]["train_error"]
    # MFU divides by each dtype's own rate: bf16 trains 3x faster than fp32 here, on a 6x faster matmul
    assert by_name[(OURS, "fp32")]["train_mfu"] > by_name[(OURS, "bf16")]["train_mfu"] > 0
    table = format_table(report)
    assert "batched_mm bf16 train: out of memory" in table
    assert "train speedup: 2.00x" in table


def test_summary_without_a_transformers_result_has_no_speedup():
    opts = BenchOptions.quick()
    results = {
        Job("matmul"): {"ok": False, "error": "boom"},
        Job("train", OURS, "fp32"): _ok(100.0, 300.0),
        Job("decode", OURS, "fp32"): _ok(10.0, 200.0),
        Job("train", "eager", "fp32"): {"ok": False, "error": "timed out after 1 s"},
        Job("decode", "eager", "fp32"): {"ok": False, "error": "timed out after 1 s"},
    }
    report = summarize(load_config("tiny"), opts, results, {"seconds": 1.0, "load_average": [0.0, 0.0]})
    assert report["train_speedup"] is None and report["decode_speedup"] is None
    assert report["configs"][0]["train_mfu"] is None  # no measured rate to divide by
    assert "train speedup: n/a" in format_table(report)


def test_compiled_rows_train_only_and_count_on_their_side():
    """``IMPL+compile`` rows train only (no decode job, no failure for it), and compete on their own side:
    the speedup is our fastest over transformers' fastest, compiled or not."""
    opts = BenchOptions.quick()
    opts.impls = (OURS, OURS + COMPILED, "eager", "eager" + COMPILED)
    jobs = plan_jobs(opts)
    assert Job("train", OURS + COMPILED, "fp32") in jobs and Job("decode", OURS + COMPILED, "fp32") not in jobs
    assert Job("decode", OURS, "fp32") in jobs and Job("decode", "eager" + COMPILED, "fp32") not in jobs
    results = {Job("matmul"): {"ok": True, "tflops": {"fp32": 0.25}, "shapes": [], "threads": 2}}
    for impl, train in ((OURS, 100.0), (OURS + COMPILED, 150.0), ("eager", 80.0), ("eager" + COMPILED, 120.0)):
        results[Job("train", impl, "fp32")] = {**_ok(train, 1000.0), "first_s": 30.0 if compiled(impl) else 1.5}
    results[Job("decode", OURS, "fp32")] = _ok(10.0, 500.0)
    results[Job("decode", "eager", "fp32")] = _ok(8.0, 500.0)
    report = summarize(load_config("tiny"), opts, results, {"seconds": 1.0, "load_average": [0.0, 0.0]})
    assert report["fastest"]["train"] == {"ours": "ours+compile fp32", "transformers": "eager+compile fp32"}
    assert report["train_speedup"] == pytest.approx(1.25)
    assert report["decode_speedup"] == pytest.approx(1.25)
    row = {c["impl"]: c for c in report["configs"]}[OURS + COMPILED]
    assert row["decode_tokens_per_s"] is None and row["decode_error"] is None and row["train_first_s"] == 30.0
    table = format_table(report)
    assert "hf eager+compile" in table and "failed" not in table and "1st step s" in table
    assert "train speedup: 1.25x  (ours+compile fp32 over transformers eager+compile fp32" in table


@pytest.mark.slow
def test_bench_model_quick_compiled_rows_run(capsys):
    """The real compiled rows: ours with ``train.compile`` and transformers' whole model compiled both
    train (their first step, which compiles, is reported apart), and no decode runs for them."""
    argv = ["bench", "model", "--quick", "--impls", f"{OURS}{COMPILED},eager{COMPILED}", "--json", "--no-progress"]
    code = cli.main(argv)
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    report = json.loads(stdout.strip().splitlines()[-1])
    for config in report["configs"]:
        assert config["train_error"] is None and config["train_tokens_per_s"] > 0, config
        assert config["train_first_s"] > 0 and config["decode_tokens_per_s"] is None
    assert report["train_speedup"] > 0 and report["decode_speedup"] is None
