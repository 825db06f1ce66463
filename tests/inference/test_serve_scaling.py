"""Serve's side of serving (slow): autoscaling 1 -> 2 -> 1 replicas under load; a replica with
``runner: graph`` holds no weights (its actors hold them) and serves the local runner's text; one
whose actor graph loses an actor ends its requests with an error and is replaced."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import pytest
import requests
import torch

from raymoe.pipelines.serve import RaymoeServer, ServeArgs

from .conftest import MODEL, serve_on_a_free_port
from .conftest import wait_for as _wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve_url(ray_local):  # noqa: ANN201
    with serve_on_a_free_port() as url:
        yield url


def _replicas(app: str) -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    status = serve.status().applications[app].deployments["RaymoeServer"]
    return status.replica_states.get(ReplicaState.RUNNING, 0)


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serve_url: str, served_checkpoint: Path):
    from ray import serve

    autoscaling = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "metrics_interval_s": 0.2,
        "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
    }  # fmt: skip
    app = RaymoeServer.options(autoscaling_config=autoscaling, ray_actor_options={"num_cpus": 0})
    serve.run(
        app.bind(ServeArgs(checkpoint=str(served_checkpoint), dtype="float32")), name="auto", route_prefix="/auto"
    )
    assert _replicas("auto") == 1
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    seen = [1]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(requests.post, f"{serve_url}/auto/v1/completions", json=body, timeout=300)
                   for _ in range(24)]  # fmt: skip
        while not all(f.done() for f in futures):
            seen.append(_replicas("auto"))
            time.sleep(0.2)
    print(f"load took {time.monotonic() - t0:.1f} s; replicas seen: {seen}")
    assert all(f.result().status_code == 200 for f in futures)
    assert max(seen) == 2, f"replicas seen under load: {sorted(set(seen))}"
    _wait_for(lambda: _replicas("auto") == 1, timeout=60, what="the extra replica to go")
    serve.delete("auto")


@pytest.fixture(scope="module")
def graph_url(serve_url: str, served_checkpoint: Path):  # noqa: ANN201
    """An app of one replica with ``runner: graph``: 2 stages and 2 expert shards of its own."""
    from ray import serve

    app = RaymoeServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=1,
                               health_check_timeout_s=10)  # fmt: skip
    args = ServeArgs(checkpoint=str(served_checkpoint), dtype="float32", runner="graph", parallel={"pp": 2, "ep": 2})
    serve.run(app.bind(args), name="graph", route_prefix="/graph")
    try:
        yield f"{serve_url}/graph"
    finally:
        serve.delete("graph")


BODY = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 300, "temperature": 0, "ignore_eos": True}


def _complete(url: str, max_tokens: int) -> dict:
    return requests.post(f"{url}/v1/completions", json={**BODY, "max_tokens": max_tokens}, timeout=60).json()


def test_a_graph_runner_replica_holds_no_weights_and_serves_the_local_text(
    graph_url: str, serve_url: str, served_checkpoint: Path
) -> None:
    """The actors load the checkpoint, each its own share, and together all of it, once."""
    from ray import serve

    from raymoe.platform.checkpoint.reader import load_model

    model = load_model(str(served_checkpoint), torch.float32)  # the replicas' dtype
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stats = requests.get(f"{graph_url}/stats", timeout=10).json()
    assert stats["runner"] == "graph" and stats["param_bytes"] == 0
    shares = stats["actor_param_bytes"]
    assert set(shares) == {"Stage(0)", "Stage(1)", "Shard(0)", "Shard(1)"} and min(shares.values()) > 0
    assert sum(shares.values()) == model_bytes
    assert set(stats["actor_pids"]) == set(shares) and stats["pid"] not in stats["actor_pids"].values()

    app = RaymoeServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0})
    serve.run(app.bind(ServeArgs(checkpoint=str(served_checkpoint), dtype="float32")), name="local",
              route_prefix="/local")  # fmt: skip
    try:
        local_url = f"{serve_url}/local"
        local = requests.get(f"{local_url}/stats", timeout=10).json()
        assert local["runner"] == "local" and local["param_bytes"] == model_bytes
        expected = _complete(local_url, 12)
    finally:
        serve.delete("local")
    got = _complete(graph_url, 12)
    assert got["usage"]["completion_tokens"] == 12 and got["choices"][0]["text"] == expected["choices"][0]["text"]


def test_a_replica_whose_actor_dies_errors_its_requests_and_is_replaced(graph_url: str) -> None:
    first = _complete(graph_url, 8)
    old_pid = requests.get(f"{graph_url}/stats", timeout=10).json()["pid"]
    stream = requests.post(f"{graph_url}/v1/completions", json={**BODY, "stream": True}, stream=True, timeout=60)
    lines = (line for line in stream.iter_lines(decode_unicode=True) if line)
    next(lines)  # generating
    victim = requests.get(f"{graph_url}/stats", timeout=10).json()["actor_pids"]["Shard(1)"]
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    rest = list(lines)
    assert time.monotonic() - start < 60
    assert rest[-1] == "data: [DONE]" and any("generation failed" in line and "Shard(1)" in line for line in rest)

    def replaced() -> bool:
        try:
            r = requests.get(f"{graph_url}/stats", timeout=5)
            return r.status_code == 200 and r.json()["pid"] != old_pid
        except requests.RequestException:
            return False

    _wait_for(replaced, timeout=90, what="Serve to replace the replica")
    again = _complete(graph_url, 8)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
