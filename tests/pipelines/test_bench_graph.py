"""``raymoe bench graph``: the report's shape, every row run; timings are never asserted."""

from __future__ import annotations

import json

import pytest

from raymoe.pipelines import cli
from raymoe.pipelines.benchmarks.graph_bench import LAYOUTS, parse_layouts

ROW_KEYS = {"label", "step_s", "tokens_per_s", "x_local", "compute_s", "other_s", "sum_compute_s", "first_loss"}


@pytest.mark.slow
def test_bench_graph_tiny_runs_every_row_and_prints_a_json_last_line(tmp_path, capsys):
    """The local trainer, the graph at every default layout by both transports (direct from two actors on) and Ray
    Train at each dp, one timed step each, on the tiny preset; the hop latency of both transports."""
    out_file = tmp_path / "graph.json"
    argv = ["bench", "graph", "--preset", "tiny", "--warmup-steps", "0", "--steps", "1", "--json", "--no-progress"]
    code = cli.main([*argv, "--out", str(out_file)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    lines = stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert json.loads(out_file.read_text()) == report
    assert (report["preset"], report["steps"], report["micro_batches"]) == ("tiny", 1, 2)
    rows = report["rows"]
    # the Ray Train engine beside the last graph row of each dp
    g = [f"graph {dp},{pp},{ep}" for dp, pp, ep in LAYOUTS]
    assert [r["label"] for r in rows] == ["local", g[0], g[1], f"{g[1]} direct", g[2], f"{g[2]} direct", "train dp=1",
                                          g[3], f"{g[3]} direct", "train dp=2"]  # fmt: skip
    direct = {(r["dp"], r["pp"], r["ep"]): r for r in rows if r.get("transport") == "direct"}
    plain = {(r["dp"], r["pp"], r["ep"]): r for r in rows if r.get("transport") == "object_store"}
    for layout, r in direct.items():  # the same step: the same loss and the same tensors moved
        assert r["first_loss"] == plain[layout]["first_loss"] and r["moved_mb"] == plain[layout]["moved_mb"] > 0
    assert [h["transport"] for h in report["hops"]] == ["object_store", "direct"]
    assert all(h["ms"] > 0 and h["mb"] > 0 for h in report["hops"])
    for r in rows:
        assert r["error"] is None, r
        assert ROW_KEYS <= r.keys()
        assert len(r["steps_s"]) == 1 and r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["x_local"] > 0
        assert r["compute_s"] > 0 and r["sum_cpu_s"] > 0  # timed by the actors, and read from /proc
        # the tiny model at init: near log(vocab 512) = 6.2 for the main loss, plus 0.3 x the MTP loss
        assert 6.0 < r["first_loss"] < 9.0, r["first_loss"]
    graph = plain
    assert graph[(2, 1, 2)]["micro_batches_per_replica"] == 1 and graph[(1, 1, 2)]["micro_batches_per_replica"] == 2
    # actors: one colocated; stages + shards, every one of which computed in the step
    assert [graph[layout]["actors"] for layout in LAYOUTS] == [1, 3, 4, 4]
    for layout in LAYOUTS:
        r = graph[layout]
        assert len(r["compute_by_actor"]) == r["actors"] and min(r["compute_by_actor"].values()) > 0, layout
    r = graph[(1, 1, 2)]
    assert set(r["compute_by_actor"]) == {"stage_r0_s0", "shard_0", "shard_1"}
    assert r["busiest"] in r["compute_by_actor"]
    assert min(r["submit_s"], r["wait_s"], r["update_s"]) > 0  # the driver's phases were timed
    train = {r["dp"]: r for r in rows if r["trainer"] == "train"}
    for dp, r in train.items():  # every worker computed; the reductions were timed, from dp = 2 on
        assert set(r["compute_by_actor"]) == {f"worker_{k}" for k in range(dp)} and r["actors"] == dp
        assert min(r["compute_by_actor"].values()) > 0 and r["busiest"] in r["compute_by_actor"]
        assert r["submit_s"] is None and r["wait_s"] is None and r["allreduce_s"] >= 0
    assert train[2]["allreduce_s"] > 0 and train[2]["micro_batches_per_replica"] == 1
    # the same data and initial weights everywhere: the first step's loss agrees
    assert report["first_loss_spread"] < 1e-4
    table = "\n".join(lines[:-1])
    assert "graph 1,1,2" in table and "train dp=2" in table and "xfer+wait" in table and "x local" in table
    assert "graph 1,1,2 direct" in table and "MB/step" in table and "one hop of" in table


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--dtype", "fp16"],
        ["--layouts", "1,1"],
        ["--micro-batches", "3"],
        ["--actor-env", "X"],
        ["--transports", "nccl"],
    ],  # fmt: skip
)
def test_bench_graph_rejects_bad_options_before_running(argv, capsys):
    assert cli.main(["bench", "graph", "--preset", "tiny", "--no-progress", *argv]) == 2
    assert "configuration error" in capsys.readouterr().err


def test_parse_layouts():
    assert parse_layouts("1,1,1 1,2,2;2,1,2") == ((1, 1, 1), (1, 2, 2), (2, 1, 2))
