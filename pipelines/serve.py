"""``raymoe serve``: the OpenAI-compatible Ray Serve application.

    raymoe serve --checkpoint outputs/demo                    # http://127.0.0.1:8000/v1
    RAYMOE_API_KEY=... raymoe serve --checkpoint ckpt/ --port 9000   # or --api-key-file FILE
    RAYMOE_CHECKPOINT=$PWD/outputs/demo serve run deploy/serve/config.yaml   # the same application

Both start :func:`build_app` (Serve's typed builder: its ``args`` are :class:`ServeArgs`). Each
replica loads the checkpoint and runs one :class:`~raymoe.platform.inference.engine.Engine`
(with the model in the replica, or driving its own actor graph with ``runner: graph``), fed by every
request the replica holds: continuous batching across HTTP requests.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``
(200 while the engine can serve), ``GET /stats`` (the engine's counters: cache use, MTP
acceptance), ``GET /openapi.json`` and ``GET /docs``. Errors are OpenAI's JSON; a full queue is 503
at once; a body over ``max_body_bytes`` is 413. With an API key, every route but ``/health`` needs
``Authorization: Bearer KEY`` (401 otherwise), compared in constant time. Each replica reads the key
itself, from ``api_key_file`` or else ``$RAYMOE_API_KEY`` in its environment, so the key is never
in the Serve config, the deployment's arguments or a command line.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations of the class Serve serializes

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.platform.config import PLACEMENTS
from raymoe.platform.inference import openai_api as api
from raymoe.platform.inference.engine import EngineDead, EngineOverloaded, Output, RequestError
from raymoe.platform.inference.sampling import choice_seed

logger = logging.getLogger(__name__)

CHECKPOINT_ENV = "RAYMOE_CHECKPOINT"
API_KEY_ENV = "RAYMOE_API_KEY"
NO_KEY_ON_THE_COMMAND_LINE = (
    f"the API key is no longer an argument (on a command line or in the Serve config it shows in the process "
    f"list and the deployment's arguments): set ${API_KEY_ENV} in the replicas' environment, or give a file "
    f"that holds it (raymoe serve --api-key-file FILE; api_key_file in the Serve config)"
)

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


GRAPH_PARALLEL = {"pp": int, "ep": int, "num_cpus_per_actor": (int, float), "placement": str}  # ServeArgs.parallel


class ServeArgs(BaseModel):
    """The application's arguments (``args`` in deploy/serve/config.yaml, flags of ``raymoe serve``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="training output, training checkpoint or HF checkpoint dir (or URI)")
    model_name: str = "raymoe"
    api_key_file: str | None = Field(
        None, description=f"a file holding the API key, read by each replica (default: ${API_KEY_ENV})"
    )
    require_api_key: bool = Field(False, description="a replica that finds no API key refuses to start")
    max_body_bytes: int = Field(api.MAX_BODY_BYTES, ge=1, description="larger request bodies get a 413")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="auto (bfloat16 where bf16 products are fast where the model computes, else float32)"
    )
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
    parallel: dict[str, int | float | str] = Field(
        default_factory=lambda: {"pp": 1, "ep": 1},
        description="the graph runner's pp, ep, num_cpus_per_actor and placement (auto | PACK | SPREAD)",
    )
    threads: int | None = Field(None, ge=1, description="torch threads of the replica (default: Ray's)")
    stream_interval_ms: int = Field(20, ge=0, description="tokens of a stream produced within it go as one event")
    compile: bool = Field(False, description="torch.compile small decode steps (local runner; ~30-60 s at start)")
    expert_budget: str | None = Field(
        None, description="bytes the routed experts may hold (e.g. 2GiB, or 25%): hot/warm/cold tiers (local runner)"
    )
    warm_dtype: Literal["fp8", "int8", "int4"] = "int8"
    cold: Literal["offload", "quantized"] = "offload"
    cold_dtype: Literal["fp8", "int8", "int4"] = "int4"
    expert_policy: Literal["frequency", "uniform", "random"] = "frequency"
    expert_eviction: Literal["lru", "lfu"] = "lru"
    expert_prefetch: Literal["auto", "on", "off"] = "auto"
    expert_stats: str | None = Field(None, description="expert loads JSON (default: the checkpoint's)")
    expert_placement: Literal["contiguous", "balanced"] = Field(
        "contiguous", description="graph runner: experts on shards in blocks, or balanced by the expert loads"
    )
    redundant_experts: int = Field(0, ge=0, description="graph runner: extra copies of the hottest experts per layer")
    rebalance_every: int = Field(0, ge=0, description="graph runner: re-place experts from live counts every N steps")

    @model_validator(mode="after")
    def _tiers_run_locally(self) -> "ServeArgs":
        if self.expert_budget is not None and (self.runner != "local" or self.compile):
            raise ValueError("expert_budget (--expert-budget) works with the local runner, without --compile")
        return self

    @model_validator(mode="after")
    def _placement_on_the_graph(self) -> "ServeArgs":
        moved = self.expert_placement != "contiguous" or self.redundant_experts or self.rebalance_every
        if moved and self.runner != "graph":
            raise ValueError("expert_placement, redundant_experts and rebalance_every (--expert-placement, "
                             "--redundant-experts, --rebalance-every) place experts on the graph runner's shards: "
                             "add --runner graph --ep N")  # fmt: skip
        if self.redundant_experts and not (self.expert_placement == "balanced" or self.rebalance_every):
            raise ValueError("redundant_experts (--redundant-experts) copies experts by their loads: add "
                             "--expert-placement balanced or --rebalance-every N")  # fmt: skip
        return self

    def start_loads(self, location: str, model_config: Any) -> Any:
        """[MoE layers, E] loads to place the graph's experts by at the start (``expert_placement`` balanced:
        ``expert_stats`` or the checkpoint's), or None. ValueError names a missing or unfitting file."""
        if self.expert_placement != "balanced":
            return None
        from raymoe.platform.analysis.loads import ExpertLoads, LoadsError, find_loads

        stats = ExpertLoads.load(self.expert_stats) if self.expert_stats else find_loads(location)
        if stats is None:
            raise LoadsError(f"--expert-placement balanced: {location} has no expert loads (no calibration file "
                             f"beside it, no training loads); run raymoe calibrate or pass --expert-stats")  # fmt: skip
        stats.check_against(model_config, self.expert_stats or location)
        return stats.loads

    def torch_dtype(self) -> Any:
        """The torch dtype of the served weights and cache: ``dtype``, with ``auto`` resolved for where the model
        computes (:func:`~raymoe.platform.devices.serve_dtype`): this replica's device (``local``), or the graph's
        actors (CUDA when they reserve GPUs, else the CPU)."""
        import torch

        from raymoe.platform.devices import serve_dtype

        if self.device == "cpu" or self.device.startswith("cuda"):
            where = self.device
        elif self.runner == "graph":
            where = "cuda" if self.gpus_per_actor > 0 else "cpu"
        else:
            where = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = serve_dtype(self.dtype, where)
        if self.dtype == "auto":
            logger.info("dtype=auto on %s: %s", torch.device(where).type, str(dtype).removeprefix("torch."))
        return dtype

    def tier_config(self) -> Any:
        """The :class:`~raymoe.platform.inference.tiers.TierConfig` of the expert flags."""
        from raymoe.platform.inference.tiers import TierConfig

        return TierConfig(budget=self.expert_budget, warm_dtype=self.warm_dtype, cold=self.cold,
                          cold_dtype=self.cold_dtype, policy=self.expert_policy, eviction=self.expert_eviction,
                          prefetch=self.expert_prefetch)  # fmt: skip

    @field_validator("parallel")
    @classmethod
    def _known_parallel(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(GRAPH_PARALLEL))
        if unknown:
            raise ValueError(f"parallel has no {', '.join(unknown)} (it takes {', '.join(GRAPH_PARALLEL)})")
        for key, kind in GRAPH_PARALLEL.items():
            if key in value and not isinstance(value[key], kind):
                raise ValueError(f"parallel.{key} must be {kind.__name__ if isinstance(kind, type) else 'a number'}")
        if value.get("placement", "auto") not in PLACEMENTS:
            raise ValueError(f"parallel.placement must be one of {', '.join(PLACEMENTS)}, got {value['placement']!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_api_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(NO_KEY_ON_THE_COMMAND_LINE)
        return data

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        from raymoe.platform.devices import check_device_name

        check_device_name(value, "device")
        return value


def resolve_api_key(api_key_file: str | None) -> str | None:
    """The API key: the file's content (stripped) when ``api_key_file`` is given, else ``$RAYMOE_API_KEY``;
    None when neither. ValueError for a file that cannot be read, is empty, or holds spaces or non-ASCII."""
    if api_key_file:
        try:
            key = Path(api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the API key file {api_key_file}: {exc}") from None
        where = f"the API key file {api_key_file}"
    else:
        key, where = os.environ.get(API_KEY_ENV, "").strip(), f"${API_KEY_ENV}"
        if not key:
            return None
    if not key:
        raise ValueError(f"{where} is empty")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ValueError(f"{where} must hold printable ASCII without spaces (it is sent as a header)")
    return key


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote back any input (a lone surrogate cannot be UTF-8)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


fastapi_app = FastAPI(
    title="raymoe",
    description="OpenAI-compatible completions on a DeepSeek-V3-style MoE",
    docs_url=None,  # /docs and /openapi.json are the deployment's own routes, behind the API key
    redoc_url=None,
    openapi_url=None,
)


def _error(exc: api.APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _AsciiJSON(exc.body(), status_code=exc.status, headers=headers)


@fastapi_app.exception_handler(api.APIError)
async def _api_error(request: Request, exc: api.APIError) -> JSONResponse:
    """An APIError a route raises (before any response has started), as its OpenAI error response."""
    return _error(exc)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """An unknown route (404) or method (405), in OpenAI's error format too."""
    return _error(api.APIError(exc.status_code, str(exc.detail)))


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, or a 413 once it passes ``limit`` bytes (read no further)."""
    too_large = api.APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        chunks.append(part)
    return b"".join(chunks)


# (defined before the deployment: Serve serializes the class when it is decorated)
def _public_field(field: str, kind: str) -> str:
    if kind == "chat":
        return {"prompt": "messages", "max_tokens": "max_completion_tokens"}.get(field, field)
    return field


def _merge(a: Output, b: Output) -> Output:
    """Two consecutive outputs of one request as one."""
    logprobs = a.logprobs + b.logprobs if a.logprobs is not None and b.logprobs is not None else b.logprobs
    return Output(a.request_id, a.token_ids + b.token_ids, a.text + b.text, b.finished, b.finish_reason,
                  b.prompt_tokens, b.completion_tokens, b.error, logprobs)  # fmt: skip


def _merge_by_request(outs: list[Output]) -> list[Output]:
    """Outputs of several requests (a request's choices), each request's consecutive ones merged, in order."""
    merged: dict[str, Output] = {}
    for out in outs:
        merged[out.request_id] = _merge(merged[out.request_id], out) if out.request_id in merged else out
    return list(merged.values())


def _make_runner(args: ServeArgs, served: Any) -> Any:
    """The replica's runner: the model loaded here (``local``), or an actor graph whose actors load it (``graph``)."""

    from raymoe.platform.inference.runner import LocalRunner, cache_blocks

    blocks = cache_blocks(args.cache_tokens, args.block_size)
    dtype = args.torch_dtype()
    if args.runner == "graph":  # the replica holds no weights: every actor loads its own share
        from raymoe.actors.graph import GraphRunner

        return GraphRunner(served.location, served.model_config, blocks, args.block_size,
                           pp=args.parallel.get("pp", 1), ep=args.parallel.get("ep", 1), dtype=dtype,
                           device=args.device, num_gpus_per_actor=args.gpus_per_actor,
                           num_cpus_per_actor=args.parallel.get("num_cpus_per_actor", 0.0),
                           placement=args.parallel.get("placement", "auto"),
                           expert_loads=args.start_loads(served.location, served.model_config),
                           redundant=args.redundant_experts, rebalance_every=args.rebalance_every)  # fmt: skip
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.devices import resolve_device

    device = resolve_device(args.device, "device")
    if args.expert_budget is not None:  # routed experts in tiers under the budget
        from raymoe.platform.inference.expert_store import load_tiered
        from raymoe.platform.inference.tiers import plan_for_checkpoint

        plan = plan_for_checkpoint(served.location, served.model_config, dtype, args.tier_config(), args.expert_stats)
        model, store = load_tiered(served.reader, plan, dtype, device)
        return LocalRunner(model, blocks, args.block_size, experts=store)
    model = load_model(served.reader, dtype=dtype, device=device)
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

        key = resolve_api_key(args.api_key_file)  # in this replica's process: the key never crosses Serve
        if key is None and args.require_api_key:
            raise RuntimeError(f"no API key: set ${API_KEY_ENV} in the replica's environment, or api_key_file")
        self._api_key = key.encode() if key else None
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.created = api.now()
        self.served = open_served(args.checkpoint)
        tok = self.served.tokenizer
        self.pieces = api.TokenPieces(tok)
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
        logger.info("serving %s as '%s' (%s runner, API key %s)", self.served.location, args.model_name,
                    args.runner, "required" if key else "off")  # fmt: skip

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
        """401 unless the request carries the key (compared in constant time); nothing to check without one."""
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise api.APIError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise api.APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _prompt_ids(self, parsed: api.ParsedRequest) -> list[int]:
        if parsed.prompt_ids is not None:
            return parsed.prompt_ids
        text = parsed.prompt_text
        if parsed.kind == "chat":
            text = api.render_chat(self.served.chat_template, text)
        try:
            ids = self.served.tokenizer.encode(text).ids
        except Exception as exc:  # e.g. a lone surrogate, which is no UTF-8
            raise api.invalid(_public_field("prompt", parsed.kind), f"the prompt cannot be encoded: {exc}") from None
        if not ids:
            raise api.invalid(_public_field("prompt", parsed.kind), "the prompt encodes to no tokens")
        return ids

    def _submit(self, parsed: api.ParsedRequest) -> tuple[str, list[str], list[int], asyncio.Queue]:
        """Queue the request's ``n`` choices (one engine request each) on one queue of outputs."""
        prompt = self._prompt_ids(parsed)
        context = self.engine.max_model_len()
        params = parsed.params
        if len(prompt) < context:  # as OpenAI does: at most up to the context, then finish_reason "length"
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens, context - len(prompt)))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        rid = api.new_id(parsed.kind)
        rids: list[str] = []
        try:
            for i in range(parsed.n):
                choice = dataclasses.replace(params, seed=choice_seed(params.seed, i))
                on_output = lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)  # noqa: E731
                rids.append(self.engine.submit(prompt, choice, on_output, f"{rid}-{i}"))
        except (RequestError, EngineOverloaded, EngineDead) as exc:
            for submitted in rids:
                self.engine.abort(submitted)
            if isinstance(exc, RequestError):
                raise api.invalid(_public_field(exc.field, parsed.kind), str(exc), code=exc.code) from None
            if isinstance(exc, EngineOverloaded):
                raise api.APIError(503, f"the server is overloaded, retry later: {exc}") from None
            raise api.APIError(503, f"this replica cannot serve: {exc}") from None
        return rid, rids, prompt, queue

    async def _outputs(self, rids: list[str], queue: asyncio.Queue, interval_s: float = 0.0) -> AsyncIterator:
        """Lists of the request's outputs (of all its choices), until every choice has finished; with
        ``interval_s``, what arrives within it after the first goes as one list, each choice's outputs
        merged (fewer, larger stream events: each costs the replica and the proxy the same)."""
        pending = set(rids)
        last = None
        try:
            while pending:
                outs = [await queue.get()]
                if last is not None and interval_s > 0 and not outs[0].finished:
                    await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - last)))
                while not queue.empty():
                    outs.append(queue.get_nowait())
                outs = _merge_by_request(outs)
                for out in outs:
                    if out.finished:
                        pending.discard(out.request_id)
                    if out.error:
                        raise RuntimeError(out.error)
                last = time.monotonic()
                yield outs
        finally:
            for rid in pending:  # the client went away, the handler was cancelled, or a choice failed
                self.engine.abort(rid)

    async def _complete(self, request: Request, kind: str) -> Any:
        self._authorize(request)  # an APIError from here to _submit is the answer (_api_error)
        body = api.parse_json(await _read_body(request, self.args.max_body_bytes))
        parse = api.parse_chat if kind == "chat" else api.parse_completion
        parsed = parse(body, self.args.model_name, self.args.max_tokens)
        rid, rids, prompt, queue = self._submit(parsed)
        created = api.now()
        if parsed.stream:
            return StreamingResponse(
                self._stream(parsed, rid, rids, len(prompt), queue, created), media_type="text/event-stream"
            )
        choices = {r: api.Choice(i, logprobs=[] if parsed.params.logprobs is not None else None)
                   for i, r in enumerate(rids)}  # fmt: skip
        try:
            async for outs in self._outputs(rids, queue):
                for out in outs:
                    c = choices[out.request_id]
                    c.text += out.text
                    c.finish_reason, c.completion_tokens = out.finish_reason, out.completion_tokens
                    if c.logprobs is not None and out.logprobs:
                        c.logprobs += out.logprobs
        except RuntimeError as exc:
            return _error(api.APIError(500, f"generation failed: {exc}"))
        use = api.usage(len(prompt), sum(c.completion_tokens for c in choices.values()))
        return api.response(kind, rid, self.args.model_name, list(choices.values()), use, created, self.pieces)

    async def _stream(self, parsed: api.ParsedRequest, rid: str, rids: list[str], n_prompt: int,
                      queue: asyncio.Queue, created: int):  # fmt: skip
        """OpenAI's stream: chunks of each choice (by index); with include_usage, ``usage: null`` on each and
        a last chunk with no choices and the usage; then ``[DONE]``."""
        kind, model = parsed.kind, self.args.model_name
        use: Any = None if parsed.include_usage else ...
        choices = {r: api.Choice(i) for i, r in enumerate(rids)}
        if kind == "chat":
            for c in choices.values():
                yield api.sse(api.chunk(kind, rid, model, created, c.index, "", role=True, use=use))
        try:
            async for outs in self._outputs(rids, queue, self.args.stream_interval_ms / 1000):
                for out in outs:
                    c = choices[out.request_id]
                    c.completion_tokens = out.completion_tokens
                    if not (out.text or out.finished or out.logprobs):
                        continue
                    logprobs = api.format_logprobs(kind, out.logprobs, self.pieces, c.text_offset)
                    c.text_offset += sum(len(self.pieces(t)[0]) for t in out.token_ids) if out.logprobs else 0
                    yield api.sse(api.chunk(kind, rid, model, created, c.index, out.text, out.finish_reason,
                                            logprobs=logprobs, use=use))  # fmt: skip
            if parsed.include_usage:
                total = api.usage(n_prompt, sum(c.completion_tokens for c in choices.values()))
                yield api.sse(api.chunk(kind, rid, model, created, use=total, no_choices=True))
        except RuntimeError as exc:  # generation failed mid-stream: say so in the stream, then end it
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
        self._authorize(request)
        return api.models_list(self.args.model_name, self.created)

    @fastapi_app.get("/health")
    async def health(self) -> Any:
        if self.engine.dead:
            return JSONResponse({"status": "dead", "error": self.engine.dead}, status_code=503)
        return {"status": "ok"}

    @fastapi_app.get("/stats")
    async def stats(self, request: Request) -> Any:
        self._authorize(request)
        return {**self.engine.stats(), **self.runner.stats(), "pid": os.getpid(), "checkpoint": self.served.location}

    @fastapi_app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        self._authorize(request)
        return fastapi_app.openapi()

    @fastapi_app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        """Swagger UI with the schema inline (``spec``), so that the page needs no second, keyless request."""
        self._authorize(request)
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="raymoe",
                                   swagger_ui_parameters={"spec": fastapi_app.openapi()})  # fmt: skip


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application (Serve's builder: ``import_path: raymoe.pipelines.serve:build_app``).

    ``RAYMOE_CHECKPOINT``, when set, overrides ``checkpoint``. The API key is not an argument: each
    replica reads ``api_key_file`` or ``$RAYMOE_API_KEY`` in its own environment."""
    if os.environ.get(CHECKPOINT_ENV):
        args = args.model_copy(update={"checkpoint": os.environ[CHECKPOINT_ENV]})
    return RaymoeServer.bind(args)


# --------------------------------------------------------------------------- raymoe serve


class _RemovedFlag(argparse.Action):
    """A flag that is gone: using it is an error that says what to do instead."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        parser.error(f"{option_string} is gone: {NO_KEY_ON_THE_COMMAND_LINE}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (Ray Serve)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="training output, checkpoint, or HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help=f"require the bearer key this file holds (default: ${API_KEY_ENV} when set; the key is never "
                   "a flag)")  # fmt: skip
    p.add_argument("--api-key", nargs="?", action=_RemovedFlag, help=argparse.SUPPRESS)
    p.add_argument("--model-name", default="raymoe", help="the model id clients name (default raymoe)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto (bfloat16 where bf16 products are fast, else float32; default)")  # fmt: skip
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
    g = p.add_argument_group("routed experts under a memory budget (local runner; docs/expert-tiers.md)")
    g.add_argument("--expert-budget", metavar="SIZE",
                   help="bytes the routed experts may hold, e.g. 2GiB or 25%% (of all of them in --dtype); the "
                   "most-used stay in --dtype, then warm ones quantized, the rest cold")  # fmt: skip
    g.add_argument("--warm-dtype", default="int8", help="fp8 | int8 | int4 (default int8)")
    g.add_argument(
        "--cold",
        default="offload",
        help="offload (read from the checkpoint when chosen; default) | quantized (held in --cold-dtype)",
    )
    g.add_argument("--cold-dtype", default="int4", help="with --cold quantized: fp8 | int8 | int4 (default int4)")
    g.add_argument("--expert-policy", default="frequency",
                   help="which experts rank first: frequency (the loads of --expert-stats or the checkpoint's; "
                   "default) | uniform | random")  # fmt: skip
    g.add_argument(
        "--expert-stats", metavar="FILE", help="expert loads JSON (raymoe calibrate); default: the checkpoint's"
    )
    g.add_argument("--expert-eviction", default="lru", help="the expert cache's eviction: lru (default) | lfu")
    g.add_argument(
        "--prefetch",
        default="auto",
        help="prefetch the next layer's experts by its gate: auto (on CUDA only; default) | on | off",
    )
    g = p.add_argument_group("experts on the graph runner's shards (--runner graph; docs/expert-placement.md)")
    g.add_argument(
        "--expert-placement",
        default="contiguous",
        help="contiguous (blocks; default) | balanced (by --expert-stats or the checkpoint's loads)",
    )
    g.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        metavar="R",
        help="extra copies of the hottest experts per MoE layer, their tokens split among the copies",
    )
    g.add_argument(
        "--rebalance-every",
        type=int,
        default=0,
        metavar="N",
        help="re-place the experts from the live counts every N engine steps (0: never; default)",
    )
    p.set_defaults(func=run)


def _one_line(exc: Exception) -> str:
    """An input error as one line (pydantic's are several: each field's location and message)."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
    return str(exc).replace("\n", " ")


def banner(model_name: str, host: str, port: int, api_key_file: str | None, keyed: bool) -> list[str]:
    """What ``raymoe serve`` prints once serving: the URL and a curl that works as pasted (the key by
    reference, ``$RAYMOE_API_KEY`` or the file, never the secret itself)."""
    url = f"http://{host}:{port}"
    lines = [f"raymoe serve: '{model_name}' at {url}/v1 (Ctrl-C stops)"]
    auth = ""
    if keyed:
        source = f"$(cat {api_key_file})" if api_key_file else f"${API_KEY_ENV}"
        auth = f' -H "Authorization: Bearer {source}"'
        lines[0] += f"; every route but /health needs the key ({api_key_file or '$' + API_KEY_ENV})"
    body = json.dumps({"model": model_name, "prompt": "def ", "max_tokens": 32})
    lines.append(f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'")
    return lines


def run(args: argparse.Namespace) -> int:
    from raymoe.actors.runtime import ensure_ray
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.inference.loading import open_served

    def absolute(path: str) -> str:
        return path if "://" in path or path.startswith("models:/") else os.path.abspath(path)

    try:  # every input error is one line, before Ray starts (a wrong path must not fail in a replica)
        key_file = absolute(args.api_key_file) if args.api_key_file else None
        keyed = resolve_api_key(key_file) is not None
        serve_args = ServeArgs(
            checkpoint=absolute(args.checkpoint),
            model_name=args.model_name,
            api_key_file=key_file,
            require_api_key=keyed,  # a replica that cannot find the key must not serve without one
            dtype=args.dtype,
            device=args.device,
            gpus_per_actor=args.gpus_per_actor,
            runner=args.runner,
            parallel={"pp": args.pp, "ep": args.ep},
            speculative=not args.no_speculative,
            threads=args.threads,
            compile=args.compile,
            expert_budget=args.expert_budget,
            warm_dtype=args.warm_dtype,
            cold=args.cold,
            cold_dtype=args.cold_dtype,
            expert_policy=args.expert_policy,
            expert_eviction=args.expert_eviction,
            expert_prefetch=args.prefetch,
            expert_stats=absolute(args.expert_stats) if args.expert_stats else None,
            expert_placement=args.expert_placement,
            redundant_experts=args.redundant_experts,
            rebalance_every=args.rebalance_every,
        )
        served = open_served(serve_args.checkpoint)
        if serve_args.runner == "graph":  # the placement's loads and copies, checked before Ray starts
            from raymoe.actors.placement import balanced_placement, build_placement
            from raymoe.platform.config import ParallelConfig

            parallel = ParallelConfig(pp=args.pp, ep=args.ep)
            loads = serve_args.start_loads(served.location, served.model_config)
            if loads is None:
                import torch

                loads = torch.zeros(len(build_placement(served.model_config, parallel).moe_layers),
                                    served.model_config.n_routed_experts)  # fmt: skip
            balanced_placement(served.model_config, parallel, loads, serve_args.redundant_experts)
        if serve_args.expert_budget is not None:  # the tiers' arithmetic and statistics, checked before Ray starts
            from raymoe.platform.inference.tiers import plan_for_checkpoint

            plan = plan_for_checkpoint(served.location, served.model_config, serve_args.torch_dtype(),
                                       serve_args.tier_config(), serve_args.expert_stats)  # fmt: skip
            print(f"raymoe serve: {plan.summary()}")
    except (CheckpointError, ValueError, OSError) as exc:  # ValidationError is a ValueError; ConfigError too
        print(f"raymoe serve: {_one_line(exc)}", file=sys.stderr)
        return 2
    ensure_ray()  # a local Ray started here passes this environment ($RAYMOE_API_KEY) to the replicas
    serve.start(http_options={"host": args.host, "port": args.port})
    options: dict[str, Any] = {"num_replicas": args.replicas} if args.replicas else {}
    if serve_args.runner == "local" and serve_args.device.startswith("cuda"):  # the replica computes: give it a GPU
        options["ray_actor_options"] = {**DEPLOYMENT_DEFAULTS["ray_actor_options"], "num_gpus": 1}
    app = RaymoeServer.options(**options) if options else RaymoeServer
    serve.run(app.bind(serve_args), name="raymoe", route_prefix="/")
    for line in banner(serve_args.model_name, args.host, args.port, key_file, keyed):
        print(line)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
