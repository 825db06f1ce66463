"""The Ray Serve application over HTTP: the ``openai`` client, bad input, overload, disconnects, load.

One Serve instance on the session's Ray, with two applications of the tiny checkpoint: the
default limits at ``/`` and a tiny queue at ``/small`` (one running sequence, two waiting).
(API keys: test_auth.py; the OpenAI subset: test_openai_subset.py; hostile input: test_fuzz.py;
``runner: graph`` replicas: test_serve_scaling.py, slow.)
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import openai
import pytest
import requests
import yaml

from raymoe.pipelines.serve import DEPLOYMENT_DEFAULTS, ServeArgs, build_app

from .conftest import MODEL, deploy, serve_on_a_free_port
from .conftest import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(ray_local, served_checkpoint: Path):  # noqa: ANN201
    with serve_on_a_free_port() as url:
        deploy(served_checkpoint, "raymoe", "/")
        deploy(served_checkpoint, "small", "/small", max_batch_size=1, max_waiting=2, block_size=4)
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=10).json()


# --------------------------------------------------------------------------- the openai client


def test_completion_and_its_stream_agree(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt="def f(x):", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.model == MODEL
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    stream = client.completions.create(
        model=MODEL, prompt="def f(x):", max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_and_its_stream_agree(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def fib(n):"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens > 5  # the template's tokens too
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no stream_options.include_usage: no usage, as OpenAI


def test_models_health_and_raw_sse(server: str, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 3, "stream": True, "temperature": 0}
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in p for p in payloads)  # usage only when stream_options.include_usage asks
    body["stream_options"] = {"include_usage": True}
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=30) as r:
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-1] == {**payloads[-1], "choices": [],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}  # fmt: skip


# --------------------------------------------------------------------------- bad input


def _post(server: str, path: str, body, **kw) -> requests.Response:  # noqa: ANN001
    if isinstance(body, (dict, list)):
        return requests.post(f"{server}{path}", json=body, timeout=30, **kw)
    return requests.post(f"{server}{path}", data=body, timeout=30, **kw)


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ("{not json", 400, "body", "not valid JSON"),
        ([1, 2], 400, "body", "JSON object"),
        ({"prompt": "x"}, 400, "model", "required"),
        ({"model": MODEL}, 400, "prompt", "required"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
        ({"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
        ({"model": MODEL, "prompt": 12}, 400, "prompt", "string"),
        ({"model": MODEL, "prompt": [1] * 600}, 400, "prompt", "context of 512"),
        ({"model": MODEL, "prompt": [100000]}, 400, "prompt", "outside the vocabulary"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "positive integer"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens", "positive integer"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature", "[0, 2]"),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
        ({"model": MODEL, "prompt": "x", "top_k": -2}, 400, "top_k", "non-negative"),
        ({"model": MODEL, "prompt": "x", "stop": [1]}, 400, "stop", "strings"),
        ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n", "[1, 16]"),
        ({"model": MODEL, "prompt": "x", "n": 17}, 400, "n", "[1, 16]"),
        ({"model": MODEL, "prompt": "x", "seed": 2**70}, 400, "seed", "2**64"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream", "boolean"),
    ],
)
def test_bad_completion_requests(server: str, body, status: int, param: str, words: str) -> None:  # noqa: ANN001
    r = _post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"  # OpenAI's type for every 4xx
    if status == 404:
        assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": MODEL}, "messages", "required"),
        ({"model": MODEL, "messages": []}, "messages", "non-empty"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "one of"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
         "max_completion_tokens", "positive integer"),
    ],
)  # fmt: skip
def test_bad_chat_requests(server: str, body: dict, param: str, words: str) -> None:
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_the_openai_client_sees_the_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-5)


# --------------------------------------------------------------------------- overload, disconnects, load


def test_overload_is_503_at_once_and_disconnects_free_the_cache(server: str) -> None:
    small = f"{server}/small"
    long = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 256, "temperature": 0, "ignore_eos": True}
    running = requests.post(f"{small}/v1/completions", json={**long, "stream": True}, stream=True, timeout=60)
    lines = running.iter_lines()
    next(line for line in lines if line)  # the first chunk: it runs and holds cache blocks
    assert _stats(small)["cache_blocks_used"] > 0
    pool = concurrent.futures.ThreadPoolExecutor(2)
    queued = [pool.submit(requests.post, f"{small}/v1/completions", json=long, timeout=120) for _ in range(2)]
    _wait_for(lambda: _stats(small)["waiting"] == 2, what="two waiting requests")
    start = time.monotonic()
    r = _post(small, "/v1/completions", long)
    assert r.status_code == 503 and time.monotonic() - start < 5
    assert r.json()["error"]["type"] == "server_error" and "max_waiting 2" in r.json()["error"]["message"]
    running.close()  # the client goes away mid-stream
    for f in queued:
        assert f.result().status_code == 200 and f.result().json()["usage"]["completion_tokens"] == 256
    pool.shutdown()
    _wait_for(lambda: _stats(small)["cache_blocks_used"] == 0 and _stats(small)["running"] == 0,
              what="the cache to be freed")  # fmt: skip


def test_two_hundred_concurrent_requests_all_complete(server: str, client: openai.OpenAI) -> None:
    prompts = ["def f(x):", "class A:", "import os", "return 1"]
    expected = {
        p: client.completions.create(
            model=MODEL, prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        ).choices[0].text
        for p in prompts
    }  # fmt: skip

    def one(i: int) -> tuple[int, dict]:
        body = {"model": MODEL, "prompt": prompts[i % 4], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        r = requests.post(f"{server}/v1/completions", json=body, timeout=300)
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert [status for status, _ in results] == [200] * 200
    for i, (_, body) in enumerate(results):
        assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
        assert body["choices"][0]["text"] == expected[prompts[i % 4]]
    stats = _stats(server)
    assert stats["cache_blocks_used"] == 0 and stats["rejected_overload"] == 0


# --------------------------------------------------------------------------- config


def test_serve_config_is_the_builders_defaults() -> None:
    """deploy/serve/config.yaml starts the builder with ServeArgs' defaults and the deployment's options."""
    config = yaml.safe_load((REPO / "deploy" / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "raymoe.pipelines.serve:build_app"
    args = ServeArgs(**app["args"])
    defaults = ServeArgs(checkpoint=args.checkpoint)
    assert args == defaults
    (deployment,) = app["deployments"]
    assert deployment.pop("name") == "RaymoeServer"
    assert deployment == DEPLOYMENT_DEFAULTS
    with pytest.raises(ValueError, match="max_batchsize"):
        ServeArgs(checkpoint="x", max_batchsize=3)  # a typo in args is an error, not ignored


def test_raymoe_serve_flags_become_the_apps_args(
    stubbed_serve: tuple[list, list], served_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    """``raymoe serve --runner graph --pp 2 --ep 2`` (was ``--engine``); a wrong checkpoint fails before Ray starts."""
    from raymoe.pipelines import cli

    started, bound = stubbed_serve
    argv = ["serve", "--checkpoint", str(served_checkpoint), "--dtype", "float32"]
    assert cli.main([*argv, "--runner", "graph", "--pp", "2", "--ep", "2"]) == 0
    (args,) = bound[0]._bound_deployment.init_args
    assert (args.runner, args.parallel, args.dtype) == ("graph", {"pp": 2, "ep": 2}, "float32")
    assert cli.main(argv) == 0
    (args,) = bound[1]._bound_deployment.init_args
    assert (args.runner, args.parallel) == ("local", {"pp": 1, "ep": 1})
    assert started == ["ray", "serve"] * 2
    with pytest.raises(SystemExit):
        cli.main([*argv, "--engine", "graph"])
    assert "unrecognized arguments: --engine graph" in capsys.readouterr().err
    assert cli.main(["serve", "--checkpoint", str(Path(served_checkpoint).parent / "missing")]) == 2
    assert "raymoe serve: checkpoint" in capsys.readouterr().err and len(started) == 4  # Ray never started


def test_build_app_takes_the_checkpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYMOE_CHECKPOINT", "/data/run")
    monkeypatch.setenv("RAYMOE_API_KEY", "k3y-in-the-env")
    app = build_app(ServeArgs(checkpoint="outputs/demo"))
    (bound,) = app._bound_deployment.init_args
    assert bound.checkpoint == "/data/run"
    assert "k3y-in-the-env" not in bound.model_dump_json()  # each replica reads the key itself
