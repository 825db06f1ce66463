"""Serving on the actor graph: token-identical to one process; a dead actor ends its requests with an error."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray
import torch

from raymoe.actors.inference import GraphRunner
from raymoe.actors.stage import GraphError
from raymoe.platform.inference.engine import Engine, EngineConfig, Output, run_to_completion
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams

from .conftest import tiny_model


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 40)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize(("pp", "ep", "in_process"), [(1, 1, True), (2, 3, True), (2, 3, False), (1, 2, False)])
def test_graph_greedy_equals_one_process(ray_local, model, pp: int, ep: int, in_process: bool, speculative: bool):
    params = [SamplingParams(max_tokens=16, temperature=0)] * 4
    config = EngineConfig(prefill_chunk=7, max_batch_size=3, speculative=speculative)
    ref = run_to_completion(Engine(LocalRunner(model, cache_blocks(1024, 16), 16), config), _prompts(), params)
    runner = GraphRunner(model, cache_blocks(1024, 16), 16, pp=pp, ep=ep, in_process=in_process)
    try:
        engine = Engine(runner, config)
        assert run_to_completion(engine, _prompts(), params) == ref
        assert engine.stats()["cache_blocks_used"] == 0
        assert (engine.stats()["draft_proposed"] > 0) == speculative
    finally:
        runner.close()


def test_a_dead_shard_ends_the_requests_with_an_error(ray_local, model) -> None:
    runner = GraphRunner(model, cache_blocks(512, 16), 16, pp=1, ep=2, timeout_s=20)
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
        with pytest.raises(GraphError, match=r"InferenceShard\(1\)"):
            for _ in range(50):
                engine.step()
        engine.fail_all("the graph failed")  # what the engine thread does with the error
        assert done.wait(5) and outs[-1].finish_reason == "error"
        assert engine.stats()["cache_blocks_used"] == 0
    finally:
        runner.close()
