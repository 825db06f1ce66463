"""The domains an analysis routes: the built-in corpus split by what the text is, or the user's corpora.

The default splits the Python standard library's source (:func:`~raymoe.platform.data.corpus.stdlib_files`)
into three domains, by this rule:

- ``tests``: whole files under a ``test``, ``tests`` or ``idle_test`` directory, or named ``test_*.py``;
- ``docs``: the docstrings (module, class and function; ``ast``) and the comments (``tokenize``) of
  every other file, as prose: the comment marks stripped, the docstrings cleaned as ``inspect.cleandoc``;
- ``code``: the rest of those files, without their docstrings and comments.

Files are taken in a fixed pseudo-random order (by CRC-32 of their path), each cut to an eighth of a
domain's share of characters, so that each domain mixes many modules, until each has its share. A
user's domain is any corpus ``raymoe prepare-data`` reads (text files, JSONL, Parquet, directories of them;
:func:`~raymoe.platform.data.prepare.plan_corpus`). Texts are tokenized with the checkpoint's
tokenizer into whole sequences of S + 1 ids (each document followed by EOS, stride S, as
``prepare-data`` cuts them).
"""

from __future__ import annotations

import ast
import inspect
import io
import logging
import sysconfig
import tokenize
import zlib
from pathlib import Path
from typing import Any

import torch

from raymoe.platform.data.corpus import stdlib_files
from raymoe.platform.data.prepare import PrepareConfig, plan_corpus, read_piece
from raymoe.platform.data.shards import DataError

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("code", "docs", "tests")
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
MIN_DOCUMENTS = 8  # a default domain's text comes from at least this many files
CHARS_PER_TOKEN_BOUND = 8  # read at most this many characters (bytes) per token wanted: BPE averages ~3-4


def is_test_file(relative: Path) -> bool:
    """The ``tests`` rule: under a test directory, or named ``test_*.py``."""
    return bool(TEST_DIRS.intersection(relative.parts[:-1])) or relative.name.startswith("test_")


def split_source(source: str) -> tuple[str, str]:
    """(code, docs) of one Python file: the source without its docstrings and comments, and those as prose.

    A file that does not parse is all code (its comments are still taken out when it tokenizes)."""
    lines = source.splitlines()
    drop: set[int] = set()  # 0-based lines that are docstrings
    prose: list[tuple[int, str]] = []  # (line, text) in source order
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    prose.append((first.lineno, inspect.cleandoc(first.value.value)))
                    drop.update(range(first.lineno - 1, (first.end_lineno or first.lineno)))
    cuts: dict[int, int] = {}  # 0-based line -> column where its comment starts
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                cuts[row - 1] = col
                prose.append((row, tok.string.lstrip("#").strip()))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    code = []
    for i, line in enumerate(lines):
        if i in drop:
            continue
        kept = line[: cuts[i]].rstrip() if i in cuts else line.rstrip()
        if (i in cuts and not kept) or (not kept and code and not code[-1]):
            continue  # a comment's own line goes; runs of blank lines become one
        code.append(kept)
    docs = "\n".join(text for _, text in sorted(prose, key=lambda p: p[0]) if text)
    return "\n".join(code).strip("\n"), docs


def stdlib_domain_texts(max_chars: int) -> dict[str, list[str]]:
    """The default domains: up to ``max_chars`` characters each of ``code``, ``docs`` and ``tests`` (documents)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib_files(), key=lambda p: zlib.crc32(str(p.relative_to(root)).encode()))
    texts: dict[str, list[str]] = {name: [] for name in DEFAULT_DOMAINS}
    chars = dict.fromkeys(DEFAULT_DOMAINS, 0)

    def add(domain: str, text: str) -> None:
        text = _cut(text, max_chars // MIN_DOCUMENTS)
        if text and chars[domain] < max_chars:
            texts[domain].append(text)
            chars[domain] += len(text)

    for path in files:
        if all(n >= max_chars for n in chars.values()):
            break
        relative = path.relative_to(root)
        tests = is_test_file(relative)
        if (tests and chars["tests"] >= max_chars) or (not tests and min(chars["code"], chars["docs"]) >= max_chars):
            continue
        source = path.read_bytes().decode("utf-8", errors="replace")
        if tests:
            add("tests", source)
        else:
            code, docs = split_source(source)
            add("code", code)
            add("docs", docs)
    return texts


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a line end (a long file does not fill a domain alone)."""
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[: end if end > 0 else limit]


def read_domain_texts(path: str, max_chars: int) -> list[str]:
    """The documents of a corpus ``prepare-data`` reads (file or directory), about ``max_chars`` characters' worth.

    :class:`DataError` names the path when it does not exist or holds no text."""
    pieces, _ = plan_corpus(PrepareConfig(corpus=[path], max_bytes=max_chars))
    texts, total = [], 0
    for piece in pieces:
        for text in read_piece(piece):
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    if not texts:
        raise DataError(f"{path}: no text in it")
    return texts


def domain_batches(
    texts: list[str], tokenizer: Any, eos_id: int, seq_len: int, sequences: int, batch_size: int, name: str = "domain"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``sequences`` sequences of ``seq_len`` + 1 ids from ``texts``, as (input_ids, labels) batches [b, S].

    DataError naming the domain when the texts make less than one sequence."""
    stream: list[int] = []
    need = sequences * seq_len + 1
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += [*enc.ids, eos_id]
        if len(stream) >= need:
            break
    n = min(sequences, (len(stream) - 1) // seq_len)
    if n < 1:
        raise DataError(f"domain {name!r}: {len(stream)} tokens, fewer than one sequence of {seq_len + 1}")
    if n < sequences:
        logger.warning("domain %r: only %d of %d sequences of %d tokens", name, n, sequences, seq_len)
    ids = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    rows = torch.stack([ids[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])  # [n, S + 1]
    return [(rows[i : i + batch_size, :-1].contiguous(), rows[i : i + batch_size, 1:].contiguous())
            for i in range(0, n, batch_size)]  # fmt: skip


def chars_for(tokens: int) -> int:
    """How many characters to read for about ``tokens`` tokens (a generous bound)."""
    return tokens * CHARS_PER_TOKEN_BOUND
