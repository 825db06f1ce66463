"""``raymoe serve --expert-budget``: the Serve app with routed experts in tiers, over HTTP, and its flags."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import requests

from .conftest import deploy, serve_on_a_free_port


@pytest.fixture(scope="module")
def server(ray_local, served_checkpoint: Path):  # noqa: ANN201
    with serve_on_a_free_port() as url:
        deploy(served_checkpoint, "plain", "/plain")
        deploy(served_checkpoint, "full", "/full", expert_budget="100%", expert_policy="uniform")
        deploy(served_checkpoint, "tiers", "/tiers", expert_budget="20%", expert_policy="uniform", warm_dtype="int8")
        yield url


def _complete(url: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    return client.completions.create(model="raymoe", prompt=prompt, max_tokens=16, temperature=0).choices[0].text


def test_tiers_over_http(server: str) -> None:
    """100 %: the plain app's text; 20 %: warm and cold experts used (the HF checkpoint's through its reader)."""
    for prompt in ("def f(x):", "import os\n"):
        assert _complete(f"{server}/full", prompt) == _complete(f"{server}/plain", prompt)
        assert _complete(f"{server}/tiers", prompt)  # a cold expert is slower, never absent
    stats = requests.get(f"{server}/tiers/stats", timeout=10).json()
    tiers = stats["expert_tiers"]["tiers"]
    assert tiers["warm"] > 0 and tiers["cold"] > 0 and sum(tiers.values()) == 24
    assert stats["expert_cache"]["uses"] > 0
    loads = stats["expert_loads"]
    assert loads["layers"] == [1, 2, 3] and sum(loads["loads"][0]) == 2 * loads["tokens"][0] > 0
    plain = requests.get(f"{server}/plain/stats", timeout=10).json()
    assert "expert_tiers" not in plain and sum(plain["expert_loads"]["loads"][0]) > 0


def test_expert_flags_fail_before_ray_starts(
    stubbed_serve: tuple[list, list], served_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    from raymoe.pipelines import cli

    started, bound = stubbed_serve
    argv = ["serve", "--checkpoint", str(served_checkpoint), "--dtype", "float32"]
    assert cli.main([*argv, "--expert-budget", "25%", "--expert-policy", "uniform", "--warm-dtype", "int4",
                     "--cold", "quantized", "--prefetch", "off"]) == 0  # fmt: skip
    (args,) = bound[0]._bound_deployment.init_args
    assert (args.expert_budget, args.warm_dtype, args.cold, args.expert_prefetch) == ("25%", "int4", "quantized", "off")
    assert "routed experts under 25.0 %" in capsys.readouterr().out
    for flags, words in [
        (["--expert-budget", "1KiB", "--expert-policy", "uniform"], "below what must be resident"),
        (["--expert-budget", "lots", "--expert-policy", "uniform"], "--expert-budget 'lots' is not a size"),
        (["--expert-budget", "25%", "--warm-dtype", "int3"], "warm_dtype"),
        (["--expert-budget", "25%"], "needs expert statistics"),  # an HF checkpoint: no loads
        (["--expert-budget", "25%", "--runner", "graph"], "works with the local runner"),
        (["--expert-budget", "25%", "--expert-policy", "uniform", "--prefetch", "maybe"], "prefetch"),
    ]:
        assert cli.main([*argv, *flags]) == 2, flags
        assert words in capsys.readouterr().err, flags
    assert started == ["ray", "serve"]  # only the good flags started Ray
