"""The OpenAI-compatible HTTP protocol: request parsing and checks, response and stream chunk shapes.

Plain functions on parsed JSON, so they are tested without a server. A request that is not
valid raises :class:`APIError` with the HTTP status and OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), ``param`` naming the field at fault and
``type``/``code`` as OpenAI sets them (``invalid_request_error`` for every 4xx, ``server_error``
for 5xx; codes such as ``model_not_found``, ``invalid_api_key``, ``context_length_exceeded``,
``unsupported_parameter``, ``unknown_parameter``, ``invalid_type``).

Supported fields (both routes): ``model`` (required), ``max_tokens``, ``temperature`` (below
:data:`~raymoe.platform.inference.sampling.MIN_SAMPLING_TEMPERATURE` greedy), ``top_p``,
``top_k`` (an extension, 0 = off), ``seed``, ``stop``, ``n`` (up to :data:`MAX_N`), ``stream``,
``stream_options`` (``include_usage``, with ``stream`` only), ``user`` (no effect),
``ignore_eos`` (an extension). Completions: ``prompt`` (a string, a list of one string, or a list
of token ids), ``logprobs`` (an integer, 0 to :data:`MAX_COMPLETION_LOGPROBS`). Chat: ``messages``
(roles system/developer/user/assistant, string content or text parts, an optional ``name``),
``max_completion_tokens``, ``logprobs`` (a boolean) and ``top_logprobs`` (0 to
:data:`MAX_TOP_LOGPROBS`). Fields OpenAI has and this server does not implement
(:data:`UNSUPPORTED`: ``tools``, ``response_format``, ``logit_bias``, ``best_of``, ``echo``,
``suffix``, penalties, ...) are a 400 naming the field unless they hold the value that asks for
nothing (``echo: false``, ``best_of: 1``, ...); any other field is a 400 too. Nothing is ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raymoe.platform.inference.sampling import SamplingError, SamplingParams, TokenLogprob

CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_N = 16  # choices per request; each is one sequence of the engine's batch
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on the completions API's `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on the chat API's `top_logprobs`
MAX_BODY_BYTES = 4 * 2**20  # default request body limit (413 beyond): a 128k-token prompt as ids is ~0.9 MB

# Fields of each route; everything else is a 400 (UNSUPPORTED names the ones OpenAI has).
COMMON_FIELDS = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
     "user", "ignore_eos", "logprobs"}
)  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})

# OpenAI's fields this server does not implement, each with the values that ask for nothing (accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None,),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None,),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}
UNSUPPORTED_COMPLETION = ("best_of", "echo", "suffix", "logit_bias", "frequency_penalty", "presence_penalty")
UNSUPPORTED_CHAT = tuple(name for name in UNSUPPORTED if name not in ("best_of", "echo", "suffix"))


class APIError(Exception):
    """An HTTP error in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None, code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ParsedRequest:
    """A checked request: what to generate, and how to answer."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_text: str | None
    prompt_ids: list[int] | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (strict: no NaN or Infinity), or a 400 naming ``body``."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise invalid("body", f"the request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise invalid("body", f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def _show(value: Any) -> str:
    return json.dumps(value)[:80]  # ASCII-escaped, so any input can be quoted back


def _get(body: dict, name: str, kind: str, default: Any = None, where: str | None = None) -> Any:
    """``body[name]`` of type ``kind``; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    check, what = _CHECKS[kind]
    if not check(value):
        where = where or name
        raise invalid(where, f"'{where}' must be {what}, got {_show(value)}", code="invalid_type")
    return value


def _same(value: Any, allowed: Any) -> bool:
    """Equal, and the same kind of JSON value (``true`` is not ``1``, ``0`` is ``0.0``)."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return isinstance(value, bool) and isinstance(allowed, bool) and value == allowed
    if _is_number(value) and _is_number(allowed):
        return value == allowed
    return type(value) is type(allowed) and value == allowed


def _check_fields(body: dict, kind: str) -> None:
    """A 400 for a field this route does not implement (naming it), unless it asks for nothing."""
    known = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    unsupported = UNSUPPORTED_COMPLETION if kind == "completion" else UNSUPPORTED_CHAT
    for name in body:
        if name in known:
            continue
        if name in unsupported:
            if any(_same(body[name], ok) for ok in UNSUPPORTED[name]):
                continue
            raise invalid(name, f"Unsupported parameter: '{name}' is not supported by this server.",
                          code="unsupported_parameter")  # fmt: skip
        shown = _show(name)[1:-1]
        raise invalid(shown, f"Unknown parameter: '{shown}'.", code="unknown_parameter")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise invalid("stop", f"'stop' must be a string or a list of strings, got {_show(stop)}", code="invalid_type")


def _logprobs(body: dict, kind: str) -> int | None:
    """The number of alternatives to report per token (None: no logprobs)."""
    if kind == "completion":  # the legacy API: logprobs is the number of alternatives
        k = _get(body, "logprobs", "int")
        if k is not None and not 0 <= k <= MAX_COMPLETION_LOGPROBS:
            raise invalid("logprobs", f"'logprobs' must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got {k}")
        return k
    wanted = _get(body, "logprobs", "bool", False)
    k = _get(body, "top_logprobs", "int")
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise invalid("top_logprobs", f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k}")
    if k is not None and not wanted:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")
    return (k or 0) if wanted else None


def _sampling(body: dict, kind: str, default_max_tokens: int) -> SamplingParams:
    """The sampling fields; ``max_tokens`` has no upper bound here (the server clamps it to the context)."""
    max_tokens_field = "max_completion_tokens" if kind == "chat" else "max_tokens"
    max_tokens = _get(body, max_tokens_field, "int")
    if max_tokens is None and kind == "chat":
        max_tokens_field = "max_tokens"
        max_tokens = _get(body, "max_tokens", "int")
    params = SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=float(_get(body, "temperature", "number", 1.0)),
        top_p=float(_get(body, "top_p", "number", 1.0)),
        top_k=_get(body, "top_k", "int", 0),
        seed=_get(body, "seed", "int"),
        stop=_stop(body),
        ignore_eos=_get(body, "ignore_eos", "bool", False),
        logprobs=_logprobs(body, kind),
    )
    try:
        params.check()
    except SamplingError as exc:
        name = max_tokens_field if exc.field == "max_tokens" else exc.field
        raise invalid(name, str(exc).replace("max_tokens", name)) from None
    _get(body, "user", "str")
    return params


def _common(body: dict, served_model: str, kind: str) -> tuple[str, bool, bool, int]:
    model = body.get("model")
    if model is None:
        raise invalid("model", "'model' is required")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {_show(model)}", code="invalid_type")
    if model != served_model:
        raise APIError(404, f"the model {_show(model)} does not exist; this server serves '{served_model}'",
                       "model", code="model_not_found")  # fmt: skip
    _check_fields(body, kind)
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "object", None)
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
        for name in options:
            if name not in STREAM_OPTIONS:
                raise invalid(f"stream_options.{_show(name)[1:-1]}", f"Unknown parameter: 'stream_options.{name}'.",
                              code="unknown_parameter")  # fmt: skip
        include_usage = _get(options, "include_usage", "bool", False, where="stream_options.include_usage")
        if _get(options, "include_obfuscation", "bool", False, where="stream_options.include_obfuscation"):
            raise invalid("stream_options.include_obfuscation", "stream obfuscation is not supported by this server",
                          code="unsupported_parameter")  # fmt: skip
    n = _get(body, "n", "int", 1)
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"'n' must be an integer in [1, {MAX_N}], got {n}")
    return model, stream, include_usage, n


def parse_completion(body: dict, served_model: str, default_max_tokens: int) -> ParsedRequest:
    """A ``POST /v1/completions`` body -> ParsedRequest (APIError when invalid)."""
    model, stream, include_usage, n = _common(body, served_model, "completion")
    if "prompt" not in body:
        raise invalid("prompt", "'prompt' is required")
    prompt = body["prompt"]
    text, ids = None, None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "'prompt' is empty")
        text = prompt
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        if not prompt:
            raise invalid("prompt", "'prompt' is empty")
        ids = list(prompt)
    else:
        raise invalid("prompt", "'prompt' must be a non-empty string, a list of one string, or a list of token ids")
    params = _sampling(body, "completion", default_max_tokens)
    return ParsedRequest("completion", model, text, ids, params, stream, include_usage, n)


def parse_chat(body: dict, served_model: str, default_max_tokens: int) -> ParsedRequest:
    """A ``POST /v1/chat/completions`` body -> ParsedRequest with the messages in ``prompt_text`` as JSON."""
    model, stream, include_usage, n = _common(body, served_model, "chat")
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of {role, content} objects")
    normalized = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"'{where}' must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {_show(role)}")
        for key in m:
            if key not in MESSAGE_FIELDS:
                shown = _show(key)[1:-1]
                raise invalid(f"{where}.{shown}", f"'{shown}' in {where} is not supported by this server",
                              code="unsupported_parameter")  # fmt: skip
        name = _get(m, "name", "str", where=f"{where}.name")
        content = m.get("content")
        if isinstance(content, list):  # text parts
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise invalid(f"{where}.content[{j}]", f"'{where}.content[{j}]' must be a text part")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise invalid(f"{where}.content", f"'{where}.content' must be a string or a list of text parts")
        normalized.append({"role": role, "content": content, **({"name": name} if name is not None else {})})
    params = _sampling(body, "chat", default_max_tokens)
    return ParsedRequest("chat", model, json.dumps(normalized), None, params, stream, include_usage, n)


def render_chat(template: str, messages_json: str) -> str:
    """The prompt text of a conversation under a Jinja chat template (sandboxed)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    try:
        return env.from_string(template).render(
            messages=json.loads(messages_json), add_generation_prompt=True, bos_token="", eos_token=""
        )
    except Exception as exc:  # a template's own error (raise_exception, undefined names)
        raise invalid("messages", f"the chat template rejected the messages: {exc}") from None


# --------------------------------------------------------------------------- token text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character each byte is spelled with in a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return chars


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class TokenPieces:
    """Each token id's text and UTF-8 bytes, as OpenAI's logprobs show them (cached).

    A byte-level BPE token's bytes are exact (one token may hold part of a character; its text then
    has U+FFFD); other tokenizers' bytes are those of the token's decoded text."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import decoders

        self.tokenizer = tokenizer
        self.byte_level = tokenizer is not None and isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            self._cache[token_id] = self._piece(token_id)
        return self._cache[token_id]

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            return "", []
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:  # an id of the model's vocabulary beyond the tokenizer's
            return "", []
        if self.byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
        else:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


def completion_logprobs(entries: list[TokenLogprob], pieces: TokenPieces, offset: int = 0) -> dict[str, Any]:
    """The completions API's ``logprobs`` of some tokens; ``offset``: the text's length before the first."""
    tokens, offsets, top = [], [], []
    for e in entries:
        text = pieces(e.token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        alternatives = {pieces(t)[0]: lp for t, lp in e.top}
        alternatives[text] = e.logprob  # OpenAI: the chosen token's logprob is always there
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}  # fmt: skip


def chat_logprobs(entries: list[TokenLogprob], pieces: TokenPieces) -> dict[str, Any]:
    """The chat API's ``logprobs``: ``content`` holds one entry per token."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = pieces(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Choice:
    """One choice of an answer, as it accumulates."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    text_offset: int = 0  # a stream's text so far (the completions API's text_offset)


def format_logprobs(kind: str, entries: list[TokenLogprob] | None, pieces: TokenPieces, offset: int = 0):  # noqa: ANN201
    if entries is None:
        return None
    return chat_logprobs(entries, pieces) if kind == "chat" else completion_logprobs(entries, pieces, offset)


def response(kind: str, rid: str, model: str, choices: list[Choice], use: dict, created: int,
             pieces: TokenPieces) -> dict:  # fmt: skip
    """The whole (non-streamed) answer."""
    out = []
    for c in choices:
        if kind == "chat":
            choice: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": c.text}}
        else:
            choice = {"index": c.index, "text": c.text}
        choice["logprobs"] = format_logprobs(kind, c.logprobs, pieces)
        choice["finish_reason"] = c.finish_reason
        out.append(choice)
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": out, "usage": use}


def chunk(kind: str, rid: str, model: str, created: int, index: int = 0, text: str | None = None,
          finish_reason: str | None = None, role: bool = False, logprobs: dict | None = None,
          use: Any = ..., no_choices: bool = False) -> dict:  # fmt: skip
    """One server-sent event's payload, as OpenAI streams it. ``use``: the ``usage`` field (left out when
    not given; null on every chunk but the last of a stream that asked for usage)."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model}
    out["choices"] = [] if no_choices else [choice]
    if use is not ...:
        out["usage"] = use
    return out


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "raymoe"}]}


def now() -> int:
    return int(time.time())
