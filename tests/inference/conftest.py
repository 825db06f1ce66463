"""Fixtures of the serving tests: a tiny model with an MTP module, a checkpoint of it with a tokenizer,
and the helpers that put that checkpoint behind Ray Serve over HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from raymoe.platform.config import load_config
from raymoe.platform.model.transformer import DeepseekV3, prepare_for_inference

from hf_reference import train_tokenizer


def tiny_model(seed: int = 0, std: float | None = None) -> DeepseekV3:
    """The ``tiny`` preset (one MTP module, group-limited routing), float32, eval mode."""
    cfg = load_config("tiny").model
    if std is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, initializer_range=std)
    model = DeepseekV3(cfg)
    model.init_weights(seed)
    return prepare_for_inference(model, torch.float32)


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face checkpoint of the tiny model (with its MTP module) and a tokenizer.json."""
    from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint

    root = tmp_path_factory.mktemp("served")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    return save_hf_checkpoint(tiny_model(), root / "ckpt", extra_files=[tokenizer])


# --------------------------------------------------------------------------- Serve over HTTP

MODEL = "raymoe"  # the model name the test apps serve


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_on_a_free_port() -> Iterator[str]:
    """Ray Serve's HTTP proxy on a free port of 127.0.0.1 (on the session's Ray), shut down after: its URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def deploy(checkpoint: Path, name: str, prefix: str, actor_options: dict | None = None, **args: Any) -> None:
    """One replica of the app on the tiny checkpoint in float32 at ``prefix`` (health checked every second)."""
    from ray import serve

    from raymoe.pipelines.serve import RaymoeServer, ServeArgs

    app = RaymoeServer.options(num_replicas=1, autoscaling_config=None, health_check_period_s=1,
                               ray_actor_options={"num_cpus": 0, **(actor_options or {})})  # fmt: skip
    serve.run(app.bind(ServeArgs(checkpoint=str(checkpoint), dtype="float32", **args)), name=name, route_prefix=prefix)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def stubbed_serve(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """``raymoe serve`` with Ray, Serve and the wait stubbed: (what was started, the apps bound)."""
    import types

    from raymoe.pipelines import serve as serve_cli

    started, bound = [], []
    monkeypatch.setattr("raymoe.actors.runtime.ensure_ray", lambda: started.append("ray"))
    monkeypatch.setattr(serve_cli.serve, "start", lambda **kw: started.append("serve"))
    monkeypatch.setattr(serve_cli.serve, "run", lambda app, **kw: bound.append(app))
    monkeypatch.setattr(serve_cli.serve, "shutdown", lambda: None)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt  # Ctrl-C, at once

    monkeypatch.setattr(serve_cli, "time", types.SimpleNamespace(sleep=interrupt))
    return started, bound
