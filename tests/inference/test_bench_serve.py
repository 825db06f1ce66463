"""``raymoe bench serve`` on the tiny checkpoint: the real path (transformers, the engine, HTTP streams), small."""

from __future__ import annotations

import json

from raymoe.pipelines.cli import main


def test_bench_serve_prints_a_table_and_json(ray_local, served_checkpoint, capsys) -> None:
    argv = ["bench", "serve", "--checkpoint", str(served_checkpoint), "--concurrency", "1,2", "--requests", "1",
            "--new-tokens", "6", "--long-prompt-len", "40", "--dtype", "float32", "--hf-configs", "grouped_mm,eager",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert "| raymoe, MTP on |" in out and "× best baseline" in out and "**(best baseline)**" in out
    decode, baselines = report["decode"], report["baselines"]
    assert set(decode) == {"raymoe", "raymoe_mtp"} and set(baselines) == {"grouped_mm", "eager"}
    assert all(
        d["tokens_per_s"] > 0 and len(d["runs_tokens_per_s"]) == 3 for d in [*decode.values(), *baselines.values()]
    )
    # the best baseline is the fastest configuration, and the speedup is against it
    best = report["best_baseline"]
    assert baselines[best]["tokens_per_s"] == max(b["tokens_per_s"] for b in baselines.values())
    ours = max(d["tokens_per_s"] for d in decode.values())
    assert abs(report["batch1_speedup"] - ours / baselines[best]["tokens_per_s"]) < 1e-9
    # float32, greedy: transformers and our MTP path produce our plain decode's 6 tokens
    assert all(b["same_tokens_as_raymoe"] == 6 for b in baselines.values())
    assert decode["raymoe_mtp"]["same_tokens_as_raymoe"] == 6
    # one step per token without drafts (the prefill's gives the first); an accepted draft saves a step
    assert decode["raymoe"]["steps"] == 6 and decode["raymoe"]["acceptance_rate"] is None
    assert 0 <= decode["raymoe_mtp"]["acceptance_rate"] <= 1 and decode["raymoe_mtp"]["steps"] <= 6
    assert [(r["speculative"], r["clients"]) for r in report["http"]] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    for r in report["http"]:
        assert r["requests"] == r["clients"] and r["tokens"] == 6 * r["requests"], r  # the server's usage counts
        assert r["aggregate_tokens_per_s"] > 0 and r["ttft_p50_s"] > 0  # a first chunk with text arrived
        assert 0 <= r["itl_p50_s"] <= r["itl_p99_s"] < r["latency_p99_s"], r
        # the replica's own counters: drafts only with MTP on
        assert (r["acceptance_rate"] is not None) == r["speculative"], r
    assert report["batch1_speedup"] > 0 and set(report["stream_scaling"]) == {"mtp_on", "mtp_off"}
    assert report["stream_scaling"]["mtp_off"]["clients"] == 2  # no 16 clients here: the largest level
    assert "prompts of 32 and 40 tokens alternating" in out and "| ITL p50 / p99 (ms) |" in out
