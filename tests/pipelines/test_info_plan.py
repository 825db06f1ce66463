"""``raymoe info --plan serve|train``: the printed lines, --json, and flags that are wrong."""

from __future__ import annotations

import json

import pytest

from raymoe.pipelines import cli

SERVE_671B = [
    "info", "deepseek-v3", "--plan", "serve", "--devices", "8", "--device-memory", "141GiB",
    "--host-memory", "2TiB", "--expert-budget", "60GiB",
]  # fmt: skip


@pytest.fixture
def info_only_cli(monkeypatch):
    """The real ``raymoe`` parser with only the ``info`` subcommand (the others are not needed here)."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", ("info",))


def test_serve_plan_prints_what_sits_where(info_only_cli, capsys):
    assert cli.main(SERVE_671B) == 0
    out = capsys.readouterr().out
    assert "raymoe info deepseek-v3 --plan serve" in out
    for line in [
        "non-expert weights           31.88 GiB (34,235,326,464 B)  bf16, replicated",
        "attention                  21.26 GiB (22,827,094,016 B)",
        "routed experts               60.00 GiB (64,424,509,440 B)  --expert-budget: 39.4% of their 152.25 GiB",
        "warm                       59.32 GiB (63,697,665,024 B)  1,446 x 44,050,944 B",
        "cold (on the device)       672.00 MiB (704,643,072 B)  410 experts",
        "latent (MLA) KV cache        35.02 GiB (37,598,001,562 B)  535,035 tokens x 70,272 B",
        "routed experts               0 hot + 11,568 warm + 3,280 cold = 14,848",
        "latent-cache tokens          4,280,280 (535,035 per device)",
        "warm in fp8 e4m3, float32 scale per 128x128 block",
        "all else replicated on every device",
    ]:
        assert line in out, line
    assert cli.main([*SERVE_671B, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["plan"] == "serve" and plan["devices"] == 8
    assert plan["tiers"]["warm"] == 1446 and plan["total_kv_tokens"] == 4_280_280


def test_without_plan_the_report_is_unchanged(info_only_cli, capsys):
    assert cli.main(["info", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "plan" not in out and "total_params" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device-memory", "12XB"], "--device-memory '12XB' is not a size"),
        (["--warm-dtype", "fp4"], "--warm-dtype) 'fp4' is not one of fp8, int8, int4"),
        (["--devices", "0"], "--devices) must be >= 1"),
        (["--expert-budget", "10MiB"], "below what must be resident"),
        (["--device-memory", "24GiB"], "do not fit the usable"),
    ],
)
def test_bad_serve_flags_exit_2_naming_them(info_only_cli, capsys, flags, message):
    assert cli.main([*SERVE_671B, *flags]) == 2
    err = capsys.readouterr().err
    assert "raymoe info: configuration error" in err and message in err


TRAIN_671B = [
    "info", "deepseek-v3", "--plan", "train", "--nodes", "256", "--gpus-per-node", "8",
    "--interconnect-gbps", "400", "--moment-dtype", "bf16",
]  # fmt: skip


def test_train_plan_prints_layout_bytes_all_to_all_and_tokens_per_s(info_only_cli, capsys):
    assert cli.main(TRAIN_671B) == 0
    out = capsys.readouterr().out
    assert "raymoe info deepseek-v3 --plan train" in out
    for line in [
        "dp x pp, ep                                        64 x 32 (fewest stages that fit), 256 expert shards",
        "batch per step                                     262,144 tokens = dp 64 x 1 micro-batches x 1 x 4,096",
        "attention stage (stage 0: layers 0-1 + embedding)  25.87 GiB (27,775,598,592 B)  2,093,645,824 params",
        "expert shard (1 per MoE layer)                     41.02 GiB (44,048,580,608 B)  2,598,371,328 params",
        "per token, all MoE layers                          27,066,368 B (dispatch + combine, fwd + bwd)",
        "per GPU, per step                                  3.22 GiB (3,462,803,456 B)  69.3 ms at 400 Gb/s",
        "compute per step                                   84.3 ms at MFU 0.4 of 989 TFLOP/s",
        "step                                               153.6 ms = compute + all-to-all (not overlapped)",
        "tokens/s                                           1,706,788",
        "AdamW moments 2 x bf16 = 12 B a parameter",
    ]:
        assert line in out, line
    assert cli.main([*TRAIN_671B, "--json", "--overlap"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["plan"] == "train" and (plan["dp"], plan["pp"], plan["ep"]) == (64, 32, 256)
    assert plan["step_s"] == plan["compute_s"] > plan["a2a_s"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "0"], "nodes (--nodes) must be >= 1"),
        (["--pp", "3"], "pp (--pp) must divide the 2048 GPUs"),
        (["--moment-dtype", "fp32"], "no layout fits"),
        (["--device-memory", "80XB"], "--device-memory '80XB' is not a size"),
    ],
)
def test_bad_train_flags_exit_2_naming_them(info_only_cli, capsys, flags, message):
    assert cli.main([*TRAIN_671B, *flags]) == 2
    err = capsys.readouterr().err
    assert "raymoe info: configuration error" in err and message in err


def test_help_lists_the_plan_flags(info_only_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["info", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--expert-budget" in out and "--interconnect-gbps" in out and "(default 10%)" in out
