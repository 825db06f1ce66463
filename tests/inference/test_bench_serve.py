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
    # float32, greedy: transformers and both of our paths produce the same tokens
    assert all(d["same_tokens_as_raymoe"] == 6 for d in decode.values())
    assert decode["raymoe_mtp"]["acceptance_rate"] is not None
    assert [(r["speculative"], r["clients"]) for r in report["http"]] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    assert all(r["tokens"] == 6 * r["requests"] and r["aggregate_tokens_per_s"] > 0 for r in report["http"])
    assert report["batch1_speedup"] > 0 and set(report["stream_scaling"]) == {"mtp_on", "mtp_off"}
