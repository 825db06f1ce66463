"""One request cannot break the engine: a failure in its own part of a step (non-finite logits, its
sampling) ends it alone while the engine and its other requests go on; a temperature below the
greedy threshold is greedy (1e-40 once killed the engine); seeds outside the generator's range are
refused; log-probabilities are the model's."""

from __future__ import annotations

import threading

import pytest
import torch

from raymoe.platform.inference import engine as engine_module
from raymoe.platform.inference.engine import Engine, EngineConfig, Output, RequestError, run_to_completion
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import (
    MIN_SAMPLING_TEMPERATURE,
    SEED_MAX,
    SEED_MIN,
    SamplingParams,
    choice_seed,
    make_generator,
    probabilities,
)

from .conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_engine(model, runner_cls=LocalRunner, **kw) -> Engine:  # noqa: ANN001
    return Engine(runner_cls(model, cache_blocks(2048, 16), 16), EngineConfig(cache_tokens=2048, **kw))


def by_request(outs: list[Output]) -> dict[str, list[Output]]:
    grouped: dict[str, list[Output]] = {}
    for o in outs:
        grouped.setdefault(o.request_id, []).append(o)
    return grouped


class _PoisonLastRow(LocalRunner):
    """Sets the last logit row of one chosen call to NaN (the last running sequence's logits)."""

    poison_call = -1
    calls = 0

    def main(self, *args, **kwargs):
        logits, hidden = super().main(*args, **kwargs)
        self.calls += 1
        if self.calls == self.poison_call:
            logits = logits.clone()
            logits[-1] = float("nan")
        return logits, hidden


def test_non_finite_logits_end_that_request_alone(model) -> None:
    engine = make_engine(model, _PoisonLastRow)
    outs: list[Output] = []
    steady = engine.submit([1, 2, 3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), outs.append)
    for _ in range(3):
        engine.step()
    victim = engine.submit([4, 5], SamplingParams(max_tokens=20, temperature=0.7, ignore_eos=True), outs.append)
    engine.runner.poison_call = engine.runner.calls + 1  # the next step: the victim runs last
    while engine.step():
        pass
    got = by_request(outs)
    assert got[victim][-1].finish_reason == "error" and "not finite" in got[victim][-1].error
    assert got[steady][-1].finish_reason == "length" and got[steady][-1].completion_tokens == 20
    alone = run_to_completion(make_engine(model), [[1, 2, 3]], [SamplingParams(max_tokens=20, temperature=0)])[0]
    assert sum((o.token_ids for o in got[steady]), []) == alone  # untouched by its neighbour's failure
    assert engine.dead is None and engine.stats()["request_errors"] == 1
    assert engine.stats()["cache_blocks_used"] == 0  # the failed request's blocks are freed


def test_a_requests_own_failure_leaves_the_engine_thread_serving(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root of issue 15's outage: an exception in one request's sampling ended the engine's loop."""
    real_choose = engine_module.choose

    def choose(logits, params, gen):  # noqa: ANN001, ANN202
        if params.seed == 666:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_choose(logits, params, gen)

    monkeypatch.setattr(engine_module, "choose", choose)
    engine = make_engine(model)
    outs: list[Output] = []
    done = threading.Event()
    lock = threading.Lock()

    def collect(out: Output) -> None:
        with lock:
            outs.append(out)
            if sum(o.finished for o in outs) == 3:
                done.set()

    engine.start()
    try:
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), collect)
        bad = engine.submit([7, 8], SamplingParams(max_tokens=5, temperature=1.0, seed=666), collect)
        assert engine.submit([9], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), collect)
        assert done.wait(60), "requests hung"
        got = by_request(outs)
        assert got[bad][-1].finish_reason == "error" and "inf" in got[bad][-1].error
        assert got[stream][-1].finish_reason == "length" and got[stream][-1].completion_tokens == 60
        assert engine.dead is None
        after: list[Output] = []
        finished = threading.Event()
        engine.submit(
            [5], SamplingParams(max_tokens=3, temperature=0), lambda o: (after.append(o), o.finished and finished.set())
        )
        assert finished.wait(30) and after[-1].finish_reason in ("length", "stop")
    finally:
        engine.shutdown()


def test_a_tiny_temperature_is_greedy(model) -> None:
    prompt = [3, 1, 4, 1, 5]
    greedy = run_to_completion(make_engine(model), [prompt], [SamplingParams(max_tokens=10, temperature=0)])[0]
    for t in (1e-40, MIN_SAMPLING_TEMPERATURE / 2):
        params = SamplingParams(max_tokens=10, temperature=t, seed=1)
        assert params.greedy
        assert run_to_completion(make_engine(model), [prompt], [params])[0] == greedy
    assert not SamplingParams(temperature=MIN_SAMPLING_TEMPERATURE).greedy


def test_seeds_outside_the_generators_range_are_refused(model) -> None:
    engine = make_engine(model)
    for seed in (SEED_MIN, SEED_MAX, 0):
        engine.check_request([1], SamplingParams(seed=seed))
        make_generator(seed)
    for seed in (SEED_MAX + 1, SEED_MIN - 1, 2**70):
        with pytest.raises(RequestError, match="seed") as err:
            engine.check_request([1], SamplingParams(seed=seed))
        assert err.value.field == "seed"
    assert choice_seed(SEED_MAX, 1) == SEED_MIN and choice_seed(5, 2) == 7 and choice_seed(None, 3) is None


def test_logprobs_are_the_models_log_softmax(model) -> None:
    prompt = [2, 7, 1, 8]
    engine = make_engine(model, speculative=True)
    outs: list[Output] = []
    engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True), outs.append)
    while engine.step():
        pass
    tokens = sum((o.token_ids for o in outs), [])
    entries = sum((o.logprobs for o in outs), [])
    assert len(entries) == len(tokens) == 6 and [e.token_id for e in entries] == tokens
    with torch.no_grad():
        ref = model(torch.tensor([prompt + tokens]))[0].float().log_softmax(-1)  # [S, V]
    for i, e in enumerate(entries):
        row = ref[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        assert [t for t, _ in e.top] == row.topk(3).indices.tolist()
        assert e.top[0][0] == e.token_id  # greedy: the chosen token is the most likely
    plain: list[Output] = []
    engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0), plain.append)
    while engine.step():
        pass
    assert all(o.logprobs is None for o in plain)


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-12])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p: float) -> None:
    """The fuzzer's find: top_p=5e-324 is 0 in float32, and the nucleus lost every token (NaN, a 500)."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.equal(p, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    hot = probabilities(logits * 1e4, SamplingParams(temperature=MIN_SAMPLING_TEMPERATURE, top_p=0.5))
    assert torch.isfinite(hot).all() and int(hot.argmax()) == 1
