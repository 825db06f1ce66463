"""The actor graph against the single-process trainer: same losses, parameters, biases and loads.

Every test here runs real Ray actors (the session's local Ray, 2 CPUs; actors take no CPU
reservation) except where it says ``in_process``: the same schedule on plain objects.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.actors.driver import GraphTrainer
from raymoe.actors.runtime import GraphError
from raymoe.platform.checkpoint.layout import latest_checkpoint
from raymoe.platform.config import load_config
from raymoe.platform.train.loop import micro_batches
from raymoe.platform.train.trainer import LocalTrainer

STEPS = 5
BATCH = 8
RTOL = 1e-5


def _cfg(dp: int = 1, pp: int = 1, ep: int = 1, mb: int = 2, *extra: str):
    # the local twin gets the same global micro-batches: dp × micro-batches per replica
    return load_config(
        "tiny",
        [f"parallel.dp={dp}", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.micro_batches={mb}",
         f"train.batch_size={BATCH}", f"train.steps={STEPS * 2}", "train.warmup_steps=1", *extra],
    )  # fmt: skip


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 512, (BATCH, 33), generator=gen)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


def _close(a: float, b: float, rtol: float = RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def _assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        err = (got[name].float() - t.float()).abs().max().item()
        assert err <= tol * max(t.abs().max().item(), 1.0), f"{name}: max difference {err:.3g}"


LAYOUTS = [(1, 1, 1), (1, 1, 3), (2, 2, 3), (2, 1, 2)]  # (dp, pp, ep)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "dp{}-pp{}-ep{}".format(*t))
def test_graph_equals_the_local_trainer(ray_local, layout: tuple[int, int, int]) -> None:
    """Float32, on Ray actors (other processes; at (1,1,1) the one colocated stage): the local trainer's steps."""
    dp, pp, ep = layout
    cfg = _cfg(dp, pp, ep)
    local = LocalTrainer(_cfg(mb=2 * dp))
    graph = GraphTrainer(cfg)
    try:
        for input_ids, labels in _batches(STEPS):
            mbs = micro_batches(input_ids, labels, 2 * dp)
            want, got = local.train_step(mbs), graph.train_step(mbs)
            assert _close(got.loss, want.loss) and _close(got.main_loss, want.main_loss), (got.loss, want.loss)
            assert _close(got.mtp_loss, want.mtp_loss) and _close(got.grad_norm, want.grad_norm, 1e-4)
            assert torch.equal(got.loads, want.loads)  # routing is identical, so are the counts
        assert local.model.cfg.num_nextn_predict_layers == 1 and local.model.cfg.topk_group < local.model.cfg.n_group
        _assert_states_close(graph.full_state_dict(), local.model.state_dict())
        want_bias = torch.stack([g.e_score_correction_bias for g in local.gates])
        assert torch.allclose(graph.biases, want_bias, atol=1e-7) and want_bias.abs().max() > 0
        assert graph.colocated == (layout == (1, 1, 1))
    finally:
        graph.shutdown()


def test_compiled_graph_equals_the_local_trainer(ray_local) -> None:
    """``train.compile`` on the graph (1,1,2): the attention stage runs its blocks' compiled regions, and
    the steps are the eager local trainer's (float32: to reduction order)."""
    import ray

    local = LocalTrainer(_cfg(mb=2))
    graph = GraphTrainer(_cfg(1, 1, 2, 2, "train.compile=true"))
    try:
        info = ray.get(graph.stages[0][0].ready.remote())
        assert info["compiled_layers"] == info["layers"] and info["layers"]
        for input_ids, labels in _batches(3):
            mbs = micro_batches(input_ids, labels, 2)
            want, got = local.train_step(mbs), graph.train_step(mbs)
            assert _close(got.loss, want.loss) and _close(got.mtp_loss, want.mtp_loss), (got.loss, want.loss)
            assert _close(got.grad_norm, want.grad_norm, 1e-4) and torch.equal(got.loads, want.loads)
        _assert_states_close(graph.full_state_dict(), local.model.state_dict())
    finally:
        graph.shutdown()


def test_direct_transport_equals_the_object_store(ray_local) -> None:
    """parallel.transport=direct (Ray Direct Transport over gloo; the replicas' all-reduce in a subgroup of its
    world) at (2,2,3): the same losses, gradient norms, loads and parameters as the object store, bit for bit;
    a dead shard is then the same clear error."""
    graphs = {t: GraphTrainer(_cfg(2, 2, 3, 2, f"parallel.transport={t}")) for t in ("object_store", "direct")}
    try:
        assert graphs["direct"].rt.collective is not None and graphs["object_store"].rt.collective is None
        for input_ids, labels in _batches(3):
            mbs = micro_batches(input_ids, labels, 4)
            want, got = graphs["object_store"].train_step(mbs), graphs["direct"].train_step(mbs)
            assert (got.loss, got.mtp_loss, got.grad_norm) == (want.loss, want.mtp_loss, want.grad_norm)
            assert torch.equal(got.loads, want.loads)
            assert got.extra["graph/moved_mb"] == want.extra["graph/moved_mb"] > 0  # the same tensors moved
        a, b = graphs["direct"].full_state_dict(), graphs["object_store"].full_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
        import ray

        ray.kill(graphs["direct"].shards[1])
        with pytest.raises(GraphError, match=r"Shard\(1\) died"):
            graphs["direct"].train_step(micro_batches(*_batches(1)[0], 4))
    finally:
        for g in graphs.values():
            g.shutdown()


BF16_LOSS_RTOL = 2e-3  # measured: at most 4.5e-4 over 4 steps at (2,2,3)
BF16_LOAD_CHANGE = 0.03  # of the tokens routed; measured: at most 1.0 % (a changed choice counts twice)


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 3)], ids=lambda t: "dp{}-pp{}-ep{}".format(*t))
def test_bf16_graph_tracks_the_local_trainer(ray_local, layout: tuple[int, int, int]) -> None:
    """Mixed precision on the graph: bf16 rows cross to the shards, which compute in bf16 under autocast.

    The per-shard sums are added in another order than one process's, so a routing decision near a tie
    can flip in a later step; losses stay within BF16_LOSS_RTOL and the loads within BF16_LOAD_CHANGE."""
    dp, pp, ep = layout
    local = LocalTrainer(_cfg(1, 1, 1, 2 * dp, "train.dtype=bf16"))
    graph = GraphTrainer(_cfg(dp, pp, ep, 2, "train.dtype=bf16"))
    fp32 = LocalTrainer(_cfg(mb=2 * dp))
    try:
        for input_ids, labels in _batches(4):
            mbs = micro_batches(input_ids, labels, 2 * dp)
            want, got, exact = local.train_step(mbs), graph.train_step(mbs), fp32.train_step(mbs)
            assert _close(got.loss, want.loss, BF16_LOSS_RTOL), (got.loss, want.loss)
            assert (got.loads - want.loads).abs().sum() <= BF16_LOAD_CHANGE * want.loads.sum()
            assert got.loss != exact.loss  # bf16 really ran on the graph, not float32
        if layout == (1, 1, 1):  # one colocated stage: the same code in one process and in an actor
            _assert_states_close(graph.full_state_dict(), local.model.state_dict(), tol=0)
    finally:
        graph.shutdown()


def test_bias_update_counts_every_replica_and_micro_batch(ray_local) -> None:
    """Replica 1 gets deliberately skewed data (one token repeated); the biases must see its loads too."""
    cfg = _cfg(2, 1, 2, 1)
    ((x, y),) = _batches(1)
    x[BATCH // 2 :], y[BATCH // 2 :] = 7, 7  # the second replica's micro-batch routes every token alike
    mbs = micro_batches(x, y, 2)
    local = LocalTrainer(_cfg(mb=2))
    graph = GraphTrainer(cfg)
    try:
        got, want = graph.train_step(mbs), local.train_step(mbs)
        only_first = LocalTrainer(_cfg(mb=1)).train_step(mbs[:1]).loads
        assert torch.equal(got.loads, want.loads)
        assert not torch.equal(got.loads, 2 * only_first)  # the skewed replica changed the totals
        assert got.loads.sum(dim=1).eq(BATCH * 32 * cfg.model.num_experts_per_tok).all()
        want_bias = torch.stack([g.e_score_correction_bias for g in local.gates])
        assert torch.equal(graph.biases, want_bias)
    finally:
        graph.shutdown()


def test_resharded_checkpoint_continues_the_same_run(ray_local, tmp_path: Path) -> None:
    """Saved at ep=4, loaded at ep=3 and into the local trainer: the next steps' losses equal the unbroken run's."""
    data = _batches(6, seed=1)
    straight = GraphTrainer(_cfg(1, 1, 4))
    try:
        losses = [straight.train_step(micro_batches(x, y, 2)).loss for x, y in data]
    finally:
        straight.shutdown()
    first = GraphTrainer(_cfg(1, 1, 4))
    try:
        for x, y in data[:3]:
            first.train_step(micro_batches(x, y, 2))
        ckpt = first.save_checkpoint(str(tmp_path), {"note": "resharding"})
    finally:
        first.shutdown()
    assert latest_checkpoint(str(tmp_path)) == ckpt
    for engine in ("graph ep=3, pp=2", "local"):
        if engine == "local":
            trainer = LocalTrainer(_cfg())
        else:
            trainer = GraphTrainer(_cfg(1, 2, 3))
        try:
            state = trainer.load_checkpoint(ckpt)
            assert state["note"] == "resharding" and trainer.step == 3
            again = [trainer.train_step(micro_batches(x, y, 2)).loss for x, y in data[3:]]
        finally:
            trainer.close()
        for got, want in zip(again, losses[3:]):
            assert _close(got, want), (engine, again, losses[3:])


def test_checkpoint_to_a_uri_is_complete_or_invisible(ray_local, tmp_path: Path) -> None:
    root = f"file://{tmp_path}/run"
    graph = GraphTrainer(_cfg(1, 2, 2))
    try:
        graph.train_step(micro_batches(*_batches(1)[0], 2))
        ckpt = graph.save_checkpoint(root, {})
        # a checkpoint that was being written when the process died: a temporary folder, never picked
        (tmp_path / "run" / "checkpoints" / ".tmp-step_00000002-deadbeef").mkdir()
        (tmp_path / "run" / "checkpoints" / "step_00000003").mkdir()  # no trainer_state.json: incomplete
        assert latest_checkpoint(root) == ckpt and ckpt.endswith("step_00000001")
        files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000001").iterdir())
        assert files == ["config.json", "experts-00.safetensors", "experts-01.safetensors", "shards.json",
                         "stage-00.safetensors", "stage-01.safetensors", "trainer_state.json"]  # fmt: skip
        want = graph.full_state_dict()
    finally:
        graph.shutdown()
    other = GraphTrainer(_cfg(2, 1, 3))
    try:
        other.load_checkpoint(ckpt)
        _assert_states_close(other.full_state_dict(), want, tol=0)
    finally:
        other.shutdown()


def test_a_dead_actor_is_a_clear_error(ray_local) -> None:
    import ray

    graph = GraphTrainer(_cfg(1, 1, 2))
    try:
        graph.train_step(micro_batches(*_batches(1)[0], 2))
        ray.kill(graph.shards[1])
        with pytest.raises(GraphError, match=r"Shard\(1\) died"):
            graph.train_step(micro_batches(*_batches(1)[0], 2))
    finally:
        graph.shutdown()


def test_a_step_over_the_timeout_is_an_error(ray_local) -> None:
    graph = GraphTrainer(_cfg(1, 1, 2, 2, "parallel.timeout_s=30"))
    try:
        graph.rt.timeout_s = 1e-3  # no step finishes in a millisecond
        with pytest.raises(GraphError, match=r"longer than parallel.timeout_s"):
            graph.train_step(micro_batches(*_batches(1)[0], 2))
    finally:
        graph.shutdown()


def test_in_process_schedule_equals_ray(ray_local) -> None:
    """The schedule run on plain objects (no Ray) gives the same step as on actors: a debugging aid that is exact."""
    mbs = micro_batches(*_batches(1)[0], 2)
    a = GraphTrainer(_cfg(1, 2, 2), in_process=True).train_step(mbs)
    graph = GraphTrainer(_cfg(1, 2, 2))
    try:
        b = graph.train_step(mbs)
    finally:
        graph.shutdown()
    assert a.loss == b.loss and torch.equal(a.loads, b.loads)


def test_a_shard_without_tokens_still_takes_part(ray_local) -> None:
    """Biases steer every token away from shard 1: it gets empty buffers, steps with zero gradients, stays equal."""
    local, graph = LocalTrainer(_cfg(mb=2)), GraphTrainer(_cfg(1, 1, 2))
    try:
        with torch.no_grad():
            for gate in local.gates:
                gate.e_score_correction_bias[4:] = -10.0  # experts 4..7 live on shard 1
        graph.biases[:, 4:] = -10.0
        for s in range(graph.pp):
            graph._get([graph.rt.call(graph.stages[0][s], "set_biases", graph._biases_for(s))[0]], "test")
        mbs = micro_batches(*_batches(1)[0], 2)
        got, want = graph.train_step(mbs), local.train_step(mbs)
        assert got.extra["tokens/shard_1"] == 0 and got.extra["tokens/shard_0"] > 0
        assert _close(got.loss, want.loss) and torch.equal(got.loads, want.loads)
        _assert_states_close(graph.full_state_dict(), local.model.state_dict())  # shard 1's experts decayed alike
    finally:
        graph.shutdown()


def test_a_local_trainer_checkpoint_loads_into_the_graph(tmp_path: Path) -> None:
    """The other direction: the local trainer's one-part checkpoint, re-sharded over pp=2, ep=3."""
    data = _batches(6, seed=1)
    straight = LocalTrainer(_cfg())
    straight_steps = [straight.train_step(micro_batches(x, y, 2)) for x, y in data]
    losses = [m.loss for m in straight_steps]
    first = LocalTrainer(_cfg())
    for x, y in data[:3]:
        first.train_step(micro_batches(x, y, 2))
    ckpt = first.save_checkpoint(str(tmp_path), {"loader": {}}, [])
    graph = GraphTrainer(_cfg(1, 2, 3), in_process=True)  # the same schedule and loading code, without Ray
    graph.load_checkpoint(str(ckpt))
    again_steps = [graph.train_step(micro_batches(x, y, 2)) for x, y in data[3:]]
    again = [m.loss for m in again_steps]
    assert all(_close(a, b) for a, b in zip(again, losses[3:])), (again, losses[3:])
    # each step's metrics carry the biases after its update (the over-time plot), a copy on the graph
    assert torch.equal(straight_steps[-1].biases, straight.biases())
    assert torch.equal(again_steps[-1].biases, graph.biases) and again_steps[-1].biases is not graph.biases


def test_balanced_expert_placement_trains_as_one_process(tmp_path: Path) -> None:
    """parallel.expert_placement=balanced from a loads file (in process): experts no longer in contiguous
    blocks, the same steps as the local trainer, and a checkpoint that the contiguous layout reads."""
    from raymoe.actors.placement import build_placement, imbalance, shard_loads
    from raymoe.platform.analysis.loads import ExpertLoads

    loads = torch.ones(3, 8, dtype=torch.float64)
    loads[:, :3] = 40.0  # experts 0-2 of every layer hot: contiguous blocks put them all on shard 0
    ExpertLoads([1, 2, 3], loads, 1000, "calibration").save(str(tmp_path / "loads.json"))
    cfg = _cfg(1, 2, 3, 2, "parallel.expert_placement=balanced", f"parallel.expert_loads={tmp_path / 'loads.json'}")
    graph = GraphTrainer(cfg, in_process=True)
    local = LocalTrainer(_cfg(mb=2))
    contiguous = build_placement(cfg.model, cfg.parallel)
    assert graph.placement.expert_shards != contiguous.expert_shards
    assert all(len({graph.placement.shard_of(layer, e) for e in range(3)}) == 3 for layer in (1, 2, 3))
    assert imbalance(shard_loads(graph.placement, loads)) < imbalance(shard_loads(contiguous, loads))
    for input_ids, labels in _batches(3):
        mbs = micro_batches(input_ids, labels, 2)
        want, got = local.train_step(mbs), graph.train_step(mbs)
        assert _close(got.loss, want.loss) and torch.equal(got.loads, want.loads)
    _assert_states_close(graph.full_state_dict(), local.model.state_dict())
    ckpt = graph.save_checkpoint(str(tmp_path / "run"), {})
    again = GraphTrainer(_cfg(1, 1, 2), in_process=True)
    again.load_checkpoint(ckpt)
    _assert_states_close(again.full_state_dict(), local.model.state_dict())
