"""The actor graph on a Ray cluster of several nodes made on this machine (``ray.cluster_utils.Cluster``).

The head and two worker nodes have one CPU each and a resource of their own; graph actors reserve one
CPU each (``parallel.num_cpus_per_actor=1``), so a placement group of three bundles spans the three
nodes. A worker node removed mid-run (its raylet and everything on it gone) shrinks the graph to what
the rest holds; added back, the graph grows at a step boundary. Checkpoints and data sit on the tests'
S3 server, which every node reaches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raymoe.platform.config import load_config
from raymoe.platform.train.loop import SAMPLES_FILE, pretrain

from conftest import start_local_ray

pytestmark = pytest.mark.slow
NODE_CPUS = 1


@pytest.fixture(scope="module")
def cluster(s3_server):  # noqa: ANN001, ANN201  (s3_server first: the nodes inherit its variables)
    """A head and two worker nodes (1 CPU each); the session's local Ray comes back afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    restart = ray.is_initialized()
    if restart:
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "resources": {"head": 1}})
    c.workers = [c.add_node(num_cpus=NODE_CPUS, resources={f"worker{i}": 1}) for i in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if restart:
            start_local_ray()


@pytest.fixture(scope="module")
def data_uri(s3_server, tmp_path_factory) -> str:  # noqa: ANN001
    """The tiny corpus prepared once, on S3 (every node reads it there)."""
    from raymoe.platform.data.prepare import PrepareConfig, prepare_dataset

    uri = s3_server.uri(f"cluster-data-{tmp_path_factory.getbasetemp().name}")
    prepare_dataset(uri, PrepareConfig(vocab_size=512, seq_len=32, max_bytes=200_000, seed=0))
    return uri


def _cfg(tracking_db: Path, *extra: str):  # noqa: ANN202
    return load_config("tiny", [f"tracking.uri=sqlite:///{tracking_db}", "train.eval_every=0", "elastic.backoff_s=0.1",
                                "parallel.num_cpus_per_actor=1", "parallel.reserve_timeout_s=30", *extra])  # fmt: skip


def _nodes_of(trainer) -> dict[str, str]:  # noqa: ANN001
    return {label: node["node_id"] for label, node in trainer.graph.rt.nodes.items()}


def _lose_node(cluster, node, graph) -> None:  # noqa: ANN001
    """Remove ``node`` as a lost machine goes: its raylet and its graph actors' processes at once.

    ``Cluster.remove_node`` kills the raylet only; the node's workers notice a moment later and go on
    answering direct calls until then, so a fast step could still complete on a node that is gone."""
    import os
    import signal

    cluster.remove_node(node, allow_graceful=False)
    for label, info in graph.rt.nodes.items():
        if info["node_id"] == node.node_id:
            try:
                os.kill(graph.pids[label], signal.SIGKILL)
            except ProcessLookupError:  # it noticed first
                pass


def test_spread_and_pack_place_the_graph_by_nodes(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    import time

    import ray

    from raymoe.actors.driver import GraphTrainer
    from raymoe.actors.runtime import GraphError

    for placement in ("SPREAD", "PACK"):
        deadline = time.monotonic() + 30  # PACK is Ray's best effort: let the last group's CPUs come back first
        while ray.available_resources().get("CPU", 0) < 3 * NODE_CPUS and time.monotonic() < deadline:
            time.sleep(0.2)
        graph = GraphTrainer(_cfg(tmp_path / "m.db", "parallel.ep=2", f"parallel.placement={placement}",
                                  "parallel.num_cpus_per_actor=0.3"))  # fmt: skip
        try:
            nodes = {n["node_id"] for n in graph.rt.nodes.values()}
            assert len(graph.rt.nodes) == 3
            # SPREAD: one actor a node; PACK: all three on one node (0.9 of its 1 CPU)
            assert len(nodes) == (3 if placement == "SPREAD" else 1), (placement, graph.rt.nodes)
        finally:
            graph.shutdown()
    # auto: actors that reserve nothing are spread over the nodes (PACK would put them all on one)
    graph = GraphTrainer(_cfg(tmp_path / "m.db", "parallel.ep=2", "parallel.num_cpus_per_actor=0"))
    try:
        assert len({n["node_id"] for n in graph.rt.nodes.values()}) == 3, graph.rt.nodes
    finally:
        graph.shutdown()
    with pytest.raises(GraphError, match=r"cannot place 3 actors \(PACK\) within 3 s: each needs CPU 2"):
        GraphTrainer(_cfg(tmp_path / "m.db", "parallel.ep=2", "parallel.num_cpus_per_actor=2",
                          "parallel.reserve_timeout_s=3"))  # fmt: skip


def test_a_lost_node_shrinks_the_graph_and_a_new_one_grows_it(
    cluster, data_uri: str, s3_server, tmp_path: Path
) -> None:  # noqa: ANN001, E501
    """ep=2 on three 1-CPU nodes. After step 4 a worker node goes (its raylet killed): the graph comes back at
    ep=1 on the two nodes left, from the step-4 checkpoint on S3; after step 8 a new node joins and the
    graph grows back to ep=2. The losses equal an undisturbed run's, every sample is used once, and the
    lost node is named in the failure (log, MLflow)."""
    from mlflow.tracking import MlflowClient

    from raymoe.actors.elastic import ElasticGraph

    steps = ["train.steps=12", "train.checkpoint_every=2", "parallel.ep=2", "data.record_samples=true"]
    ref_cfg = _cfg(tmp_path / "m.db", *steps, f"train.checkpoint_uri={s3_server.uri('cluster-ref')}")
    ref_root = ref_cfg.train.checkpoint_uri
    reference = pretrain(ref_cfg, data_uri, tmp_path / "ref", progress=False,
                         trainer=lambda: ElasticGraph(ref_cfg, checkpoint_root=ref_root))  # fmt: skip
    cfg = _cfg(tmp_path / "m.db", *steps, f"train.checkpoint_uri={s3_server.uri('cluster-run')}")
    trainer = ElasticGraph(cfg, control_dir=tmp_path / "run", checkpoint_root=cfg.train.checkpoint_uri)
    layouts, lost = [], {}

    def chaos(m) -> None:  # noqa: ANN001
        layouts.append(trainer.layout.ep)
        if m.step == 4 and "node" not in lost:
            victim = next(w for w in cluster.workers if w.node_id in _nodes_of(trainer).values())
            lost["node"] = victim.node_id
            _lose_node(cluster, victim, trainer.graph)
        if m.step == 8 and "added" not in lost:
            lost["added"] = cluster.add_node(num_cpus=NODE_CPUS, resources={"worker9": 1})
            cluster.wait_for_nodes()

    try:
        result = pretrain(cfg, data_uri, tmp_path / "run", progress=False, trainer=trainer, on_step=chaos)
        events = trainer.events
    finally:
        trainer.close()
    failures = [e for e in events if e["kind"] == "failure"]
    assert failures and f"node {lost['node'][:12]}" in failures[0]["cause"], events  # the lost node, named
    assert 1 in layouts and layouts[-1] == 2, layouts  # shrank to one shard, grew back to two
    assert [e["kind"] for e in events][-1] == "resize"
    assert len(result.losses) == 12
    for got, want in zip(result.losses, reference.losses):
        assert abs(got - want) <= 1e-5 * want, (result.losses, reference.losses)
    record = [json.loads(line) for line in (tmp_path / "run" / SAMPLES_FILE).read_text().splitlines()]
    want_ids = [json.loads(line)["ids"] for line in (tmp_path / "ref" / SAMPLES_FILE).read_text().splitlines()]
    assert [r["ids"] for r in record] == want_ids  # every sample once, in the undisturbed order
    tags = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id).data.tags
    assert lost["node"][:12] in tags["elastic.last_failure"]
    from raymoe.platform.checkpoint.reader import load_model

    a, b = load_model(result.checkpoint).state_dict(), load_model(reference.checkpoint).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert torch.is_tensor(a["model.norm.weight"])


def test_one_run_survives_five_faults_of_four_kinds(cluster, data_uri: str, s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    """The driver runs as `python -m raymoe.pipelines.pretrain` joining the cluster (RAY_ADDRESS), pp=2 ep=2,
    half a CPU an actor, SPREAD over the nodes, 24 steps with a checkpoint every 4. Faults: a Shard SIGKILLed
    after step 3 (as the first checkpoint is written: the run starts over), a Stage frozen (SIGSTOP: hung, not
    dead) after step 9, a worker node removed after step 13 (every node holds an actor: SPREAD), another Stage
    SIGKILLed after step 17, and the driver SIGKILLed after step 21; then the run is resumed. The final
    parameters and biases equal an undisturbed run's (≤ 1e-6), every sample was used once, and each
    recovery's time (detection to the next completed step) is logged."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from raymoe.actors.elastic import ElasticGraph
    from raymoe.platform.checkpoint.layout import latest_checkpoint
    from raymoe.platform.checkpoint.reader import load_model

    args = ["train.steps=24", "train.checkpoint_every=4", "parallel.pp=2", "parallel.ep=2", "train.log_every=1",
            "parallel.num_cpus_per_actor=0.5", "parallel.placement=SPREAD", "parallel.timeout_s=5",
            "elastic.max_failures=5",
            "data.record_samples=true"]  # fmt: skip
    ref_cfg = _cfg(tmp_path / "m.db", *args, f"train.checkpoint_uri={s3_server.uri('chaos-ref')}")
    ref_root = ref_cfg.train.checkpoint_uri
    reference = pretrain(ref_cfg, data_uri, tmp_path / "ref", progress=False,
                         trainer=lambda: ElasticGraph(ref_cfg, checkpoint_root=ref_root))  # fmt: skip
    out, ckpts = tmp_path / "chaos", s3_server.uri("chaos-run")
    cmd = [sys.executable, "-m", "raymoe.pipelines.pretrain", "tiny", "--data", data_uri, "--output", str(out),
           "--no-progress", f"tracking.uri=sqlite:///{tmp_path}/m.db", "train.eval_every=0", "elastic.backoff_s=0.1",
           "parallel.reserve_timeout_s=30", f"train.checkpoint_uri={ckpts}", *args]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": cluster.address}

    def run(extra: list[str], faults: dict[int, str]) -> tuple[int, list[str]]:
        proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)  # fmt: skip
        pids: dict[str, int] = {}
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if m := re.search(r"actor pids (\{.*\})", line):
                    pids = eval(m.group(1))  # noqa: S307 - our own log line, a dict of str -> int
                m = re.search(r"INFO raymoe.platform.train.loop: step (\d+) loss", line)
                if not (m and int(m.group(1)) in faults):
                    continue
                kind, target = faults.pop(int(m.group(1))).split(":")
                if kind == "driver":
                    proc.kill()  # the driver alone: the cluster, and the checkpoints on S3, stay
                    break
                if kind == "node":
                    cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
                    continue
                pid = next(pid for name, pid in pids.items() if name.startswith(target))
                os.kill(pid, signal.SIGSTOP if kind == "hang" else signal.SIGKILL)
            return proc.wait(timeout=600), lines
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # a hang right before a checkpoint would wait parallel.long_timeout_s (checkpoints are long): not there
    faults = {3: "kill:Shard(1)", 9: "hang:Stage(replica 0, stage 0)", 13: "node:",
              17: "kill:Stage(replica 0, stage 1)", 21: "driver:"}  # fmt: skip
    code, lines = run([], faults)
    log = "".join(lines)
    assert code == -signal.SIGKILL and not faults, log[-3000:]
    failures = [line for line in lines if "actor graph failure" in line]
    assert len(failures) == 4, log[-4000:]
    assert "longer than parallel.timeout_s=5" in failures[1] and "lost node" in failures[2], failures
    recoveries = [float(s) for s in re.findall(r"recovered: step \d+ done ([\d.]+) s after", log)]
    assert len(recoveries) == 4, log[-4000:]
    print("recovery s (detection to the next completed step):", recoveries)
    cluster.add_node(num_cpus=NODE_CPUS, resources={"worker-chaos": 1})  # the lost node's capacity comes back
    cluster.wait_for_nodes()
    code, lines = run(["--resume"], {})
    assert code == 0, "".join(lines[-30:])
    a = load_model(latest_checkpoint(ckpts)).state_dict()
    b = load_model(reference.checkpoint).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # biases included
    record = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert [r["step"] for r in record] == list(range(24))
    want = [json.loads(line)["ids"] for line in (tmp_path / "ref" / SAMPLES_FILE).read_text().splitlines()]
    assert [r["ids"] for r in record] == want  # every sample once, in the undisturbed order


def test_a_serve_replica_whose_graph_loses_a_node_is_replaced(cluster, s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    """A Serve replica (pinned to the head) with ``runner: graph``, one stage and two shards SPREAD over the three
    nodes, serving a checkpoint on S3. A worker node is removed while a stream is generating: the stream ends
    with an error event and ``[DONE]``, Serve replaces the replica, whose new graph fits on the nodes left,
    and it serves the same text as before."""
    import time

    import requests
    from ray import serve

    from raymoe.actors.runtime import free_port
    from raymoe.pipelines.serve import RaymoeServer, ServeArgs
    from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint
    from raymoe.platform.model.transformer import DeepseekV3, prepare_for_inference

    from hf_reference import train_tokenizer

    model = DeepseekV3(load_config("tiny").model)
    model.init_weights(0)
    tokenizer = train_tokenizer(tmp_path / "tokenizer.json")
    ckpt = save_hf_checkpoint(prepare_for_inference(model, torch.float32), s3_server.uri("served-on-the-cluster"),
                              extra_files=[str(tokenizer)])  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/graph"
    body = {"model": "raymoe", "prompt": "def f(x):", "max_tokens": 300, "temperature": 0, "ignore_eos": True}

    def complete(n: int) -> dict:
        return requests.post(f"{url}/v1/completions", json={**body, "max_tokens": n}, timeout=60).json()

    def wait_for(predicate, what: str, timeout: float = 120) -> None:  # noqa: ANN001
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if predicate():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        app = RaymoeServer.options(num_replicas=1, health_check_period_s=1, health_check_timeout_s=10,
                                   ray_actor_options={"num_cpus": 0, "resources": {"head": 0.001}})  # fmt: skip
        args = ServeArgs(checkpoint=ckpt, dtype="float32", runner="graph",
                         parallel={"pp": 1, "ep": 2, "num_cpus_per_actor": 0.3, "placement": "SPREAD"})  # fmt: skip
        serve.run(app.bind(args), name="graph", route_prefix="/graph")
        first = complete(8)
        old_pid = requests.get(f"{url}/stats", timeout=10).json()["pid"]
        stream = requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60)
        lines = (line for line in stream.iter_lines(decode_unicode=True) if line)
        next(lines)  # generating
        cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)  # one of the graph's actors goes
        start = time.monotonic()
        rest = list(lines)
        assert time.monotonic() - start < 60
        assert rest[-1] == "data: [DONE]" and any("generation failed" in line for line in rest), rest[-3:]
        wait_for(lambda: requests.get(f"{url}/stats", timeout=5).json()["pid"] != old_pid, "Serve to replace it")
        again = complete(8)
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
    finally:
        serve.shutdown()
