"""The compiled decode runner against :class:`LocalRunner`: step logits, MTP logits, greedy engine tokens.

The math of :mod:`raymoe.platform.inference.compiled` (padding, the gathered experts, the flat
cache writes) is checked without inductor (``backend=None``: the same functions run eagerly), the
single-graph property with dynamo's tracing only (``backend="eager"``), and the inductor graph in a
slow test (its compile takes about a minute on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

from raymoe.platform.inference.batch import SeqRun, build_step
from raymoe.platform.inference.compiled import CompiledLocalRunner
from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams

from .conftest import tiny_model

BLOCK = 4
CACHE_TOKENS = 512
TOL = 1e-4  # float32 logits


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(n: int, lengths: tuple[int, ...] = (5, 17, 1, 30, 9, 2)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (k,), generator=g).tolist() for k in lengths[:n]]


STEP_PROMPTS = (5, 17, 30)  # each at least 3 tokens: a prefill and a 2-token run


def step_logits(runner, ids: list[list[int]]) -> list[torch.Tensor]:
    """Prefill each prompt but its last 2 tokens in one step, then a decode step of 1 token
    for some and 2 (a draft) for the others, then the MTP module over the decode step's rows."""
    tables = [[1 + 10 * i + j for j in range(10)] for i in range(len(ids))]
    runs = [SeqRun(p[:-2], 0, t) for p, t in zip(ids, tables)]
    batch = build_step(runs, BLOCK)
    prefill, hidden = runner.main(batch, batch.last_rows(), torch.arange(batch.num_rows))
    runs = [SeqRun(p[-2:] if i % 2 else p[-2:-1], len(p) - 2, t) for i, (p, t) in enumerate(zip(ids, tables))]
    batch = build_step(runs, BLOCK)
    rows = torch.arange(batch.num_rows)
    decode, hidden = runner.main(batch, rows, rows)
    nxt = [SeqRun([(t + 1) % 512 for t in r.tokens], r.start, r.blocks) for r in runs]
    draft = runner.mtp(build_step(nxt, BLOCK), hidden, build_step(nxt, BLOCK).last_rows())
    return [prefill, decode, hidden, draft]


def engine_tokens(runner, speculative: bool, n: int = 5) -> list[list[int]]:
    config = EngineConfig(cache_tokens=CACHE_TOKENS, block_size=BLOCK, speculative=speculative, max_batch_size=4)
    engine = Engine(runner, config)
    return run_to_completion(engine, prompts(n), [SamplingParams(max_tokens=10, temperature=0.0)] * n)


def local(model) -> LocalRunner:
    return LocalRunner(model, cache_blocks(CACHE_TOKENS, BLOCK), BLOCK)


def compiled(model, backend, **kw) -> CompiledLocalRunner:
    return CompiledLocalRunner(model, cache_blocks(CACHE_TOKENS, BLOCK), BLOCK, backend=backend, **kw)


@pytest.mark.parametrize("n", [1, 3])
def test_step_math_equals_local_runner(model, n: int) -> None:
    """Decode and draft-verify steps (1 and 3 sequences, padded) and the MTP step equal the eager runner's."""
    runner = compiled(model, None)
    got = step_logits(runner, prompts(n, STEP_PROMPTS))
    assert runner.compiled_steps == 2  # the decode and the MTP step; the prefill ran eagerly
    for g, r in zip(got, step_logits(local(model), prompts(n, STEP_PROMPTS))):
        torch.testing.assert_close(g, r, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_greedy_tokens_equal_local_runner(model, speculative: bool) -> None:
    runner = compiled(model, None)
    assert engine_tokens(runner, speculative) == engine_tokens(local(model), speculative)
    assert runner.compiled_steps > 10


def test_prefill_and_large_steps_run_eagerly(model) -> None:
    runner = compiled(model, None, max_rows=3)
    assert not runner.compiles(build_step([SeqRun([1, 2, 3], 0, [1])], BLOCK))  # a run longer than max_run
    assert not runner.compiles(build_step([SeqRun([1], 5, [1, 2]) for _ in range(4)], BLOCK))  # 4 > max_rows
    assert runner.compiles(build_step([SeqRun([1, 2], 5, [1, 2]), SeqRun([1], 9, [3, 4, 5])], BLOCK))


def test_one_graph_serves_every_step(model) -> None:
    """Dynamo traces the main step and the MTP step once each, whatever the batch, runs and context."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = compiled(model, "eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert engine_tokens(runner, speculative=True) == engine_tokens(local(model), speculative=True)
    assert engine_tokens(runner, speculative=False, n=2) == engine_tokens(local(model), speculative=False, n=2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_inductor_graph_equals_local_runner(model) -> None:
    """The inductor-compiled graph: step logits within 1e-4 and greedy tokens identical, with no recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = compiled(model, "inductor")
    assert runner.compile_seconds > 0
    for g, r in zip(step_logits(runner, prompts(3, STEP_PROMPTS)), step_logits(local(model), prompts(3, STEP_PROMPTS))):
        torch.testing.assert_close(g, r, rtol=TOL, atol=TOL)
    for speculative in (False, True):
        assert engine_tokens(runner, speculative) == engine_tokens(local(model), speculative)
    # another runner over another model reuses the graphs (the weights and cache are its inputs)
    other = tiny_model(seed=1)
    got = step_logits(compiled(other, "inductor"), prompts(3, STEP_PROMPTS))
    for g, r in zip(got, step_logits(local(other), prompts(3, STEP_PROMPTS))):
        torch.testing.assert_close(g, r, rtol=TOL, atol=TOL)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
