"""The OpenAI-compatible HTTP protocol: request parsing and checks, response and stream chunk shapes.

Plain functions on parsed JSON, so they are tested without a server. A request that is not
valid raises :class:`APIError` with the HTTP status and OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), ``param`` naming the field at fault.

Supported fields: ``model`` (required), ``prompt`` (a string, a list of one string, or a list of
token ids) or ``messages`` (roles system/user/assistant/developer, string content or text
parts), ``max_tokens`` (``max_completion_tokens`` for chat), ``temperature``, ``top_p``,
``top_k`` (an extension, 0 = off), ``seed``, ``stop``, ``stream``, ``stream_options.include_usage``,
``n`` (1 only), ``ignore_eos`` (an extension); ``user``, ``frequency_penalty`` and
``presence_penalty`` at 0, ``logprobs`` off and ``echo`` false are accepted and have no effect.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from raymoe.platform.inference.sampling import SamplingError, SamplingParams

CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An HTTP error in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None, code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            503: "overloaded_error",
        }.get(status, "server_error")
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


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


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("body", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("body", f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, name: str, kind: str, default: Any = None, nullable: bool = True) -> Any:
    value = body.get(name, default)
    if value is None and nullable:
        return default
    checks = {
        "int": _is_int,
        "number": _is_number,
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "object": lambda v: isinstance(v, dict),
    }
    if not checks[kind](value):
        names = {
            "int": "an integer",
            "number": "a number",
            "bool": "a boolean",
            "str": "a string",
            "object": "an object",
        }
        raise invalid(name, f"'{name}' must be {names[kind]}, got {json.dumps(value)[:80]}")
    return value


def _sampling(body: dict, max_tokens_field: str, default_max_tokens: int, max_tokens_limit: int) -> SamplingParams:
    max_tokens = _get(body, max_tokens_field, "int")
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = _get(body, "max_tokens", "int")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop", f"'stop' must be a string or a list of strings, got {json.dumps(stop)[:80]}")
    params = SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=float(_get(body, "temperature", "number", 1.0)),
        top_p=float(_get(body, "top_p", "number", 1.0)),
        top_k=_get(body, "top_k", "int", 0),
        seed=_get(body, "seed", "int"),
        stop=stop,
        ignore_eos=_get(body, "ignore_eos", "bool", False),
    )
    try:
        params.check(max_tokens_limit)
    except SamplingError as exc:
        field = max_tokens_field if exc.field == "max_tokens" else exc.field
        raise invalid(field, str(exc).replace("max_tokens", field)) from None
    n = _get(body, "n", "int", 1)
    if n != 1:
        raise invalid("n", f"only n=1 is supported, got {n}")
    for name in ("frequency_penalty", "presence_penalty"):
        if _get(body, name, "number", 0) != 0:
            raise invalid(name, f"'{name}' is not supported; leave it at 0")
    if body.get("logprobs") not in (None, False):
        raise invalid("logprobs", "'logprobs' is not supported")
    if body.get("echo") not in (None, False):
        raise invalid("echo", "'echo' is not supported")
    return params


def _common(body: dict, served_model: str) -> tuple[str, bool, bool]:
    model = body.get("model")
    if model is None:
        raise invalid("model", "'model' is required")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {json.dumps(model)[:80]}")
    if model != served_model:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served_model}'", "model",
                       code="model_not_found")  # fmt: skip
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "object", {})
    include_usage = bool(options.get("include_usage", False))
    return model, stream, include_usage


def parse_completion(body: dict, served_model: str, default_max_tokens: int, max_tokens_limit: int) -> ParsedRequest:
    """A ``POST /v1/completions`` body -> ParsedRequest (APIError when invalid)."""
    model, stream, include_usage = _common(body, served_model)
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
    params = _sampling(body, "max_tokens", default_max_tokens, max_tokens_limit)
    return ParsedRequest("completion", model, text, ids, params, stream, include_usage)


def parse_chat(body: dict, served_model: str, default_max_tokens: int, max_tokens_limit: int) -> ParsedRequest:
    """A ``POST /v1/chat/completions`` body -> ParsedRequest with the messages in ``prompt_text`` as JSON."""
    model, stream, include_usage = _common(body, served_model)
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
            raise invalid(f"{where}.role", f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
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
        normalized.append({"role": role, "content": content})
    params = _sampling(body, "max_completion_tokens", default_max_tokens, max_tokens_limit)
    return ParsedRequest("chat", model, json.dumps(normalized), None, params, stream, include_usage)


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


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(kind: str, rid: str, model: str, text: str, finish_reason: str, use: dict, created: int) -> dict:
    """The whole (non-streamed) answer."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
        obj = "text_completion"
    choice["finish_reason"] = finish_reason
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": use}


def chunk(kind: str, rid: str, model: str, created: int, text: str | None, finish_reason: str | None = None,
          role: bool = False, use: dict | None = None, no_choices: bool = False) -> dict:  # fmt: skip
    """One server-sent event's payload, as OpenAI streams it."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model}
    out["choices"] = [] if no_choices else [choice]
    if use is not None:
        out["usage"] = use
    return out


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "raymoe"}]}


def now() -> int:
    return int(time.time())
