"""Serve's side of serving (slow): autoscaling 1 -> 2 -> 1 replicas under load, and a replica whose
actor graph loses an actor ends its requests with an error and is replaced."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from raymoe.pipelines.serve import RaymoeServer, ServeArgs

from .test_serve import MODEL, _free_port, _wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve_url(ray_local):  # noqa: ANN201
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


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


def test_a_replica_whose_actor_dies_errors_its_requests_and_is_replaced(serve_url: str, served_checkpoint: Path):
    from ray import serve

    app = RaymoeServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=1,
                               health_check_timeout_s=10)  # fmt: skip
    args = ServeArgs(checkpoint=str(served_checkpoint), dtype="float32", engine="graph", parallel={"pp": 1, "ep": 2})
    serve.run(app.bind(args), name="graph", route_prefix="/graph")
    url = f"{serve_url}/graph"
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    first = requests.post(f"{url}/v1/completions", json={**body, "max_tokens": 8}, timeout=60).json()
    old_pid = requests.get(f"{url}/stats", timeout=10).json()["pid"]
    stream = requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60)
    lines = (line for line in stream.iter_lines(decode_unicode=True) if line)
    next(lines)  # generating
    victim = requests.get(f"{url}/stats", timeout=10).json()["actor_pids"]["InferenceShard(1)"]
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    rest = list(lines)
    assert time.monotonic() - start < 60
    assert rest[-1] == "data: [DONE]" and any("generation failed" in line and "InferenceShard" in line for line in rest)

    def replaced() -> bool:
        try:
            r = requests.get(f"{url}/stats", timeout=5)
            return r.status_code == 200 and r.json()["pid"] != old_pid
        except requests.RequestException:
            return False

    _wait_for(replaced, timeout=90, what="Serve to replace the replica")
    again = requests.post(f"{url}/v1/completions", json={**body, "max_tokens": 8}, timeout=60).json()
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    serve.delete("graph")
