"""No request breaks the server. A property-based fuzzer (hypothesis) sends hundreds of generated
requests to the real HTTP app: valid-ish and malformed JSON, wrong types, extreme numbers, unicode
(lone surrogates included), unknown fields. Every answer is a 2xx (a whole stream, ``[DONE]`` last)
or a 4xx with OpenAI's error body, and the server answers a normal request at the end. Then the
cases issue 15 found, one by one: ``temperature=1e-40`` beside a concurrent stream (it made every
later request 503 and /health dead), seeds past the generator's range, ``max_tokens`` past the
context (clamped, ``finish_reason: "length"``), bodies over the byte limit (413).

Two applications of the tiny checkpoint: ``/`` with the default limits and ``/fuzz`` with a small
cache (128 tokens) and ``max_tokens`` 4 by default, so that no fuzzed request generates for long.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
from pathlib import Path

import hypothesis.strategies as st
import pytest
import requests
from hypothesis import HealthCheck, given, note, settings

from .conftest import MODEL, deploy, serve_on_a_free_port

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# make test: the same 300 examples every run (derandomized); RAYMOE_FUZZ_EXAMPLES=N: N fresh random ones
FUZZ_EXAMPLES = int(os.environ.get("RAYMOE_FUZZ_EXAMPLES", "300"))
FUZZ_RANDOM = "RAYMOE_FUZZ_EXAMPLES" in os.environ


@pytest.fixture(scope="module")
def server(ray_local, served_checkpoint: Path):  # noqa: ANN201
    with serve_on_a_free_port() as url:
        deploy(served_checkpoint, "raymoe", "/")
        deploy(served_checkpoint, "fuzz", "/fuzz", cache_tokens=128, max_tokens=4, stream_interval_ms=0)
        yield url


def _stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=10).json()


def _read(r: requests.Response) -> list[str]:
    """The data of a stream's events."""
    events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] for e in events]


# --------------------------------------------------------------------------- the fuzzer

ODD_STRINGS = ["", " ", "\ud800", "\udfff", "\x00", "é", "😀", "<eos>", "<|user|>", "{{ 7*7 }}", "{% raise %}",
               "\u202e", "a" * 300, MODEL, MODEL.upper(), "null"]  # fmt: skip
EXTREME_INTS = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**30)])
EXTREME_FLOATS = st.sampled_from([1e-40, 1e-5, 0.0, -0.0, 2.0, 2.0000001, 1e308, -1e308, 5e-324])
LEAVES = (
    st.none() | st.booleans() | st.integers() | EXTREME_INTS | st.floats(allow_nan=False, allow_infinity=False)
    | EXTREME_FLOATS | st.text(max_size=12) | st.sampled_from(ODD_STRINGS)
)  # fmt: skip
JUNK = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
TEXT = st.text(max_size=24) | st.sampled_from(ODD_STRINGS)


def valid_or_junk(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value of the field's type and range, sometimes anything at all."""
    return st.one_of(valid, valid, valid, JUNK)


ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", ""])
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {"role": valid_or_junk(ROLES), "content": valid_or_junk(TEXT | st.lists(PART, max_size=2))},
    optional={"name": valid_or_junk(TEXT), "tool_calls": JUNK},
)
WORDS = st.text(min_size=1, max_size=24)  # any unicode but lone surrogates
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": WORDS})
GOOD_PROMPT = WORDS | st.lists(st.integers(0, 511), min_size=1, max_size=16)
# each field's well-formed values (what a careful client sends) ...
VALID: dict[str, st.SearchStrategy] = {
    "max_tokens": st.integers(1, 4),
    "max_completion_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2) | EXTREME_FLOATS.filter(lambda t: 0 <= t <= 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 600),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": WORDS | st.lists(WORDS, max_size=4),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.integers(0, 5) | st.booleans(),  # an integer for completions, a boolean for chat
    "top_logprobs": st.integers(0, 20),
    "ignore_eos": st.booleans(),
    "user": WORDS,
    "echo": st.just(False),
    "best_of": st.just(1),
    "suffix": st.just(""),
    "logit_bias": st.just({}),
    "frequency_penalty": st.just(0),
    "presence_penalty": st.just(0.0),
    "tools": st.none(),
    "tool_choice": st.just("none"),
    "response_format": st.just({"type": "text"}),
    "functions": st.none(),
}
# ... and what a careless or hostile one sends: mostly the right type, often out of range, sometimes anything
FIELDS: dict[str, st.SearchStrategy] = {name: valid_or_junk(valid) for name, valid in VALID.items()}
FIELDS |= {
    "max_tokens": FIELDS["max_tokens"] | EXTREME_INTS,
    "max_completion_tokens": FIELDS["max_completion_tokens"] | EXTREME_INTS,
    "temperature": FIELDS["temperature"] | EXTREME_FLOATS,
    "top_p": FIELDS["top_p"] | EXTREME_FLOATS,
    "top_k": FIELDS["top_k"] | EXTREME_INTS,
    "seed": FIELDS["seed"] | EXTREME_INTS,
    "n": FIELDS["n"] | EXTREME_INTS,
    "top_logprobs": FIELDS["top_logprobs"] | EXTREME_INTS,
    "stream_options": FIELDS["stream_options"]
    | st.fixed_dictionaries({}, optional={"include_usage": JUNK, "include_obfuscation": st.booleans()}),
    "echo": valid_or_junk(st.booleans()),
    "best_of": valid_or_junk(st.integers(0, 3)),
    "suffix": valid_or_junk(TEXT),
    "logit_bias": valid_or_junk(st.dictionaries(st.integers(0, 600).map(str), st.integers(-100, 100), max_size=2)),
    "frequency_penalty": valid_or_junk(st.floats(-2, 2)),
    "presence_penalty": valid_or_junk(st.floats(-2, 2)),
    "tools": JUNK,
    "tool_choice": valid_or_junk(st.sampled_from(["none", "auto", "required"])),
    "response_format": valid_or_junk(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
    "functions": JUNK,
}
PROMPT = valid_or_junk(TEXT | st.lists(st.integers(-3, 600), max_size=16) | st.lists(TEXT, max_size=2))
ROUTE_FIELDS = {  # the fields of VALID each route has (and how a well-formed request combines them)
    COMPLETIONS: ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "user", "echo", "best_of",
                  "suffix", "logit_bias", "frequency_penalty", "presence_penalty"],
    CHAT: ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "user",
           "logit_bias", "frequency_penalty", "presence_penalty", "tools", "tool_choice", "response_format",
           "functions"],
}  # fmt: skip


@st.composite
def well_formed(draw: st.DrawFn, path: str) -> dict:
    """A request a careful client could send: a few of its route's fields, streamed or not, logprobs or not."""
    body: dict = {"model": MODEL}
    if path == CHAT:
        body["messages"] = draw(st.lists(GOOD_MESSAGE, min_size=1, max_size=3))
    else:
        body["prompt"] = draw(GOOD_PROMPT)
    for name in draw(st.lists(st.sampled_from(ROUTE_FIELDS[path]), max_size=4, unique=True)):
        body[name] = draw(VALID[name])
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = draw(VALID["stream_options"])
    if draw(st.integers(0, 2)) == 0:
        if path == CHAT:
            body["logprobs"] = True
            if draw(st.booleans()):
                body["top_logprobs"] = draw(VALID["top_logprobs"])
        else:
            body["logprobs"] = draw(st.integers(0, 5))
    return body


@st.composite
def requests_(draw: st.DrawFn) -> tuple[str, bytes]:
    """(route, body bytes): half the time a well-formed request with at most one field gone wrong, else a
    JSON object with a few fields of any sort, or a malformed body."""
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    if draw(st.booleans()):  # well-formed, but for at most one field
        body = draw(well_formed(path))
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(FIELDS)))
            body[name] = draw(FIELDS[name])
        return path, json.dumps(body).encode()
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True))
    body = {}
    if draw(st.integers(0, 9)):
        body["model"] = MODEL if draw(st.integers(0, 9)) else draw(JUNK)
    if draw(st.integers(0, 9)):
        if path == CHAT:
            body["messages"] = draw(valid_or_junk(st.lists(MESSAGE, min_size=1, max_size=3)))
        else:
            body["prompt"] = draw(PROMPT)
    body |= {name: draw(FIELDS[name]) for name in names}
    if not draw(st.integers(0, 9)):
        body[draw(st.text(max_size=8))] = draw(JUNK)  # an unknown field
    form = draw(st.integers(0, 9))
    text = json.dumps(body)
    if form == 0:
        return path, draw(st.binary(max_size=64))
    if form == 1:
        return path, text[: draw(st.integers(0, max(len(text) - 1, 0)))].encode()  # cut short
    if form == 2:
        return path, json.dumps(draw(JUNK)).encode()  # any JSON, rarely an object
    if form == 3:
        return path, json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")  # maybe not UTF-8
    if form == 4:
        return path, text.replace("1", "NaN", 1).replace("0", "1e999", 1).encode()  # JSON's non-numbers
    return path, text.encode()


def _check_answer(r: requests.Response, sent: bytes) -> str:
    """Check one answer; its kind: "stream", "whole" or "refused"."""
    note(f"sent {sent[:500]!r}; status {r.status_code}")
    if 200 <= r.status_code < 300:
        if r.headers["content-type"].startswith("text/event-stream"):
            data = _read(r)
            assert data[-1] == "[DONE]", data
            for payload in map(json.loads, data[:-1]):
                assert "error" not in payload, payload  # a failure mid-stream
            return "stream"
        body = r.json()
        assert body["choices"] and all(c["finish_reason"] in ("stop", "length") for c in body["choices"]), body
        return "whole"
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str) and error["message"]
    assert error["param"] is None or isinstance(error["param"], str)
    return "refused"


def test_no_generated_request_breaks_the_server(server: str) -> None:
    url = f"{server}/fuzz"
    kinds: collections.Counter[str] = collections.Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not FUZZ_RANDOM, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(request=requests_())
    def one(request: tuple[str, bytes]) -> None:
        path, data = request
        with requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60,
                           stream=True) as r:  # fmt: skip
            kinds[_check_answer(r, data)] += 1

    one()
    print(f"fuzzed answers: {dict(kinds)}")
    # the generated requests reach generation too, whole and streamed, not only the parser's refusals
    assert kinds["whole"] >= FUZZ_EXAMPLES // 10 and kinds["stream"] >= FUZZ_EXAMPLES // 20, kinds
    ok = requests.post(f"{url}{COMPLETIONS}", json={"model": MODEL, "prompt": "def ", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    stats = _stats(url)
    assert stats["request_errors"] == 0 and stats["cache_blocks_used"] == 0 and stats["running"] == 0


# --------------------------------------------------------------------------- the cases of issue 15


def test_a_tiny_temperature_is_greedy_and_a_concurrent_stream_goes_on(server: str) -> None:
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 8, "ignore_eos": True}
    greedy = requests.post(f"{server}{COMPLETIONS}", json={**body, "temperature": 0}, timeout=60).json()

    def stream() -> list[str]:
        long = {**body, "max_tokens": 150, "temperature": 0.8, "seed": 3, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with requests.post(f"{server}{COMPLETIONS}", json=long, stream=True, timeout=120) as r:
            assert r.status_code == 200
            return _read(r)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream)
        for temperature in (1e-40, 1e-30, 5e-324):
            r = requests.post(f"{server}{COMPLETIONS}", json={**body, "temperature": temperature}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
        data = streaming.result(timeout=120)
    assert data[-1] == "[DONE]" and all("error" not in json.loads(d) for d in data[:-1])
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 150  # the stream was not cut off
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    assert _stats(server)["request_errors"] == 0


@pytest.mark.parametrize(("seed", "status"), [(2**64 - 1, 200), (-(2**63), 200), (2**64, 400), (-(2**63) - 1, 400),
                                              (2**70, 400)])  # fmt: skip
def test_seeds_outside_the_generators_range_are_a_400(server: str, seed: int, status: int) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0.7, "seed": seed}
    r = requests.post(f"{server}{COMPLETIONS}", json=body, timeout=60)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("max_tokens", [100, 10**30])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_past_the_context_is_clamped(server: str, max_tokens: int, stream: bool) -> None:
    """The tiny model's context is 512: a 500-token prompt leaves 12, and the choice ends with "length"."""
    body = {"model": MODEL, "prompt": [5] * 500, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        r = requests.post(f"{server}{COMPLETIONS}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12 and r.json()["choices"][0]["finish_reason"] == "length"
        return
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{server}{COMPLETIONS}", json=body, stream=True, timeout=60) as r:
        data = [json.loads(d) for d in _read(r)[:-1]]
    assert data[-2]["choices"][0]["finish_reason"] == "length" and data[-1]["usage"]["completion_tokens"] == 12


def test_a_body_over_the_limit_is_a_413(server: str) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * (5 * 2**20)}).encode()
    r = requests.post(f"{server}{COMPLETIONS}", data=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: the limit is counted while reading
        for i in range(0, len(big), 2**16):
            yield big[i : i + 2**16]

    r = requests.post(f"{server}{CHAT}", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert requests.post(f"{server}{COMPLETIONS}", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                         timeout=60).status_code == 200  # fmt: skip


@pytest.mark.parametrize(
    ("path", "data", "param"),
    [
        (COMPLETIONS, b'{"model": "raymoe", "prompt": "x", "temperature": NaN}', "body"),
        (COMPLETIONS, b'{"model": "raymoe", "prompt": "x", "top_p": Infinity}', "body"),
        (COMPLETIONS, b"[" * 100_000 + b"]" * 100_000, "body"),
        (COMPLETIONS, b'{"model": "raymoe", "prompt": "\xff\xfe"}', "body"),
        (COMPLETIONS, b'{"model": "raymoe", "prompt": "\\ud800"}', "prompt"),
        (CHAT, b'{"model": "raymoe", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
        (COMPLETIONS, b'{"model": "\\ud800", "prompt": "x"}', "model"),
        (COMPLETIONS, b'{"model": "raymoe", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", "body"),
    ],
)
def test_malformed_bodies_are_a_4xx(server: str, path: str, data: bytes, param: str) -> None:
    r = requests.post(f"{server}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_routes_and_methods_answer_in_openais_format(server: str) -> None:
    missing = requests.get(f"{server}/v1/engines", timeout=10)
    wrong_method = requests.get(f"{server}{COMPLETIONS}", timeout=10)
    assert (missing.status_code, wrong_method.status_code) == (404, 405)
    for r in (missing, wrong_method):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
