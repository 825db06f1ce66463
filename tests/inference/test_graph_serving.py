"""Serving on the actor graph: token-identical to one process; each actor loads its own share of the checkpoint;
a dead actor ends its requests with an error naming it."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray
import torch

from raymoe.actors.graph import GraphRunner
from raymoe.actors.runtime import GraphError
from raymoe.platform.checkpoint.reader import load_model
from raymoe.platform.inference.engine import Engine, EngineConfig, Output, run_to_completion
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 40)]


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> str:  # noqa: ANN001
    """A training checkpoint of the tiny model (the graph's layout at pp=2, ep=3, written in process)."""
    from raymoe.actors.driver import GraphTrainer
    from raymoe.platform.config import config_to_dict, load_config

    cfg = load_config("tiny", ["parallel.pp=2", "parallel.ep=3", "tracking.enabled=false"])
    trainer = GraphTrainer(cfg, in_process=True)
    return trainer.save_checkpoint(str(tmp_path_factory.mktemp("graph-ckpt")), {"config": config_to_dict(cfg)})


def _runner(location: str, pp: int, ep: int, in_process: bool, **kw) -> GraphRunner:
    reader_cfg = load_model(location).cfg
    return GraphRunner(location, reader_cfg, cache_blocks(1024, 16), 16, pp=pp, ep=ep, dtype=torch.float32,
                       in_process=in_process, **kw)  # fmt: skip


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize(("pp", "ep", "in_process"), [(1, 1, True), (2, 3, True), (2, 3, False), (1, 2, False)])
def test_graph_greedy_equals_one_process(ray_local, served_checkpoint, pp: int, ep: int, in_process: bool,  # noqa: ANN001
                                         speculative: bool) -> None:  # fmt: skip
    params = [SamplingParams(max_tokens=16, temperature=0)] * 4
    config = EngineConfig(prefill_chunk=7, max_batch_size=3, speculative=speculative)
    model = load_model(str(served_checkpoint))
    ref = run_to_completion(Engine(LocalRunner(model, cache_blocks(1024, 16), 16), config), _prompts(), params)
    runner = _runner(str(served_checkpoint), pp, ep, in_process)
    try:
        engine = Engine(runner, config)
        assert run_to_completion(engine, _prompts(), params) == ref
        assert engine.stats()["cache_blocks_used"] == 0
        assert (engine.stats()["draft_proposed"] > 0) == speculative
    finally:
        runner.close()


def test_actors_hold_their_share_and_the_runner_none(ray_local, training_checkpoint: str) -> None:
    """A training checkpoint written at (pp=2, ep=3) served at (pp=1, ep=2): each actor read its own tensors."""
    model = load_model(training_checkpoint)
    params = [SamplingParams(max_tokens=12, temperature=0)] * 4
    ref = run_to_completion(Engine(LocalRunner(model, cache_blocks(1024, 16), 16), EngineConfig()), _prompts(), params)
    runner = _runner(training_checkpoint, 1, 2, in_process=False)
    try:
        assert run_to_completion(Engine(runner, EngineConfig()), _prompts(), params) == ref
        stats = runner.stats()
        assert stats["param_bytes"] == 0  # the runner (a Serve replica's) holds no weights
        shares = stats["actor_param_bytes"]
        assert set(shares) == {"Stage(0)", "Shard(0)", "Shard(1)"}
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        assert sum(shares.values()) == total
        experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
        assert shares["Shard(0)"] + shares["Shard(1)"] == experts and shares["Shard(0)"] == shares["Shard(1)"]
    finally:
        runner.close()


def test_a_dead_shard_ends_the_requests_with_an_error(ray_local, served_checkpoint) -> None:  # noqa: ANN001
    runner = _runner(str(served_checkpoint), 1, 2, in_process=False, timeout_s=20)
    engine = Engine(runner, EngineConfig())
    outs: list[Output] = []
    done = threading.Event()

    def collect(out: Output) -> None:
        outs.append(out)
        if out.finished:
            done.set()

    try:
        engine.submit([1, 2, 3], SamplingParams(max_tokens=400, temperature=0), collect)
        engine.step()
        pid = ray.get(runner.shards[1].ready.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(GraphError, match=r"Shard\(1\)"):
            for _ in range(50):
                engine.step()
        engine.fail_all("the graph failed")  # what the engine thread does with the error
        assert done.wait(5) and outs[-1].finish_reason == "error"
        assert engine.stats()["cache_blocks_used"] == 0
    finally:
        runner.close()
