"""``raymoe serve``: the OpenAI-compatible Ray Serve application.

    raymoe serve --checkpoint outputs/demo                    # http://127.0.0.1:8000/v1
    raymoe serve --checkpoint ckpt/ --port 9000 --api-key s3cret
    RAYMOE_CHECKPOINT=$PWD/outputs/demo serve run deploy/serve/config.yaml   # the same application

Both start :func:`build_app` (Serve's typed builder: its ``args`` are :class:`ServeArgs`). Each
replica loads the checkpoint and runs one :class:`~raymoe.platform.inference.engine.Engine`
(with the model in the replica, or driving its own actor graph with ``runner: graph``), fed by every
request the replica holds: continuous batching across HTTP requests.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``
(200 while the engine can serve) and ``GET /stats`` (the engine's counters: cache use, MTP
acceptance). Errors are OpenAI's JSON; a full queue is 503 at once; with an API key every
``/v1`` route needs ``Authorization: Bearer KEY`` (401 otherwise).
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations of the class Serve serializes

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from raymoe.platform.inference import openai_api as api
from raymoe.platform.inference.engine import EngineDead, EngineOverloaded, Output, RequestError

logger = logging.getLogger(__name__)

CHECKPOINT_ENV = "RAYMOE_CHECKPOINT"
API_KEY_ENV = "RAYMOE_API_KEY"

# Serve's options of the deployment; deploy/serve/config.yaml states the same values (a test checks)
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 1024,
    "max_queued_requests": 1024,
    "autoscaling_config": {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 32,
        "upscale_delay_s": 30,
        "downscale_delay_s": 300,
    },
    "ray_actor_options": {"num_cpus": 1},
}


class ServeArgs(BaseModel):
    """The application's arguments (``args`` in deploy/serve/config.yaml, flags of ``raymoe serve``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="training output, training checkpoint or HF checkpoint dir (or URI)")
    model_name: str = "raymoe"
    api_key: str | None = None
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    device: str = Field("auto", description="auto (CUDA when the replica or actor sees a GPU) | cpu | cuda")
    gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs each actor of the graph runner reserves (fractions share)"
    )
    max_batch_size: int = Field(32, ge=1)
    cache_tokens: int = Field(65536, ge=1)
    block_size: int = Field(16, ge=1)
    prefill_chunk: int = Field(512, ge=1)
    max_waiting: int = Field(1024, ge=1)
    speculative: bool = True
    max_tokens: int = Field(256, ge=1)
    runner: Literal["local", "graph"] = Field(
        "local", description="where the model runs: this replica, or its actor graph"
    )
    parallel: dict[str, int] = Field(default_factory=lambda: {"pp": 1, "ep": 1})
    threads: int | None = Field(None, ge=1, description="torch threads of the replica (default: Ray's)")
    stream_interval_ms: int = Field(20, ge=0, description="tokens of a stream produced within it go as one event")
    compile: bool = Field(False, description="torch.compile small decode steps (local runner; ~30-60 s at start)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        from raymoe.platform.devices import check_device_name

        check_device_name(value, "device")
        return value


fastapi_app = FastAPI(title="raymoe", description="OpenAI-compatible completions on a DeepSeek-V3-style MoE")


def _error(exc: api.APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


# (defined before the deployment: Serve serializes the class when it is decorated)
def _public_field(field: str, kind: str) -> str:
    if kind == "chat":
        return {"prompt": "messages", "max_tokens": "max_completion_tokens"}.get(field, field)
    return field


def _merge(a: Output, b: Output) -> Output:
    """Two consecutive outputs of one request as one."""
    return Output(a.request_id, a.token_ids + b.token_ids, a.text + b.text, b.finished, b.finish_reason,
                  b.prompt_tokens, b.completion_tokens, b.error)  # fmt: skip


def _make_runner(args: ServeArgs, served: Any) -> Any:
    """The replica's runner: the model loaded here (``local``), or an actor graph whose actors load it (``graph``)."""
    import torch

    from raymoe.platform.inference.runner import LocalRunner, cache_blocks

    blocks = cache_blocks(args.cache_tokens, args.block_size)
    dtype = getattr(torch, args.dtype)
    if args.runner == "graph":  # the replica holds no weights: every actor loads its own share
        from raymoe.actors.graph import GraphRunner

        return GraphRunner(served.location, served.model_config, blocks, args.block_size,
                           pp=args.parallel.get("pp", 1), ep=args.parallel.get("ep", 1), dtype=dtype,
                           device=args.device, num_gpus_per_actor=args.gpus_per_actor)  # fmt: skip
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.devices import resolve_device

    model = load_model(served.reader, dtype=dtype, device=resolve_device(args.device, "device"))
    if args.compile:
        from raymoe.platform.inference.compiled import CompiledLocalRunner

        return CompiledLocalRunner(model, blocks, args.block_size)
    return LocalRunner(model, blocks, args.block_size)


@serve.deployment(name="RaymoeServer", **DEPLOYMENT_DEFAULTS)
@serve.ingress(fastapi_app)
class RaymoeServer:
    """One replica: the model, its engine, and the HTTP routes."""

    def __init__(self, args: ServeArgs) -> None:
        import torch

        from raymoe.platform.inference.engine import Engine, EngineConfig
        from raymoe.platform.inference.loading import open_served

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.created = api.now()
        self.served = open_served(args.checkpoint)
        tok = self.served.tokenizer
        self.runner = _make_runner(args, self.served)
        self.engine = Engine(
            self.runner,
            EngineConfig(
                max_batch_size=args.max_batch_size,
                cache_tokens=args.cache_tokens,
                block_size=args.block_size,
                prefill_chunk=args.prefill_chunk,
                max_waiting=args.max_waiting,
                speculative=args.speculative,
            ),
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
            eos_token_id=self.served.eos_token_id,
        )
        self.engine.start()
        logger.info("serving %s as '%s' (%s runner)", self.served.location, args.model_name, args.runner)

    def check_health(self) -> None:
        """Serve calls this periodically: a dead engine makes Serve replace the replica."""
        if self.engine.dead:
            raise RuntimeError(self.engine.dead)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # -- helpers ----------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.args.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {key}":
            raise api.APIError(
                401, "a valid API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def _limits(self) -> tuple[int, int]:
        return min(self.args.max_tokens, self.engine.max_model_len() - 1), self.engine.max_model_len() - 1

    def _prompt_ids(self, parsed: api.ParsedRequest) -> list[int]:
        if parsed.prompt_ids is not None:
            return parsed.prompt_ids
        text = parsed.prompt_text
        if parsed.kind == "chat":
            text = api.render_chat(self.served.chat_template, text)
        ids = self.served.tokenizer.encode(text).ids
        if not ids:
            raise api.invalid("prompt", "the prompt encodes to no tokens")
        return ids

    def _submit(self, parsed: api.ParsedRequest) -> tuple[str, list[int], asyncio.Queue]:
        prompt = self._prompt_ids(parsed)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        rid = api.new_id(parsed.kind)
        try:
            self.engine.submit(prompt, parsed.params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out), rid)
        except RequestError as exc:
            raise api.invalid(_public_field(exc.field, parsed.kind), str(exc)) from None
        except EngineOverloaded as exc:
            raise api.APIError(503, f"the server is overloaded, retry later: {exc}") from None
        except EngineDead as exc:
            raise api.APIError(503, f"this replica cannot serve: {exc}") from None
        return rid, prompt, queue

    async def _outputs(self, rid: str, queue: asyncio.Queue, interval_s: float = 0.0) -> AsyncIterator[Output]:
        """The request's outputs; with ``interval_s``, those that arrive within it after the first are merged
        into one (fewer, larger stream events: each costs the replica and the proxy the same)."""
        finished = False
        last = None
        try:
            while not finished:
                out = await queue.get()
                if last is not None and interval_s > 0 and not out.finished:
                    await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - last)))
                    while not out.finished and not queue.empty():
                        out = _merge(out, queue.get_nowait())
                finished = out.finished
                if out.error:
                    raise RuntimeError(out.error)
                last = time.monotonic()
                yield out
        finally:
            if not finished:  # the client went away (or the handler was cancelled): free the cache
                self.engine.abort(rid)

    async def _complete(self, request: Request, kind: str) -> Any:
        try:
            self._authorize(request)
            body = api.parse_json(await request.body())
            default_max, limit = self._limits()
            parse = api.parse_chat if kind == "chat" else api.parse_completion
            parsed = parse(body, self.args.model_name, default_max, limit)
            rid, prompt, queue = self._submit(parsed)
        except api.APIError as exc:
            return _error(exc)
        created = api.now()
        if parsed.stream:
            return StreamingResponse(
                self._stream(parsed, rid, len(prompt), queue, created), media_type="text/event-stream"
            )
        text, reason, completion = [], None, 0
        try:
            async for out in self._outputs(rid, queue):
                text.append(out.text)
                reason, completion = out.finish_reason, out.completion_tokens
        except RuntimeError as exc:
            return _error(api.APIError(500, f"generation failed: {exc}"))
        use = api.usage(len(prompt), completion)
        return api.response(kind, rid, self.args.model_name, "".join(text), reason, use, created)

    async def _stream(self, parsed: api.ParsedRequest, rid: str, n_prompt: int, queue: asyncio.Queue, created: int):
        kind, model = parsed.kind, self.args.model_name
        if kind == "chat":
            yield api.sse(api.chunk(kind, rid, model, created, "", role=True))
        try:
            async for out in self._outputs(rid, queue, self.args.stream_interval_ms / 1000):
                use = api.usage(n_prompt, out.completion_tokens) if out.finished else None
                if out.text or out.finished:
                    yield api.sse(api.chunk(kind, rid, model, created, out.text, out.finish_reason, use=use))
            if parsed.include_usage:
                yield api.sse(api.chunk(kind, rid, model, created, None, use=use, no_choices=True))
        except RuntimeError as exc:  # the engine failed mid-stream: say so in the stream, then end it
            yield api.sse(api.APIError(500, f"generation failed: {exc}").body())
        yield api.sse("[DONE]")

    # -- routes -----------------------------------------------------------------------------

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._complete(request, "completion")

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, "chat")

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._authorize(request)
        except api.APIError as exc:
            return _error(exc)
        return api.models_list(self.args.model_name, self.created)

    @fastapi_app.get("/health")
    async def health(self) -> Any:
        if self.engine.dead:
            return JSONResponse({"status": "dead", "error": self.engine.dead}, status_code=503)
        return {"status": "ok"}

    @fastapi_app.get("/stats")
    async def stats(self) -> Any:
        return {**self.engine.stats(), **self.runner.stats(), "pid": os.getpid(), "checkpoint": self.served.location}


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application (Serve's builder: ``import_path: raymoe.pipelines.serve:build_app``).

    ``RAYMOE_CHECKPOINT`` and ``RAYMOE_API_KEY``, when set, override ``checkpoint`` and ``api_key``."""
    updates = {}
    if os.environ.get(CHECKPOINT_ENV):
        updates["checkpoint"] = os.environ[CHECKPOINT_ENV]
    if os.environ.get(API_KEY_ENV):
        updates["api_key"] = os.environ[API_KEY_ENV]
    if updates:
        args = args.model_copy(update=updates)
    return RaymoeServer.bind(args)


# --------------------------------------------------------------------------- raymoe serve


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (Ray Serve)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="training output, checkpoint, or HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this bearer key (or ${API_KEY_ENV})"
    )
    p.add_argument("--model-name", default="raymoe", help="the model id clients name (default raymoe)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when the replica sees a GPU; default) | cpu | cuda (the local runner's replica "
                   "then reserves one GPU)")  # fmt: skip
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs each actor of the graph runner reserves")
    p.add_argument(
        "--runner",
        default="local",
        choices=["local", "graph"],
        help="local: the model in the replica; graph: an actor graph (--pp, --ep) that loads it",
    )
    p.add_argument("--pp", type=int, default=1, help="stages of the graph runner (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert shards of the graph runner (default 1)")
    p.add_argument("--replicas", type=int, help="a fixed number of replicas instead of autoscaling")
    p.add_argument("--no-speculative", action="store_true", help="no MTP speculative decoding")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: Ray's, from num_cpus)")
    p.add_argument("--compile", action="store_true", help="torch.compile decode steps (slow start)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raymoe.actors.runtime import ensure_ray

    serve_args = ServeArgs(
        checkpoint=os.path.abspath(args.checkpoint) if "://" not in args.checkpoint else args.checkpoint,
        model_name=args.model_name,
        api_key=args.api_key,
        dtype=args.dtype,
        device=args.device,
        gpus_per_actor=args.gpus_per_actor,
        runner=args.runner,
        parallel={"pp": args.pp, "ep": args.ep},
        speculative=not args.no_speculative,
        threads=args.threads,
        compile=args.compile,
    )
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.inference.loading import open_served

    try:
        open_served(serve_args.checkpoint)  # a wrong path fails here, in one line, not in a replica
    except (CheckpointError, OSError) as exc:
        print(f"raymoe serve: {exc}", file=sys.stderr)
        return 2
    ensure_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    options: dict[str, Any] = {"num_replicas": args.replicas} if args.replicas else {}
    if serve_args.runner == "local" and serve_args.device.startswith("cuda"):  # the replica computes: give it a GPU
        options["ray_actor_options"] = {**DEPLOYMENT_DEFAULTS["ray_actor_options"], "num_gpus": 1}
    app = RaymoeServer.options(**options) if options else RaymoeServer
    serve.run(app.bind(serve_args), name="raymoe", route_prefix="/")
    print(f"raymoe serve: '{serve_args.model_name}' at http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    print(f"  curl http://{args.host}:{args.port}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{serve_args.model_name}\", \"prompt\": \"def \", \"max_tokens\": 32}}'")  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
