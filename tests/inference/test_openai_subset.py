"""The OpenAI subset people use, checked with the ``openai`` client, streaming and not: ``logprobs``
(completions' integer, chat's boolean with ``top_logprobs``), ``n`` choices by index, ``usage`` in
streams only with ``stream_options.include_usage``, and errors whose ``type``, ``code`` and
``param`` are OpenAI's; fields the server does not implement are a 400 naming them."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest
import requests

from raymoe.platform.inference.openai_api import MAX_N

from .conftest import MODEL, deploy, serve_on_a_free_port

PROMPT = "def f(x):"
MESSAGES = [{"role": "user", "content": "def fib(n):"}]
LONG = {"ignore_eos": True}  # always max_tokens tokens


@pytest.fixture(scope="module")
def server(ray_local, served_checkpoint: Path):  # noqa: ANN201
    with serve_on_a_free_port() as url:
        deploy(served_checkpoint, "raymoe", "/", stream_interval_ms=0)
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


# --------------------------------------------------------------------------- logprobs


def test_completion_logprobs_streamed_and_whole(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                      extra_body=LONG)  # fmt: skip
    (choice,) = whole.choices
    lp = choice.logprobs
    # (the untrained model's tokens may be parts of characters or ids past the tokenizer's, whose text is
    # U+FFFD or empty: how they are spelled is test_token_pieces_spell_the_text_exactly's)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and math.isfinite(logprob)
        assert 1 <= len(top) <= 4 and top[token] == logprob  # the top 3, and the chosen token always
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                            stream=True, extra_body=LONG))  # fmt: skip
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset  # offsets run on across chunks
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-5)

    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    zero = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=0)
    assert [list(t) for t in zero.choices[0].logprobs.top_logprobs] == [[t] for t in zero.choices[0].logprobs.tokens]


def test_chat_logprobs_streamed_and_whole(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "extra_body": LONG}
    whole = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    (choice,) = whole.choices
    content = choice.logprobs.content
    assert len(content) == 5
    for e in content:
        assert bytes(e.bytes).decode(errors="replace") == e.token and e.logprob <= 0
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    chunks = list(client.chat.completions.create(**kw, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    bare = client.chat.completions.create(**kw, logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * 5
    assert client.chat.completions.create(**kw).choices[0].logprobs is None


# --------------------------------------------------------------------------- n


def test_n_choices_by_index(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 7, "extra_body": LONG}
    whole = client.completions.create(**kw, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.text for c in whole.choices]
    assert len(set(texts)) > 1  # each choice samples from its own generator (seed + index)
    assert whole.usage.completion_tokens == 24  # summed over the choices; the prompt counts once
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert [c.text for c in client.completions.create(**kw, n=3).choices] == texts  # seeded: reproducible
    assert client.completions.create(**kw, n=1).choices[0].text == texts[0]  # choice 0 is the request's seed

    chunks = list(client.completions.create(**kw, n=3, stream=True, stream_options={"include_usage": True}))
    by_index: dict[int, str] = {}
    for c in chunks[:-1]:
        (ch,) = c.choices
        by_index[ch.index] = by_index.get(ch.index, "") + ch.text
    assert [by_index[i] for i in range(3)] == texts
    assert sum(1 for c in chunks[:-1] if c.choices[0].finish_reason == "length") == 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_n_chat_streams_a_role_per_choice(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "extra_body": LONG}
    whole = client.chat.completions.create(**kw, n=2)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].message.content == whole.choices[1].message.content  # greedy: the same
    chunks = list(client.chat.completions.create(**kw, n=2, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        assert text == whole.choices[i].message.content
    assert all(c.usage is None for c in chunks)


# --------------------------------------------------------------------------- usage in streams


def test_usage_only_when_asked(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True, "extra_body": LONG}
    assert all(c.usage is None for c in client.chat.completions.create(**kw))
    assert all(c.usage is None for c in client.chat.completions.create(**kw, stream_options={"include_usage": False}))
    chunks = list(client.chat.completions.create(**kw, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 3
    assert last.usage.total_tokens == last.usage.prompt_tokens + 3
    assert all(c.usage is None and c.choices for c in body)


# --------------------------------------------------------------------------- errors


def test_errors_as_the_openai_client_sees_them(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="x")
    assert (err.value.code, err.value.param, err.value.type) == ("model_not_found", "model", "invalid_request_error")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools)
    assert (err.value.code, err.value.param, err.value.type) == ("unsupported_parameter", "tools",
                                                                  "invalid_request_error")  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[1] * 600)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "prompt")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens="ten")  # type: ignore[arg-type]
    assert (err.value.code, err.value.param) == ("invalid_type", "max_tokens")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=3)
    assert err.value.param == "top_logprobs" and "logprobs" in err.value.message


def _post(server: str, path: str, body: dict) -> requests.Response:
    return requests.post(f"{server}{path}", json=body, timeout=60)


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
C_BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
CHAT_BODY = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "extra", "param", "code"),
    [
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
        (CHAT, {"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        (CHAT, {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        (CHAT, {"function_call": "auto"}, "function_call", "unsupported_parameter"),
        (CHAT, {"parallel_tool_calls": True}, "parallel_tool_calls", "unsupported_parameter"),
        (CHAT, {"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
        (CHAT, {"logit_bias": {"5": 100}}, "logit_bias", "unsupported_parameter"),
        (CHAT, {"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
        (CHAT, {"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        (CHAT, {"echo": True}, "echo", "unknown_parameter"),  # a completions field
        (CHAT, {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls",
         "unsupported_parameter"),
        (CHAT, {"top_logprobs": 21, "logprobs": True}, "top_logprobs", None),
        (CHAT, {"logprobs": 3}, "logprobs", "invalid_type"),
        (COMPLETIONS, {"logit_bias": {"5": 1}}, "logit_bias", "unsupported_parameter"),
        (COMPLETIONS, {"best_of": 2}, "best_of", "unsupported_parameter"),
        (COMPLETIONS, {"best_of": True}, "best_of", "unsupported_parameter"),  # true is not 1
        (COMPLETIONS, {"echo": True}, "echo", "unsupported_parameter"),
        (COMPLETIONS, {"suffix": "}"}, "suffix", "unsupported_parameter"),
        (COMPLETIONS, {"presence_penalty": -1}, "presence_penalty", "unsupported_parameter"),
        (COMPLETIONS, {"tools": []}, "tools", "unknown_parameter"),  # a chat field
        (COMPLETIONS, {"temprature": 0}, "temprature", "unknown_parameter"),
        (COMPLETIONS, {"logprobs": 6}, "logprobs", None),
        (COMPLETIONS, {"logprobs": True}, "logprobs", "invalid_type"),
        (COMPLETIONS, {"max_completion_tokens": 3}, "max_completion_tokens", "unknown_parameter"),
        (COMPLETIONS, {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
         "invalid_type"),
        (COMPLETIONS, {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
         "invalid_type"),
        (COMPLETIONS, {"stream": True, "stream_options": {"usage": True}}, "stream_options.usage",
         "unknown_parameter"),
        (COMPLETIONS, {"stream_options": {"include_usage": True}}, "stream_options", None),  # stream is false
        (COMPLETIONS, {"n": MAX_N + 1}, "n", None),
        (COMPLETIONS, {"user": 5}, "user", "invalid_type"),
    ],
)  # fmt: skip
def test_fields_not_implemented_are_a_400_naming_them(server: str, path: str, extra: dict, param: str, code) -> None:  # noqa: ANN001
    body = {**(CHAT_BODY if path == CHAT else C_BODY), **extra}
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error", "param": param,
                                                   "code": code}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        (COMPLETIONS, {"echo": False, "best_of": 1, "logit_bias": {}, "suffix": "", "frequency_penalty": 0,
                       "presence_penalty": 0.0, "user": "u-1", "logprobs": None, "n": 1}),
        (CHAT, {"tools": None, "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": None,
                "frequency_penalty": 0, "messages": [{"role": "user", "content": "x", "name": "ann"}],
                "logprobs": False, "store": False}),
    ],
)  # fmt: skip
def test_values_that_ask_for_nothing_are_accepted(server: str, path: str, extra: dict) -> None:
    r = _post(server, path, {**(CHAT_BODY if path == CHAT else C_BODY), **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None


# --------------------------------------------------------------------------- token text


def test_token_pieces_spell_the_text_exactly(served_checkpoint: Path) -> None:
    """Byte-level tokens' bytes are exact, also where a token holds part of a character."""
    from raymoe.platform.inference.loading import open_served
    from raymoe.platform.inference.openai_api import TokenPieces, chat_logprobs, completion_logprobs
    from raymoe.platform.inference.sampling import TokenLogprob

    tok = open_served(str(served_checkpoint)).tokenizer
    pieces = TokenPieces(tok)
    assert pieces.byte_level
    text = "def héllo(wörld): return '→ 😀'"
    ids = tok.encode(text).ids
    assert b"".join(bytes(pieces(i)[1]) for i in ids) == text.encode()
    assert any("\ufffd" in pieces(i)[0] for i in ids)  # the emoji is split across tokens
    assert pieces(tok.token_to_id("<eos>")) == ("<eos>", list(b"<eos>"))
    assert pieces(tok.get_vocab_size() + 3) == ("", [])  # the model's vocabulary is larger
    entries = [TokenLogprob(i, -0.5, [(i, -0.5)]) for i in ids]
    chat = chat_logprobs(entries, pieces)["content"]
    assert b"".join(bytes(e["bytes"]) for e in chat) == text.encode()
    legacy = completion_logprobs(entries[:3], pieces, offset=10)
    assert legacy["text_offset"][0] == 10 and legacy["token_logprobs"] == [-0.5] * 3
