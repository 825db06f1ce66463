"""Incremental detokenization against the whole decode, with the tests' byte-level BPE tokenizer: random
and adversarial ids (multi-byte characters split over tokens, special tokens inside them, invalid
bytes, a real U+FFFD), the window kept short, and the engine's streamed text."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer

from raymoe.platform.inference.detok import REPLACEMENT_CHAR, Detokenizer
from raymoe.platform.inference.engine import Engine, EngineConfig, Output
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams

from .conftest import tiny_model
from hf_reference import train_tokenizer

MULTI_BYTE = "é€😀中\ufffd"  # 2, 3, 4 and 3 bytes, and the replacement character itself (EF BF BD)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_file(str(train_tokenizer(tmp_path_factory.mktemp("detok") / "tokenizer.json")))


@pytest.fixture(scope="module")
def decode(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # as the Serve replica decodes


def check_increments(decode: Callable[[list[int]], str], ids: list[int], steps: list[int]) -> int:
    """Feed ``ids`` in chunks of ``steps`` tokens; at every point where the whole decode has no trailing
    U+FFFD the increments so far must equal it, and after ``flush`` they must equal the whole decode.
    Returns the number of points compared."""
    detok = Detokenizer(decode)
    out, at, compared = "", 0, 0
    for n in steps:
        out += detok.add(ids[at : at + n])
        at += n
        assert out == detok.text == decode(ids[: detok.read_offset])
        full = decode(ids[:at])
        if not full.endswith(REPLACEMENT_CHAR):
            assert out == full, f"after {at} of {ids}"
            compared += 1
    out += detok.flush()
    assert out == detok.text == decode(ids)
    return compared


def test_tokens_split_multi_byte_characters(tokenizer: Tokenizer) -> None:
    """The premise of the adversarial cases: the tokenizer has no merges for these, so each of their bytes is one
    token and a token's own decode is not a character."""
    ids = tokenizer.encode(MULTI_BYTE).ids
    assert len(ids) == len(MULTI_BYTE.encode()) and tokenizer.decode(ids) == MULTI_BYTE
    assert tokenizer.decode(ids[:1]) == REPLACEMENT_CHAR


def test_random_ids_equal_the_whole_decode(tokenizer: Tokenizer, decode) -> None:  # noqa: ANN001
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    compared = 0
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        steps = [rng.choice((1, 1, 2, 3)) for _ in ids]  # 1 or 2 tokens a step as the engine (MTP), more too
        compared += check_increments(decode, ids, steps)
    assert compared > 3000  # most points compare: random bytes do not all leave a character open


@pytest.mark.parametrize(
    "case",
    ["characters", "specials_inside", "invalid_bytes", "truncated_then_ascii", "replacement_char", "only_specials"],
)
def test_adversarial_ids_equal_the_whole_decode(tokenizer: Tokenizer, decode, case: str) -> None:  # noqa: ANN001
    chars = tokenizer.encode(MULTI_BYTE * 3).ids
    eos, bos = tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<bos>")
    code = tokenizer.encode("def f(x):\n    return x").ids
    e_acute = tokenizer.encode("é").ids  # C3 A9
    euro = tokenizer.encode("€").ids  # E2 82 AC
    ids = {
        "characters": code + chars + code,
        "specials_inside": [euro[0], eos, euro[1], bos, eos, euro[2], *code[:3], e_acute[0], eos, e_acute[1]],
        "invalid_bytes": [e_acute[1], e_acute[1], *code[:2], euro[1], euro[2], e_acute[0], e_acute[0], *code[2:5]],
        "truncated_then_ascii": [euro[0], euro[1], *code[:4], tokenizer.encode("😀").ids[0], *code[4:]],
        "replacement_char": tokenizer.encode("a\ufffd\ufffdb\ufffd").ids,
        "only_specials": [eos, bos, eos],
    }[case]
    for steps in ([1] * len(ids), [2] * len(ids), [len(ids)]):
        check_increments(decode, ids, steps)


def test_each_step_decodes_a_short_window(decode, tokenizer: Tokenizer) -> None:  # noqa: ANN001
    """The point of it: a 1,000-token output is never decoded whole, each step a few tokens."""
    ids = (tokenizer.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n").ids * 100)[:1000]
    ids[500:500] = tokenizer.encode(MULTI_BYTE).ids  # a held-back character widens the window a little
    longest = 0

    def counting(window: list[int]) -> str:
        nonlocal longest
        longest = max(longest, len(window))
        return decode(window)

    detok = Detokenizer(counting)
    text = "".join(detok.add([t]) for t in ids) + detok.flush()
    assert text == decode(ids)
    assert longest <= 8, f"a step decoded {longest} tokens"  # at most a character's bytes on either side


def test_the_engine_streams_the_whole_decode() -> None:
    """The engine's streamed text, step by step, is the decode of its tokens, with and without a stop string."""
    model = tiny_model()
    byte_decode = lambda ids: bytes(0x80 + t % 0x80 if t % 3 else t % 0x80 for t in ids).decode(errors="replace")  # noqa: E731
    engine = Engine(LocalRunner(model, cache_blocks(2048, 16), 16), EngineConfig(cache_tokens=2048), decode=byte_decode)
    outs: dict[str, list[Output]] = {}
    collect = lambda out: outs.setdefault(out.request_id, []).append(out)  # noqa: E731
    plain = SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    engine.submit([5, 6, 7], plain, collect, "plain")
    while engine.step():
        pass
    tokens = sum((o.token_ids for o in outs["plain"]), [])
    text = byte_decode(tokens)
    assert "".join(o.text for o in outs["plain"]) == text and len(tokens) == 40
    assert sum(len(o.text) > 0 for o in outs["plain"]) > 1  # streamed in pieces, not all at the end
    stop = next(text[i : i + 2] for i in range(len(text) // 2, len(text)) if REPLACEMENT_CHAR not in text[i : i + 2])
    engine.submit([5, 6, 7], dataclasses.replace(plain, stop=[stop]), collect, "stop")
    while engine.step():
        pass
    assert "".join(o.text for o in outs["stop"]) == text[: text.find(stop)] and outs["stop"][-1].finish_reason == "stop"
