"""Incremental detokenization: each step decodes only a request's newest tokens, not its whole output.

Decoding the whole output every step costs O(length) per token, O(length²) per request. A
:class:`Detokenizer` decodes a short window instead, ``ids[prefix_offset:]``, and compares it with
the decode of ``ids[prefix_offset:read_offset]`` (the tokens whose text is already out): what the
window adds is the new text. It holds new text back while it ends in U+FFFD, the replacement
character, which is what the decoder gives for the start of a multi-byte character whose last
bytes come in later tokens; once the character is complete, it comes out whole. The window's
start is a point where an earlier decode ended cleanly, so a decoder that depends on context (a
byte-level BPE joining bytes, a SentencePiece one dropping a leading space) sees what the whole
decode would. The usual scheme (vLLM's, Hugging Face's ``TextStreamer``).
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT_CHAR = "\ufffd"  # what a decoder gives for bytes that are not (yet) a whole UTF-8 character


class Detokenizer:
    """Token ids in, the text they add out; ``text`` is all the text out so far.

    Args:
        decode: token ids -> text (the tokenizer's decode, e.g. with ``skip_special_tokens``).

    Invariant: ``text == decode(ids[:read_offset])`` and ``ids[read_offset:]`` are the tokens
    held back (their text ends in an incomplete character). :meth:`flush` gives out the rest, so
    at the end ``text == decode(ids)``.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: the tokens before it are never decoded again
        self.read_offset = 0  # the tokens before it are in ``text``
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; returns the text they complete ("" while it ends in an incomplete character)."""
        self.ids.extend(new_ids)
        done = self.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.decode(self.ids[self.prefix_offset :])
        if len(window) <= len(done) or window.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(window[len(done) :])

    def flush(self) -> str:
        """The text of the held-back tokens as it is (at the end of a request: its trailing U+FFFD too)."""
        if self.read_offset == len(self.ids):
            return ""
        done = self.decode(self.ids[self.prefix_offset : self.read_offset])
        return self._advance(self.decode(self.ids[self.prefix_offset :])[len(done) :])

    def _advance(self, delta: str) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
