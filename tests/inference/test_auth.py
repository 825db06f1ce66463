"""The API key: every route but ``/health`` needs it, compared in constant time; it comes from
``$RAYMOE_API_KEY`` in the replica's environment or from a file, never from a command line or the
Serve config; ``raymoe serve`` prints a curl that carries it by reference, and its input errors are
one line.

Two applications of the tiny checkpoint: ``/file`` reads its key from a file, ``/env`` from
``RAYMOE_API_KEY`` in its replica's environment (as the Helm chart sets it from a Secret), with
``require_api_key``."""

from __future__ import annotations

import types
from pathlib import Path

import openai
import pytest
import requests
from starlette.requests import Request

from raymoe.pipelines import cli
from raymoe.pipelines import serve as serve_module
from raymoe.pipelines.serve import RaymoeServer, ServeArgs, banner, resolve_api_key

from .conftest import MODEL, deploy, serve_on_a_free_port

FILE_KEY = "file-k3y-0123456789"
ENV_KEY = "env-k3y-9876543210"
COMPLETION = {"model": MODEL, "prompt": "def f", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ROUTES = [
    ("POST", "/v1/completions", COMPLETION),
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", None),
    ("GET", "/stats", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
]
APPS = {"/file": FILE_KEY, "/env": ENV_KEY}


@pytest.fixture(scope="module")
def server(ray_local, served_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(FILE_KEY + "\n")  # a trailing newline, as `echo KEY > file` writes
    with serve_on_a_free_port() as url:
        deploy(served_checkpoint, "file", "/file", api_key_file=str(key_file))
        deploy(served_checkpoint, "env", "/env", require_api_key=True,
               actor_options={"runtime_env": {"env_vars": {"RAYMOE_API_KEY": ENV_KEY}}})  # fmt: skip
        yield url


def _call(url: str, method: str, path: str, body: dict | None, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return requests.request(method, f"{url}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_needs_the_key(server: str, app: str, method: str, path: str, body: dict | None) -> None:
    url = f"{server}{app}"
    missing = _call(url, method, path, body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == {"message": missing.json()["error"]["message"], "type": "invalid_request_error",
                                       "param": None, "code": None}  # fmt: skip
    other = APPS["/env" if app == "/file" else "/file"]
    for wrong in ("wrong", other, APPS[app] + "x", APPS[app][:-1]):
        r = _call(url, method, path, body, key=wrong)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (wrong, r.text)
    ok = _call(url, method, path, body, key=APPS[app])
    assert ok.status_code == 200, ok.text


def test_the_right_key_serves_everything(server: str) -> None:
    url = f"{server}/file"
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}  # the one open route
    headers = {"Authorization": f"bearer {FILE_KEY}"}  # the scheme is case-insensitive
    schema = requests.get(f"{url}/openapi.json", headers=headers, timeout=10).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    docs = requests.get(f"{url}/docs", headers=headers, timeout=10)
    assert "swagger" in docs.text.lower() and "/v1/chat/completions" in docs.text  # the schema is inline
    stats = requests.get(f"{url}/stats", headers=headers, timeout=10).json()
    assert FILE_KEY not in str(stats) and "cache_blocks_used" in stats
    r = requests.get(f"{url}/v1/models", headers={"Authorization": f"Basic {FILE_KEY}"}, timeout=10)
    assert r.status_code == 401


def test_the_openai_client_with_a_key(server: str) -> None:
    for app, key in APPS.items():
        url = f"{server}{app}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in good.models.list().data] == [MODEL]
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens <= 2


# --------------------------------------------------------------------------- in this process


def _request(authorization: str | None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def test_the_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = serve_module.hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serve_module.hmac, "compare_digest", compare_digest)
    replica = types.SimpleNamespace(_api_key=b"k3y")
    authorize = RaymoeServer.func_or_class._authorize
    authorize(replica, _request("Bearer k3y"))
    with pytest.raises(serve_module.api.APIError) as err:
        authorize(replica, _request("Bearer k3z"))
    assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert seen == [(b"k3y", b"k3y"), (b"k3z", b"k3y")]
    with pytest.raises(serve_module.api.APIError, match="didn't provide"):
        authorize(replica, _request(None))
    authorize(types.SimpleNamespace(_api_key=None), _request(None))  # no key: open


def test_the_key_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYMOE_API_KEY", raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv("RAYMOE_API_KEY", "  from-env  ")
    assert resolve_api_key(None) == "from-env"
    path = tmp_path / "key"
    path.write_text("from-file\n")
    assert resolve_api_key(str(path)) == "from-file"  # the file wins over the environment
    for content, words in (("", "is empty"), ("two words", "without spaces"), ("clé", "ASCII")):
        path.write_text(content)
        with pytest.raises(ValueError, match=words):
            resolve_api_key(str(path))
    with pytest.raises(ValueError, match="cannot read the API key file"):
        resolve_api_key(str(tmp_path / "missing"))


def test_the_key_is_no_argument_of_the_app(monkeypatch: pytest.MonkeyPatch, served_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="RAYMOE_API_KEY") as err:
        ServeArgs(checkpoint="x", api_key="s3cret")
    assert "api-key-file" in str(err.value)
    monkeypatch.delenv("RAYMOE_API_KEY", raising=False)
    user_class = RaymoeServer.func_or_class.__mro__[1]  # ours, under Serve's ASGI wrapper
    replica = object.__new__(user_class)
    with pytest.raises(RuntimeError, match="no API key"):  # refused before anything loads
        user_class.__init__(replica, ServeArgs(checkpoint=str(served_checkpoint), require_api_key=True))
    assert not hasattr(replica, "engine")


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """``raymoe serve`` without Ray: what it starts and binds is recorded; Ctrl-C comes at once."""
    record: dict[str, list] = {"started": [], "bound": []}
    monkeypatch.setattr("raymoe.actors.runtime.ensure_ray", lambda: record["started"].append("ray"))
    monkeypatch.setattr(serve_module.serve, "start", lambda **kw: record["started"].append("serve"))
    monkeypatch.setattr(serve_module.serve, "run", lambda app, **kw: record["bound"].append(app))
    monkeypatch.setattr(serve_module.serve, "shutdown", lambda: None)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_module, "time", types.SimpleNamespace(sleep=interrupt))
    monkeypatch.delenv("RAYMOE_API_KEY", raising=False)
    return record


def test_raymoe_serve_takes_the_key_from_the_environment_or_a_file(
    fake_serve: dict, served_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    argv = ["serve", "--checkpoint", str(served_checkpoint)]
    assert cli.main(argv) == 0
    (args,) = fake_serve["bound"][-1]._bound_deployment.init_args
    assert (args.api_key_file, args.require_api_key) == (None, False)
    out = capsys.readouterr().out
    assert "Authorization" not in out and "curl http://127.0.0.1:8000/v1/completions" in out

    monkeypatch.setenv("RAYMOE_API_KEY", "the-s3cret")
    assert cli.main(argv) == 0
    (args,) = fake_serve["bound"][-1]._bound_deployment.init_args
    assert (args.api_key_file, args.require_api_key) == (None, True)
    assert "the-s3cret" not in args.model_dump_json()
    out = capsys.readouterr().out
    assert '-H "Authorization: Bearer $RAYMOE_API_KEY"' in out and "the-s3cret" not in out

    monkeypatch.delenv("RAYMOE_API_KEY")
    key_file = tmp_path / "key"
    key_file.write_text("file-s3cret")
    assert cli.main([*argv, "--api-key-file", str(key_file)]) == 0
    (args,) = fake_serve["bound"][-1]._bound_deployment.init_args
    assert (args.api_key_file, args.require_api_key) == (str(key_file), True)
    out = capsys.readouterr().out
    assert f'-H "Authorization: Bearer $(cat {key_file})"' in out and "file-s3cret" not in out


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--api-key", "s3cret"], "--api-key is gone"),
        (["--api-key-file", "/nonexistent/key"], "cannot read the API key file /nonexistent/key"),
        (["--device", "tpu"], "device"),
        (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
    ],
)
def test_raymoe_serve_input_errors_are_one_line(
    fake_serve: dict, served_checkpoint: Path, capsys: pytest.CaptureFixture, extra: list[str], words: str
) -> None:
    argv = ["serve", "--checkpoint", str(served_checkpoint), *extra]
    if extra[0] == "--api-key":
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
    else:
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("raymoe")]  # argparse prints its usage first
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err and "s3cret" not in err
    if extra[0] == "--api-key":
        assert "RAYMOE_API_KEY" in err and "--api-key-file" in err
    assert fake_serve["started"] == []  # Ray never started


def test_the_banner_carries_the_key_by_reference() -> None:
    (_, curl) = banner("raymoe", "0.0.0.0", 9000, None, keyed=True)
    assert curl.startswith("  curl http://0.0.0.0:9000/v1/completions")
    assert '-H "Authorization: Bearer $RAYMOE_API_KEY"' in curl and '-d \'{"model": "raymoe"' in curl
