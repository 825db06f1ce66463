"""Devices: ``parallel.device`` and serve's ``device`` (auto | cpu | cuda), and what a machine without CUDA says."""

from __future__ import annotations

import os

import pytest
import torch

from raymoe.platform.config import ConfigError, load_config
from raymoe.platform.devices import check_device_name, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the answers of a machine without CUDA")


def test_names_are_checked_where_they_are_given() -> None:
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        check_device_name(good, "parallel.device")
    for bad in ("gpu", "cuda:x", "cpu:0", "mps"):
        with pytest.raises(ValueError, match="parallel.device must be one of auto, cpu, cuda"):
            check_device_name(bad, "parallel.device")
    with pytest.raises(ConfigError, match="parallel.device must be one of"):
        load_config("tiny", ["parallel.device=gpu"])
    from pydantic import ValidationError

    from raymoe.pipelines.serve import ServeArgs

    assert ServeArgs(checkpoint="x").device == "auto"
    with pytest.raises(ValidationError, match="device must be one of"):
        ServeArgs(checkpoint="x", device="tpu")


@no_cuda
def test_auto_is_the_cpu_and_cuda_is_a_clear_error_without_a_gpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="parallel.device=cuda: this process sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device=cuda: this process sees no CUDA device"):
        resolve_device("cuda", "device")


@no_cuda
def test_trainers_on_cuda_without_a_gpu_fail_at_start_naming_the_field() -> None:
    from raymoe.actors.driver import GraphTrainer
    from raymoe.platform.train.trainer import LocalTrainer

    assert LocalTrainer(load_config("tiny")).device.type == "cpu"  # auto
    with pytest.raises(ConfigError, match="parallel.device=cuda"):
        LocalTrainer(load_config("tiny", ["parallel.device=cuda"]))
    with pytest.raises(ConfigError, match="parallel.device=cuda"):  # each actor resolves its device (in process here)
        GraphTrainer(load_config("tiny", ["parallel.device=cuda", "parallel.ep=2"]), in_process=True)


def test_host_allocator_tuning_has_a_default_and_is_checked() -> None:
    """$RAYMOE_MALLOC_MMAP_THRESHOLD: 256 MiB by default, 0 turns it off, glibc's thresholds set when given, a bad
    value names the variable. Each case in a fresh process (the setting is per process and once)."""
    import subprocess
    import sys

    code = "from raymoe.platform.devices import tune_host_allocator as t\nprint(t(), t())"

    def run(value: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "RAYMOE_MALLOC_MMAP_THRESHOLD"}
        if value is not None:
            env["RAYMOE_MALLOC_MMAP_THRESHOLD"] = value
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    assert run(None).stdout.split() == [str(256 << 20)] * 2
    assert run("0").stdout.split() == ["0", "0"]
    assert run(str(1 << 30)).stdout.split() == [str(1 << 30)] * 2  # glibc took it (mallopt returned 1)
    for bad, words in (("lots", "must be a number of bytes"), (str(1 << 31), "must be below 2 GiB")):
        out = run(bad)
        assert out.returncode != 0 and words in out.stderr


@pytest.fixture
def bf16_speed(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Set whether this process's devices run bf16 products fast (the answers are cached per process)."""
    from raymoe.platform import devices

    monkeypatch.setattr(devices, "_resolved", {})

    def set_fast(fast: bool) -> None:
        devices._resolved.clear()
        monkeypatch.setattr(devices, "bf16_matmul_is_fast", lambda device: fast)

    return set_fast


def test_train_dtype_auto_is_bf16_only_where_its_products_are_fast(bf16_speed, caplog) -> None:  # noqa: ANN001
    from raymoe.platform.devices import train_dtype
    from raymoe.platform.train.trainer import autocast_context

    def autocast_dtype(name: str) -> torch.dtype | None:
        with autocast_context(name, "cpu"):
            return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    bf16_speed(False)  # an AVX2-only x86 CPU: torch's fallback bf16 kernel
    with caplog.at_level("WARNING", logger="raymoe.platform.devices"):
        assert train_dtype("auto", "cpu") == "fp32" and autocast_dtype("auto") is None
        assert train_dtype("fp32", "cpu") == "fp32" and autocast_dtype("fp32") is None
        assert not caplog.records
        assert train_dtype("bf16", "cpu") == "bf16" and autocast_dtype("bf16") == torch.bfloat16  # asked for: kept
        assert autocast_dtype("bf16") == torch.bfloat16
    (warning,) = caplog.records  # once a process, not once a micro-batch
    message = warning.getMessage()
    assert "train.dtype=bf16 on cpu" in message and "train.dtype=auto (float32 here)" in message

    bf16_speed(True)  # AVX512 / AMX, or a GPU with bf16
    caplog.clear()
    with caplog.at_level("WARNING", logger="raymoe.platform.devices"):
        assert train_dtype("auto", "cpu") == "bf16" and autocast_dtype("auto") == torch.bfloat16
        assert train_dtype("bf16", "cpu") == "bf16"
    assert not caplog.records
    with pytest.raises(ValueError, match="train.dtype must be one of fp32, bf16, auto, got 'fp16'"):
        train_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match="train.dtype must be one of fp32, bf16, auto, got 'fp16'"):
        load_config("tiny", ["train.dtype=fp16"])
    assert load_config("small").train.dtype == "auto"  # the demo's preset leaves it to the machine


def test_auto_trains_exactly_as_the_dtype_it_resolves_to(bf16_speed) -> None:  # noqa: ANN001
    from raymoe.platform.train.trainer import LocalTrainer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, load_config("tiny").model.vocab_size, (2, 16), generator=g)

    def loss(dtype: str) -> float:
        return LocalTrainer(load_config("tiny", [f"train.dtype={dtype}"])).train_step([(ids, ids)]).loss

    bf16_speed(False)
    fp32, auto_slow = loss("fp32"), loss("auto")
    bf16_speed(True)
    bf16, auto_fast = loss("bf16"), loss("auto")
    assert auto_slow == fp32 and auto_fast == bf16 and bf16 != fp32


def test_serve_dtype_auto_is_bfloat16_only_where_its_products_are_fast(bf16_speed) -> None:  # noqa: ANN001
    from raymoe.platform.devices import serve_dtype

    bf16_speed(False)
    assert serve_dtype("auto", "cpu") == torch.float32
    assert serve_dtype("bfloat16", "cpu") == torch.bfloat16 and serve_dtype("float32", "cpu") == torch.float32
    if not torch.cuda.is_available():  # GPUs the graph's actors reserve, unseen here, are taken as Ampere or later
        assert serve_dtype("auto", "cuda") == torch.bfloat16
    bf16_speed(True)
    assert serve_dtype("auto", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float32, got 'fp16'"):
        serve_dtype("fp16", "cpu")
