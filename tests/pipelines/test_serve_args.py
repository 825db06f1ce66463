"""ServeArgs.parallel: the graph runner's layout and placement, checked when the app is built."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raymoe.pipelines.serve import ServeArgs


def test_parallel_takes_the_layout_resources_and_placement() -> None:
    args = ServeArgs(checkpoint="c", runner="graph",
                     parallel={"pp": 2, "ep": 2, "num_cpus_per_actor": 0.5, "placement": "SPREAD"})  # fmt: skip
    assert args.parallel == {"pp": 2, "ep": 2, "num_cpus_per_actor": 0.5, "placement": "SPREAD"}


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ({"pp": 1, "dp": 2}, "parallel has no dp"),
        ({"pp": "2"}, "parallel.pp must be int"),
        ({"num_cpus_per_actor": "x"}, "parallel.num_cpus_per_actor must be a number"),
        ({"placement": "STRICT_PACK"}, "parallel.placement must be one of auto, PACK, SPREAD"),
    ],
)
def test_a_wrong_parallel_names_the_key(parallel: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServeArgs(checkpoint="c", runner="graph", parallel=parallel)


def test_dtype_auto_resolves_for_where_the_model_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from raymoe.pipelines.cli import build_parser
    from raymoe.platform import devices

    asked: list[str] = []

    def fast(device: torch.device) -> bool:
        asked.append(torch.device(device).type)
        return device.type == "cuda"  # a CPU without fast bf16 products, a GPU with them

    monkeypatch.setattr(devices, "bf16_matmul_is_fast", fast)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ServeArgs(checkpoint="c").dtype == "auto"
    assert build_parser(("serve",)).parse_args(["serve", "--checkpoint", "c"]).dtype == "auto"
    assert ServeArgs(checkpoint="c").torch_dtype() == torch.float32  # the replica computes, on this CPU
    assert ServeArgs(checkpoint="c", dtype="bfloat16").torch_dtype() == torch.bfloat16  # asked for: kept
    graph = {"runner": "graph", "parallel": {"pp": 1, "ep": 2}}
    assert ServeArgs(checkpoint="c", **graph).torch_dtype() == torch.float32  # CPU actors
    assert ServeArgs(checkpoint="c", gpus_per_actor=1, **graph).torch_dtype() == torch.bfloat16  # GPU actors
    assert ServeArgs(checkpoint="c", device="cpu", **graph).torch_dtype() == torch.float32
    assert asked == ["cpu", "cpu", "cpu"]  # the unseen actors' GPUs were not asked about
    with pytest.raises(ValidationError, match="dtype"):
        ServeArgs(checkpoint="c", dtype="fp16")
