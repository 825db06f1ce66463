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
