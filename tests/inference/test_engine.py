"""The serving engine in one process: equivalence with the model's own forward, continuous
batching, chunked prefill, MTP speculative decoding, sampling, limits and failures."""

from __future__ import annotations

import threading

import pytest
import torch

from raymoe.platform.inference.batch import SeqRun, build_step
from raymoe.platform.inference.engine import (
    Engine,
    EngineConfig,
    EngineDead,
    EngineOverloaded,
    Output,
    RequestError,
    run_to_completion,
)
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams, accept_draft, probabilities

from .conftest import tiny_model
from conftest import greedy_by_recompute

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_engine(model, cache_tokens: int = 2048, **kw) -> Engine:
    block = kw.pop("block_size", 16)
    runner = LocalRunner(model, cache_blocks(cache_tokens, block), block)
    return Engine(runner, EngineConfig(cache_tokens=cache_tokens, block_size=block, **kw))


def prompts(n: int, seed: int = 1, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 1, 40, 9, 23, 2, 31][:n]
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def test_step_logits_equal_the_models_forward(model) -> None:
    """The absorbed path over the block cache, prompt split over steps, equals the model's naive forward."""
    ids = prompts(4)[3]  # 40 tokens
    ref = model(torch.tensor([ids]))[0]  # [S, V]
    runner = LocalRunner(model, cache_blocks(256, 4), 4)
    blocks = [7, 3, 9, 1, 12, 5, 2, 8, 4, 6]  # any blocks, out of order
    got = []
    for start, end in ((0, 13), (13, 14), (14, 40)):  # a chunk, one token, the rest
        batch = build_step([SeqRun(ids[start:end], start, blocks)], 4)
        logits, _ = runner.main(batch, torch.arange(end - start))
        got.append(logits)
    torch.testing.assert_close(torch.cat(got), ref, rtol=1e-4, atol=1e-4)


def test_mtp_logits_equal_the_training_path(model) -> None:
    """The MTP module over the cache predicts what the training loss's MTP branch predicts."""
    from raymoe.platform.model.attention import CausalAttention
    from raymoe.platform.model.forward import drive, head, local_experts, main_program, mtp_program

    ids = torch.tensor(prompts(4)[3])
    S = ids.shape[0]
    ctx = CausalAttention.of(1, S)
    with torch.no_grad():
        h = drive(main_program(model, ctx, tokens=ids), local_experts(model))
        module = model.mtp_modules()[0]
        emb = model.model.embed_tokens(torch.roll(ids, -1))
        h1 = drive(mtp_program(module, model, h, emb, ctx), local_experts(model))
        ref = head(model, h1, module.shared_head.norm)[: S - 1]  # position i sees token i+1

    runner = LocalRunner(model, cache_blocks(64, 8), 8)
    blocks = [1, 2, 3, 4, 5]
    batch = build_step([SeqRun(ids.tolist(), 0, blocks)], 8)
    _, hidden = runner.main(batch, torch.tensor([S - 1]), torch.arange(S))
    mtp_batch = build_step([SeqRun(ids[1:].tolist(), 0, blocks)], 8)
    got = runner.mtp(mtp_batch, hidden[: S - 1], torch.arange(S - 1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("prefill_chunk", [512, 7])
def test_greedy_equals_full_recompute(model, speculative: bool, prefill_chunk: int) -> None:
    ps = prompts(5)
    ref = greedy_by_recompute(model, ps, GREEDY.max_tokens)
    engine = make_engine(model, speculative=speculative, prefill_chunk=prefill_chunk)
    assert engine.speculative == speculative
    out = run_to_completion(engine, ps, [GREEDY] * len(ps))
    assert out == ref
    stats = engine.stats()
    assert stats["cache_blocks_used"] == 0
    if speculative:
        assert stats["draft_proposed"] > 0  # the drafts were verified (and rejected or kept)


def test_continuous_batching_requests_join_and_leave(model) -> None:
    """Requests that arrive while others run, with a batch smaller than the load, get their lone output."""
    ps = prompts(8, seed=3)
    lengths = [3, 12, 7, 1, 9, 5, 12, 2]
    alone = [run_to_completion(make_engine(model), [p], [SamplingParams(max_tokens=n, temperature=0)])[0]
             for p, n in zip(ps, lengths)]  # fmt: skip
    engine = make_engine(model, max_batch_size=3, prefill_chunk=16)
    got: dict[str, list[int]] = {}
    done: set[str] = set()

    def collect(out: Output) -> None:
        got.setdefault(out.request_id, []).extend(out.token_ids)
        if out.finished:
            done.add(out.request_id)

    ids = []
    batch_sizes = set()
    for i, (p, n) in enumerate(zip(ps, lengths)):
        ids.append(engine.submit(p, SamplingParams(max_tokens=n, temperature=0), collect))
        if i % 2:
            batch_sizes.add(engine.step())
    while len(done) < len(ids):
        batch_sizes.add(engine.step())
    assert [got[i] for i in ids] == alone
    assert max(batch_sizes) == 3 and len(batch_sizes) > 2  # the batch changed size as requests came and went
    assert engine.stats()["cache_blocks_used"] == 0


def test_speculative_identical_under_batching_and_chunking(model) -> None:
    ps = prompts(6, seed=5)
    params = [SamplingParams(max_tokens=20, temperature=0)] * len(ps)
    plain = run_to_completion(make_engine(model, speculative=False), ps, params)
    spec = run_to_completion(make_engine(model, max_batch_size=4, prefill_chunk=5), ps, params)
    assert spec == plain


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):  # noqa: ANN001, ANN201
    """The tiny preset trained briefly (MTP on), so that its drafts are often right."""
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.config import load_config
    from raymoe.platform.train.loop import pretrain

    cfg = load_config("tiny", ["train.steps=60", "train.lr=3e-3", "train.eval_every=0", "tracking.enabled=false"])
    out = tmp_path_factory.mktemp("trained")
    pretrain(cfg, tiny_data, out, progress=False)  # the local trainer
    return load_model(str(out))


def test_drafts_do_not_depend_on_the_batch(trained) -> None:
    """Each sequence's MTP drafts are the same alone and in a batch: equal acceptance counts (not just outputs)."""
    ps = prompts(6, seed=11)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = []
    for p in ps:
        engine = make_engine(trained)
        run_to_completion(engine, [p], [params])
        alone.append(engine.counters["draft_accepted"])
    engine = make_engine(trained, max_batch_size=4, prefill_chunk=20)
    run_to_completion(engine, ps, [params] * len(ps))
    assert sum(alone) > 0 and engine.counters["draft_accepted"] == sum(alone)
    assert engine.counters["draft_proposed"] == engine.counters["generated_tokens"] - len(ps) - sum(alone)
    print(f"acceptance {engine.stats()['acceptance_rate']:.2f}")


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model) -> None:
    p = prompts(1)[0]
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=123)
    alone = run_to_completion(make_engine(model), [p], [params])[0]
    crowd = run_to_completion(make_engine(model), [prompts(3, seed=9)[1], p, p], [GREEDY, params, params])
    assert crowd[1] == alone and crowd[2] == alone
    other = run_to_completion(make_engine(model), [p], [SamplingParams(max_tokens=10, temperature=0.8, seed=124)])[0]
    assert other != alone


def test_draft_acceptance_samples_the_target_distribution() -> None:
    """Speculative sampling with a greedy draft: the chosen tokens are distributed as the target's p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=0.7, top_k=4)
    p = probabilities(logits, params)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(n):
        ok, token = accept_draft(logits, 1, params, gen)
        counts[token] += 1
        accepted += ok
    assert counts[4] == 0  # outside the top-k
    torch.testing.assert_close(counts / n, p, atol=0.012, rtol=0)
    assert abs(accepted / n - float(p[1])) < 0.012
    assert accept_draft(logits, 0, SamplingParams(temperature=0), gen) == (True, 0)
    assert accept_draft(logits, 2, SamplingParams(temperature=0), gen) == (False, 0)


def test_stop_strings_and_eos(model) -> None:
    letters = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    p = prompts(1)[0]
    full = run_to_completion(make_engine(model), [p], [SamplingParams(max_tokens=12, temperature=0)])[0]
    text = letters(full)
    runner = LocalRunner(model, cache_blocks(512, 16), 16)
    engine = Engine(runner, EngineConfig(cache_tokens=512), decode=letters, eos_token_id=full[5])
    outs: list[Output] = []
    engine.submit(p, SamplingParams(max_tokens=12, temperature=0, stop=[text[3:5]]), outs.append)
    engine.submit(p, SamplingParams(max_tokens=12, temperature=0), outs.append)
    engine.submit(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), outs.append)
    while engine.step():
        pass
    by_id: dict[str, list[Output]] = {}
    for o in outs:
        by_id.setdefault(o.request_id, []).append(o)
    stop, eos, ignored = by_id.values()
    first_eos = full.index(full[5])
    assert "".join(o.text for o in stop) == text[: text.find(text[3:5])] and stop[-1].finish_reason == "stop"
    assert sum((o.token_ids for o in eos), []) == full[: first_eos + 1] and eos[-1].finish_reason == "stop"
    assert sum((o.token_ids for o in ignored), []) == full and ignored[-1].finish_reason == "length"
    assert "".join(o.text for o in ignored) == text


def test_cache_limits_wait_or_refuse(model) -> None:
    engine = make_engine(model, cache_tokens=64, block_size=8, speculative=False)  # 8 blocks
    with pytest.raises(RequestError, match="cache") as err:
        engine.check_request([1] * 40, SamplingParams(max_tokens=30))
    assert err.value.field == "max_tokens"
    with pytest.raises(RequestError, match="context") as err:
        engine.check_request([1] * 600, SamplingParams(max_tokens=1))
    assert err.value.field == "prompt"
    with pytest.raises(RequestError, match="empty"):
        engine.check_request([], SamplingParams(max_tokens=1))
    # two requests of 5 blocks each: the second waits for the first's blocks
    a, b = prompts(2, seed=4)
    params = [
        SamplingParams(max_tokens=40 - len(a), temperature=0),
        SamplingParams(max_tokens=40 - len(b), temperature=0),
    ]
    both = run_to_completion(engine, [a, b], params)
    assert both == [run_to_completion(make_engine(model), [q], [sp])[0] for q, sp in zip((a, b), params)]
    assert engine.stats()["cache_blocks_used"] == 0


def test_abort_frees_the_cache_and_overload_is_refused(model) -> None:
    engine = make_engine(model, max_batch_size=1, max_waiting=2)
    outs: list[Output] = []
    first = engine.submit(prompts(1)[0], SamplingParams(max_tokens=100, temperature=0), outs.append)
    engine.step()
    assert engine.stats()["cache_blocks_used"] > 0
    engine.submit([1, 2], GREEDY, outs.append)
    waiting = engine.submit([3], GREEDY, outs.append)
    with pytest.raises(EngineOverloaded, match="max_waiting 2"):
        engine.submit([4], GREEDY, outs.append)
    engine.abort(first)
    engine.abort(waiting)
    while engine.step():
        pass
    reasons = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert reasons[first] == "abort" and reasons[waiting] == "abort" and len(reasons) == 3
    assert engine.stats()["cache_blocks_used"] == 0


class _FailingRunner(LocalRunner):
    """A runner whose forward fails from its third step on (as when an actor of the graph dies)."""

    calls = 0

    def main(self, *args, **kwargs):
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("ExpertShard(1) died")
        return super().main(*args, **kwargs)


def test_a_failed_step_ends_every_request_with_an_error(model) -> None:
    engine = Engine(_FailingRunner(model, cache_blocks(512, 16), 16), EngineConfig(cache_tokens=512))
    finished = threading.Event()
    outs: list[Output] = []

    def collect(out: Output) -> None:
        outs.append(out)
        if sum(o.finished for o in outs) == 2:
            finished.set()

    engine.start()
    try:
        engine.submit([1, 2, 3], SamplingParams(max_tokens=50), collect)
        engine.submit([4, 5], SamplingParams(max_tokens=50), collect)
        assert finished.wait(30), "requests hung after the engine failed"
        assert all(o.finish_reason == "error" and "ExpertShard(1) died" in o.error for o in outs if o.finished)
        with pytest.raises(EngineDead, match="ExpertShard"):
            engine.submit([1], GREEDY, collect)
    finally:
        engine.shutdown()
