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
            cluster.remove_node(victim, allow_graceful=False)
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
