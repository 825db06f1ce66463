"""Routing analysis on the actor graph equals the local engine's: the same records, metrics and ablation.

The graph records where its gates run (each attention stage, its own layers, MTP module included) and
returns the capture with the evaluation's results; the analysis numbers must not depend on where it ran."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_run import write_tiny_run

from raymoe.actors.analysis import GraphSource
from raymoe.platform.analysis.experts import LocalSource
from raymoe.platform.analysis.options import ExpertsConfig
from raymoe.platform.analysis.run import analyze_experts
from raymoe.platform.checkpoint.layout import latest_checkpoint
from raymoe.platform.checkpoint.reader import load_model, open_checkpoint
from raymoe.platform.config import ParallelConfig

LOSS_RTOL = 1e-5  # float32: the shards add the experts' outputs in another order


def _domains() -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    out = {}
    for d, seed in (("a", 1), ("b", 2)):
        x = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(seed))
        out[d] = [(x[:2, :-1].contiguous(), x[:2, 1:].contiguous()), (x[2:, :-1].contiguous(), x[2:, 1:].contiguous())]
    return out


def _analyze(location: str, make_source, runner: str) -> dict:  # noqa: ANN001
    reader = open_checkpoint(location)
    cfg = ExpertsConfig(seq_len=32, sequences=4, batch_size=2, ablation_sequences=2, ratios=[0.25, 0.5],
                        saturation_sequences=2, min_count=2)  # fmt: skip
    return analyze_experts(reader.location, reader.state["step"], reader.model_config, _domains(), {}, make_source,
                           cfg, runner)  # fmt: skip


def _assert_same(got: dict, want: dict) -> None:
    # the same routing, so every metric of the choices is the same number; the gate weights are floats of
    # hidden rows whose experts' outputs the shards added in another order (2026-12-04, an EPYC: 4e-10 apart)
    def choices(result: dict) -> list[dict]:
        return [{k: v for k, v in layer.items() if k != "mean_gate_weight"} for layer in result["layers"]]

    assert choices(got) == choices(want)
    for g, w in zip(got["layers"], want["layers"]):
        assert len(g["mean_gate_weight"]) == len(w["mean_gate_weight"])
        assert all(math.isclose(a, b, rel_tol=LOSS_RTOL) for a, b in zip(g["mean_gate_weight"], w["mean_gate_weight"]))
    assert [e["name"] for e in got["layers"]] == ["layer 1", "layer 2", "MTP 1"]
    assert got["saturation"] == want["saturation"]
    ga, wa = got["ablation"], want["ablation"]
    assert ga["masked_experts"] == wa["masked_experts"] == [0, 2, 4]
    for d, loss in wa["plain"].items():
        assert math.isclose(ga["plain"][d], loss, rel_tol=LOSS_RTOL)
        assert ga["top"]["a"][d][0] == ga["plain"][d]  # nothing masked: the plain loss
        for key in ("a", "b"):
            assert all(math.isclose(g, w, rel_tol=LOSS_RTOL) for g, w in zip(ga["top"][key][d], wa["top"][key][d]))
        assert all(math.isclose(g, w, rel_tol=LOSS_RTOL) for g, w in zip(ga["random"][d], wa["random"][d]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("analysis"), steps=2)


def _model_of(location: str):  # noqa: ANN202
    return open_checkpoint(location).model_config


def _local(location: str) -> LocalSource:
    return LocalSource(load_model(location))


def test_graph_analysis_equals_the_local_one_in_process(tiny_run: Path) -> None:
    """pp=2, ep=2 as plain objects: the MTP module on the last stage, its embeddings made on the first."""
    parallel = ParallelConfig(pp=2, ep=2, device="cpu")
    location = latest_checkpoint(str(tiny_run))
    want = _analyze(location, _local, "local")
    got = _analyze(location, lambda loc: GraphSource.from_checkpoint(loc, _model_of(loc), parallel, in_process=True),
                   "graph")  # fmt: skip
    assert want["saturation"]["steps"] == [1, 2] and want["saturation"]["mean"][0] < 1.0
    _assert_same(got, want)


def test_graph_analysis_equals_the_local_one_on_ray(ray_local, tiny_run: Path) -> None:  # noqa: ANN001
    """The same on Ray actors (pp=2, ep=2): the capture comes back with the evaluation's results."""
    parallel = ParallelConfig(pp=2, ep=2, device="cpu")
    location = str(tiny_run / "checkpoints" / "step_00000001")  # a run of one checkpoint: one graph started
    want = _analyze(location, _local, "local")
    got = _analyze(location, lambda loc: GraphSource.from_checkpoint(loc, _model_of(loc), parallel), "graph")
    _assert_same(got, want)
