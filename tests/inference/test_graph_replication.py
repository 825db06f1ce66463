"""Hot-expert replication and live re-placement on the serving graph: identical outputs (float32) with and
without copies, every choice computed exactly once, and a re-placement during a stream that loses no request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.actors.graph import GraphRunner
from raymoe.actors.placement import build_placement, imbalance, shard_loads
from raymoe.platform.checkpoint.reader import load_model
from raymoe.platform.inference.engine import Engine, EngineConfig, Output, run_to_completion
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams


def _prompts(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 512, (int(k),), generator=g).tolist() for k in torch.randint(1, 40, (n,), generator=g)]


def _skewed(cfg, hot: tuple[int, ...] = (0, 1, 2)) -> torch.Tensor:  # noqa: ANN001
    """Loads where a few experts of every MoE layer take most tokens (contiguous blocks put them on one shard)."""
    layers = len(build_placement(cfg, _parallel(3)).moe_layers)
    loads = torch.ones(layers, cfg.n_routed_experts, dtype=torch.float64)
    loads[:, list(hot)] = 50.0
    return loads


def _parallel(ep: int, pp: int = 1):  # noqa: ANN202
    from raymoe.platform.config import ParallelConfig

    return ParallelConfig(pp=pp, ep=ep)


def _runner(location: str, pp: int, ep: int, in_process: bool = True, **kw) -> GraphRunner:
    return GraphRunner(location, load_model(location).cfg, cache_blocks(1024, 16), 16, pp=pp, ep=ep,
                       dtype=torch.float32, in_process=in_process, **kw)  # fmt: skip


def _outputs(engine: Engine, prompts: list[list[int]], params: SamplingParams, between=None) -> list[list[Output]]:  # noqa: ANN001
    """Every request's outputs (each step's), stepping the engine here; ``between(step)`` runs between steps."""
    outs: dict[str, list[Output]] = {}
    ids = [engine.submit(p, params, lambda o: outs.setdefault(o.request_id, []).append(o)) for p in prompts]
    step = 0
    while not all(outs.get(i) and outs[i][-1].finished for i in ids):
        if between is not None:
            between(step)
        assert engine.step() > 0 or all(outs.get(i) and outs[i][-1].finished for i in ids), "idle with requests left"
        step += 1
    return [outs[i] for i in ids]


def _tokens_and_logprobs(outs: list[Output]) -> tuple[list[int], torch.Tensor]:
    tokens = [t for o in outs for t in o.token_ids]
    chosen = [lp.logprob for o in outs for lp in o.logprobs or []]
    top = [v for o in outs for lp in o.logprobs or [] for _, v in lp.top]
    lps = torch.tensor(chosen + top, dtype=torch.float64)
    return tokens, lps


@pytest.mark.parametrize("speculative", [False, True])
def test_replicated_experts_give_the_outputs_of_no_replication(served_checkpoint, speculative: bool) -> None:  # noqa: ANN001
    """float32: the same tokens and log-probabilities (≤ 1e-5: a row's expert outputs are summed in another order
    when its choices sit on other shards) as one process, with 4 extra copies per layer at pp=2, ep=3."""
    location = str(served_checkpoint)
    model = load_model(location)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    config = EngineConfig(prefill_chunk=9, max_batch_size=4, speculative=speculative)
    ref = _outputs(Engine(LocalRunner(model, cache_blocks(1024, 16), 16), config), _prompts(), params)
    runner = _runner(location, 2, 3, expert_loads=_skewed(model.cfg), redundant=4)
    try:
        p = runner.placement
        assert p.num_replicas == 4 * len(p.moe_layers)
        assert all(len(p.holders(layer)[e]) >= 2 for layer in p.moe_layers for e in (0, 1, 2))  # the hot ones
        got = _outputs(Engine(runner, config), _prompts(), params)
        for a, b in zip(ref, got):
            (ta, la), (tb, lb) = _tokens_and_logprobs(a), _tokens_and_logprobs(b)
            assert ta == tb
            torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
        stats = runner.stats()
        # every (row, choice) the gates made was computed exactly once, on one of its expert's copies
        assert sum(stats["shard_tokens"]) == sum(sum(row) for row in stats["expert_loads"]["loads"])
        per_layer = [sum(row) for row in stats["shard_layer_tokens"]]  # and so per layer
        assert per_layer == [sum(row) for row in stats["expert_loads"]["loads"]]
        assert stats["expert_replicas"] == p.num_replicas
    finally:
        runner.close()


def test_replicas_split_a_hot_experts_tokens(served_checkpoint) -> None:  # noqa: ANN001
    """Under a routing that sends every token to the same experts, the copies share them: the shards' counts
    match what the placement predicts, and max/mean per shard falls against the contiguous placement."""
    location = str(served_checkpoint)
    params = SamplingParams(max_tokens=8, temperature=0)
    prompts = _prompts(8)
    plain = _runner(location, 1, 3)
    try:
        run_to_completion(Engine(plain, EngineConfig()), prompts, [params] * len(prompts))
        before = plain.stats()
        live = torch.tensor(before["expert_loads"]["loads"], dtype=torch.float64)
    finally:
        plain.close()
    runner = _runner(location, 1, 3, expert_loads=live, redundant=3)
    try:
        run_to_completion(Engine(runner, EngineConfig()), prompts, [params] * len(prompts))
        after = runner.stats()
    finally:
        runner.close()
    assert after["expert_loads"] == before["expert_loads"]  # the same routing, so the same loads
    assert sum(after["shard_tokens"]) == sum(before["shard_tokens"])
    assert imbalance(shard_loads(runner.placement, live)) <= imbalance(shard_loads(plain.placement, live))
    assert after["shard_imbalance"] <= before["shard_imbalance"]


def test_live_re_placement_during_streams_loses_no_request(served_checkpoint) -> None:  # noqa: ANN001
    """Streams in flight while the runner re-places its experts every 3 steps (copies moved between shards):
    every request finishes, with the tokens of the run without re-placement."""
    location = str(served_checkpoint)
    params = SamplingParams(max_tokens=20, temperature=0)
    config = EngineConfig(prefill_chunk=8, max_batch_size=4, speculative=True)
    prompts = _prompts(7)
    model = load_model(location)
    local = Engine(LocalRunner(model, cache_blocks(1024, 16), 16), config)
    ref = run_to_completion(local, prompts, [params] * len(prompts))
    runner = _runner(location, 2, 2, rebalance_every=3, redundant=2)
    try:
        got = _outputs(Engine(runner, config), prompts, params)
        assert [[t for o in outs for t in o.token_ids] for outs in got] == ref
        assert all(outs[-1].finish_reason == "length" and not outs[-1].error for outs in got)
        assert runner.rebalances and sum(r["moved"] for r in runner.rebalances) > 0
        assert runner.placement.num_replicas == 2 * len(runner.placement.moe_layers)
    finally:
        runner.close()


def test_re_placement_on_ray_actors_mid_stream(ray_local, served_checkpoint) -> None:  # noqa: ANN001
    """The same on Ray actors: experts move shard to shard by object reference between two steps."""
    location = str(served_checkpoint)
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = _prompts(4)
    model = load_model(location)
    local = Engine(LocalRunner(model, cache_blocks(1024, 16), 16), EngineConfig())
    ref = run_to_completion(local, prompts, [params] * len(prompts))
    runner = _runner(location, 1, 2, in_process=False, redundant=2)
    try:
        moved = []

        def between(step: int) -> None:
            if step == 4:
                runner.rebalance(_skewed(model.cfg, hot=(5, 6)))
                moved.append(runner.rebalances[-1])

        got = _outputs(Engine(runner, EngineConfig()), prompts, params, between)
        assert [[t for o in outs for t in o.token_ids] for outs in got] == ref
        assert moved and moved[0]["moved"] > 0 and moved[0]["imbalance_after"] < moved[0]["imbalance_before"]
        shares = runner.stats()["actor_param_bytes"]
        experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
        per_expert = experts // (model.cfg.n_routed_experts * len(runner.placement.moe_layers))
        # the shards now hold every expert once plus the copies
        assert shares["Shard(0)"] + shares["Shard(1)"] == experts + runner.placement.num_replicas * per_expert
    finally:
        runner.close()


def test_bad_replication_arguments_name_the_value(served_checkpoint) -> None:  # noqa: ANN001
    from raymoe.platform.config import ConfigError

    location = str(served_checkpoint)
    with pytest.raises(ConfigError, match="redundant experts must be 0..8"):
        _runner(location, 1, 2, redundant=9)  # 8 experts, ep=2: at most 8 extra copies
    with pytest.raises(ValueError, match="rebalance_every"):
        _runner(location, 1, 2, rebalance_every=-1)
    with pytest.raises(ConfigError, match="expert loads are"):
        _runner(location, 1, 2, expert_loads=torch.ones(1, 3))


def test_streams_over_http_while_the_graph_re_places(ray_local, served_checkpoint) -> None:  # noqa: ANN001
    """The Serve app on the graph runner (ep=2, re-placing every 2 steps with 2 copies): concurrent streams
    through the openai client all finish with the plain app's text; /stats shows the moves and the shards' loads."""
    import concurrent.futures

    import openai
    import requests

    from .conftest import deploy, serve_on_a_free_port

    with serve_on_a_free_port() as url:
        deploy(served_checkpoint, "plain", "/plain")
        deploy(served_checkpoint, "moving", "/moving", runner="graph", parallel={"pp": 1, "ep": 2},
               rebalance_every=2, redundant_experts=2)  # fmt: skip

        def stream(prefix: str, prompt: str) -> str:
            client = openai.OpenAI(base_url=f"{url}{prefix}/v1", api_key="unused", max_retries=0, timeout=60)
            parts = client.completions.create(model="raymoe", prompt=prompt, max_tokens=24, temperature=0, stream=True)
            return "".join(p.choices[0].text for p in parts)

        prompts = ["def f(x):", "import os\n", "class A:", "for i in range(10):", "x = [", "# a comment"]
        want = [stream("/plain", p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: stream("/moving", p), prompts))
        assert got == want
        stats = requests.get(f"{url}/moving/stats", timeout=10).json()
        assert stats["runner"] == "graph" and stats["rebalances"] and stats["expert_replicas"] == 2 * 3
        assert stats["request_errors"] == 0 and len(stats["shard_tokens"]) == 2
        assert sum(stats["shard_tokens"]) == sum(sum(row) for row in stats["expert_loads"]["loads"]) > 0


def test_placement_flags_fail_before_ray_starts(stubbed_serve, served_checkpoint, capsys) -> None:  # noqa: ANN001
    from raymoe.pipelines import cli

    started, bound = stubbed_serve
    argv = ["serve", "--checkpoint", str(served_checkpoint), "--dtype", "float32"]
    assert cli.main([*argv, "--runner", "graph", "--ep", "2", "--rebalance-every", "50",
                     "--redundant-experts", "4"]) == 0  # fmt: skip
    (args,) = bound[0]._bound_deployment.init_args
    assert (args.rebalance_every, args.redundant_experts, args.expert_placement) == (50, 4, "contiguous")
    for flags, words in [
        (["--redundant-experts", "2", "--rebalance-every", "5"], "add --runner graph --ep N"),
        (["--runner", "graph", "--ep", "2", "--redundant-experts", "9", "--rebalance-every", "5"],
         "redundant experts must be 0..8"),
        (["--runner", "graph", "--ep", "2", "--redundant-experts", "2"], "add --expert-placement balanced"),
        (["--runner", "graph", "--ep", "2", "--expert-placement", "hot"], "expert_placement"),
        (["--runner", "graph", "--ep", "2", "--expert-placement", "balanced"], "has no expert loads"),
        (["--runner", "graph", "--ep", "2", "--rebalance-every", "-1"], "rebalance_every"),
    ]:  # fmt: skip
        assert cli.main([*argv, *flags]) == 2, flags
        assert words in capsys.readouterr().err, flags
    assert started == ["ray", "serve"]  # only the good flags started Ray


def test_bench_placement_on_a_tiny_checkpoint(served_checkpoint, tmp_path, capsys) -> None:  # noqa: ANN001
    """``raymoe bench placement`` at toy sizes, in process: every placement's row, the counts consistent."""
    import json

    from raymoe.pipelines.cli import main as cli
    from raymoe.platform.analysis.loads import ExpertLoads
    from raymoe.platform.config import config_to_dict, load_config
    from raymoe.platform.train.trainer import LocalTrainer

    cfg = load_config("tiny", ["tracking.enabled=false"])
    trainer = LocalTrainer(cfg)
    rows = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    metrics = trainer.train_step([(rows[:, :-1], rows[:, 1:])])
    loads = ExpertLoads([1, 2, 3], metrics.loads.double(), 4 * 32, "training")
    ckpt = trainer.save_checkpoint(str(tmp_path / "run"), {"config": config_to_dict(cfg), "expert_loads":
                                   loads.to_dict()}, [Path(served_checkpoint) / "tokenizer.json"])  # fmt: skip
    argv = ["bench", "placement", "--checkpoint", ckpt, "--ep", "2", "--redundant", "2", "--requests", "3",
            "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1", "--dtype", "float32", "--in-process",
            "--rebalance-every", "2",
            "--json"]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    names = [r["placement"] for r in report["rows"]]
    assert names == ["contiguous", "training loads", "live", "live + 2 copies", "re-placed live"]
    for r in report["rows"]:
        # the same greedy requests under every placement: the same (row, expert) pairs, split differently
        # (3 requests x (8 prompt rows + 5 decoded), top-k choices, 2 main MoE layers (no MTP drafts)
        assert sum(r["shard_tokens"]) == 3 * (8 + 5) * cfg.model.num_experts_per_tok * 2
        assert r["imbalance"] >= 1.0
        if r["copies"] == 0:  # no split among copies: the counts predict the shards' work exactly
            assert r["imbalance"] == pytest.approx(r["predicted"])
    assert report["rows"][3]["copies"] == report["rows"][4]["copies"] == 2 * 3
    assert report["rows"][4]["moved"] > 0
    assert "| live + 2 copies |" in out


def test_a_re_placement_that_does_not_pay_is_skipped(served_checkpoint) -> None:  # noqa: ANN001
    location = str(served_checkpoint)
    prompts = _prompts(4)
    runner = _runner(location, 1, 2, rebalance_every=2, redundant=2, min_gain=10.0)  # no move lowers max/mean by 10
    try:
        before = runner.placement
        run_to_completion(Engine(runner, EngineConfig()), prompts, [SamplingParams(max_tokens=8, temperature=0)] * 4)
        assert runner.rebalances == [] and runner.skipped > 0 and runner.placement == before
    finally:
        runner.close()
