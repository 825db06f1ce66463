"""``raymoe bench serve`` on the tiny checkpoint: the real path (transformers, the engine, HTTP streams), small."""

from __future__ import annotations

import json

from raymoe.pipelines.cli import main


def test_bench_serve_prints_a_table_and_json(ray_local, served_checkpoint, capsys) -> None:
    argv = ["bench", "serve", "--checkpoint", str(served_checkpoint), "--concurrency", "1,2", "--requests", "1",
            "--new-tokens", "6", "--dtype", "float32", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert "| transformers generate |" in out and "| raymoe, MTP on |" in out and "× transformers" in out
    decode = report["decode"]
    assert set(decode) == {"transformers", "raymoe", "raymoe_mtp"}
    assert all(d["tokens_per_s"] > 0 for d in decode.values())
    # float32, greedy: transformers and our MTP path produce our plain decode's 6 tokens
    assert decode["transformers"]["same_tokens_as_raymoe"] == 6 and decode["raymoe_mtp"]["same_tokens_as_raymoe"] == 6
    # one step per token without drafts (the prefill's gives the first); an accepted draft saves a step
    assert decode["raymoe"]["steps"] == 6 and decode["raymoe"]["acceptance_rate"] is None
    assert 0 <= decode["raymoe_mtp"]["acceptance_rate"] <= 1 and decode["raymoe_mtp"]["steps"] <= 6
    assert [(r["speculative"], r["clients"]) for r in report["http"]] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    for r in report["http"]:
        assert r["requests"] == r["clients"] and r["tokens"] == 6 * r["requests"], r  # the server's usage counts
        assert r["aggregate_tokens_per_s"] > 0 and r["ttft_p50_s"] > 0  # a first chunk with text arrived
        # the replica's own counters: drafts only with MTP on
        assert (r["acceptance_rate"] is not None) == r["speculative"], r
    assert report["batch1_speedup"] > 0 and set(report["stream_scaling"]) == {"mtp_on", "mtp_off"}
