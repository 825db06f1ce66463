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
