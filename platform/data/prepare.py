"""Prepare a corpus for pretraining: tokenize it in parallel with Ray Data into Parquet shards.

    from raymoe.platform.data.prepare import PrepareConfig, prepare_dataset
    manifest = prepare_dataset("data/", PrepareConfig(corpus=["notes/", "web.jsonl"], seq_len=256))

The corpus is the Python standard library's own ``.py`` files (the default) or the user's files:
``.jsonl`` (one document per line, the ``text_field`` of a JSON object), ``.parquet`` (one
document per row, the ``text_column``), anything else plain UTF-8 text (one document per file);
directories are walked. The driver plans the work as *units* of about ``UNIT_TARGET_BYTES``
(whole text files, ranges of JSONL lines, Parquet row groups); Ray Data reads and tokenizes the
units in parallel, and the driver orders the results by unit, so the token stream is the same for
any parallelism: every document's ids followed by the EOS id, in file order. The stream is cut into
sequences of ``seq_len + 1`` ids with stride ``seq_len`` (consecutive sequences share one id, so
every next-token pair of the stream is a label exactly once), a seeded random fraction of the
sequences is held out for validation, and each split is written in stream order as shards (see
:mod:`raymoe.platform.data.shards`). The driver holds the token stream (4 bytes a token).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import TOKENIZER_CONFIG_FILE
from raymoe.platform.data.corpus import SPECIAL_TOKENS, stdlib_files, train_tokenizer
from raymoe.platform.data.shards import (
    TOKEN_DTYPE,
    TOKENIZER_FILE,
    DataError,
    Manifest,
    SplitInfo,
    clear_data_dir,
    data_file,
    sha256_bytes,
    sha256_file,
    split_sequences,
    write_manifest,
    write_split,
)

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SEQ_LEN = 256
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_SEQUENCES = 8192  # 8192 × 257 int32 ≈ 8 MB a shard at the default seq_len
UNIT_TARGET_BYTES = 1 << 20  # one Ray task reads and tokenizes ~1 MB of text: the stdlib makes ~30 tasks
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
EOS_TOKEN = SPECIAL_TOKENS[1]
EOS_CANDIDATES = (EOS_TOKEN, "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SKIPPED_DIR_NAMES = {"__pycache__"}  # and hidden names, when walking a directory
STDLIB_SOURCE = "python-stdlib"


@dataclass(kw_only=True)
class PrepareConfig:
    """What to prepare; :meth:`validate` names the first wrong field.

    Args:
        corpus: files or directories; None = the Python standard library's ``.py`` files.
        text_field: the JSON field of a ``.jsonl`` line that holds the document.
        text_column: the Parquet column that holds the documents.
        tokenizer: an existing ``tokenizer.json`` to copy and use; None = train a byte-level BPE.
        eos_token: the end-of-document token of that tokenizer (None: found by name).
        vocab_size: size of the BPE to train (ignored with ``tokenizer``).
        seq_len: S; a sequence holds S + 1 ids (inputs and next-token labels).
        val_fraction: fraction of the sequences held out for validation, in [0, 1).
        seed: seed of the train/validation split.
        max_bytes: take corpus files (JSONL ranges, row groups) in order up to this many bytes.
        shard_sequences: sequences per shard file.
    """

    corpus: list[str] | None = None
    text_field: str = "text"
    text_column: str = "text"
    tokenizer: str | None = None
    eos_token: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seq_len: int = DEFAULT_SEQ_LEN
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = 0
    max_bytes: int | None = None
    shard_sequences: int = DEFAULT_SHARD_SEQUENCES

    def validate(self) -> None:
        """Raise :class:`DataError` naming the first wrong field."""
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise DataError(
                f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {self.vocab_size}"
            )
        if self.seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise DataError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.shard_sequences < 1:
            raise DataError(f"shard_sequences must be >= 1, got {self.shard_sequences}")
        if self.corpus is not None and not self.corpus:
            raise DataError("corpus is an empty list; name at least one file or directory (or None for the stdlib)")


@dataclass(frozen=True)
class Piece:
    """A slice of one corpus file: a whole text file, a byte range of whole JSONL lines, or a row group.

    ``start``/``stop`` are byte offsets (text, JSONL) or ``start`` the row group (Parquet);
    ``first_line`` is the line number at ``start`` (JSONL) or the row index of the group's first row.
    """

    path: str
    kind: str  # "text" | "jsonl" | "parquet"
    nbytes: int
    start: int = 0
    stop: int = 0
    first_line: int = 1
    errors: str = "strict"  # UTF-8 decoding; "replace" for the stdlib (a few test files are Latin-1 on purpose)


# ---- planning: which pieces make the corpus --------------------------------------------------------------------


def _walk(path: Path) -> list[Path]:
    """``path`` itself, or the files under it (sorted; hidden names and ``__pycache__`` skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = []
    for p in sorted(path.rglob("*")):
        parts = p.relative_to(path).parts
        if p.is_file() and not any(part.startswith(".") or part in SKIPPED_DIR_NAMES for part in parts):
            files.append(p)
    if not files:
        raise DataError(f"{path}: empty corpus: the directory holds no files")
    return files


def _jsonl_pieces(path: Path, size: int) -> list[Piece]:
    """Byte ranges of ~UNIT_TARGET_BYTES that end at line ends, with the line number where each starts."""
    pieces, start, line = [], 0, 1
    try:
        with open(path, "rb") as f:
            while start < size:
                f.seek(min(start + UNIT_TARGET_BYTES, size))
                f.readline()  # to the end of the line that crosses the target
                stop = min(f.tell(), size)
                f.seek(start)
                newlines = f.read(stop - start).count(b"\n")
                pieces.append(Piece(str(path), "jsonl", stop - start, start, stop, line))
                start, line = stop, line + newlines
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return pieces


def _parquet_pieces(path: Path, column: str) -> list[Piece]:
    """One piece per row group; the file must have a string column ``column``."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise DataError(
            f"{path}: no column {column!r} (its columns: {', '.join(schema.names) or 'none'}); "
            "choose one with --text-column"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {column!r} is {kind}, not text (string)")
    pieces, first_row = [], 0
    for i in range(pf.num_row_groups):
        group = pf.metadata.row_group(i)
        pieces.append(Piece(str(path), "parquet", int(group.total_byte_size), start=i, first_line=first_row))
        first_row += group.num_rows
    return pieces


def plan_corpus(config: PrepareConfig) -> tuple[list[Piece], dict[str, Any]]:
    """The pieces of the corpus in document order (cut at ``max_bytes``), and its description for the manifest."""
    pieces: list[Piece] = []
    if config.corpus is None:
        root = sysconfig.get_paths()["stdlib"]
        files = stdlib_files(config.max_bytes)
        pieces = [Piece(str(p), "text", p.stat().st_size, errors="replace") for p in files]
        description: dict[str, Any] = {"source": STDLIB_SOURCE, "root": root, "python": sys.version.split()[0]}
    else:
        seen: set[Path] = set()
        for given in config.corpus:
            for path in _walk(Path(given)):
                if path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                suffix = path.suffix.lower()
                if suffix in PARQUET_SUFFIXES:
                    pieces.extend(_parquet_pieces(path, config.text_column))
                elif suffix in JSONL_SUFFIXES:
                    pieces.extend(_jsonl_pieces(path, path.stat().st_size))
                else:
                    pieces.append(Piece(str(path), "text", path.stat().st_size))
        description = {"source": "files", "paths": [str(p) for p in config.corpus]}
        description.update(text_field=config.text_field, text_column=config.text_column)
    if config.max_bytes is not None:
        total = list(itertools.accumulate(p.nbytes for p in pieces))
        pieces = pieces[: max(1, sum(t <= config.max_bytes for t in total))]
    description.update(
        files=len({p.path for p in pieces}), bytes=sum(p.nbytes for p in pieces), max_bytes=config.max_bytes
    )
    return pieces, description


def _units(pieces: list[Piece]) -> list[list[Piece]]:
    """Consecutive pieces grouped into units of about UNIT_TARGET_BYTES (one Ray task each)."""
    units: list[list[Piece]] = [[]]
    size = 0
    for piece in pieces:
        if units[-1] and size + piece.nbytes > UNIT_TARGET_BYTES:
            units.append([])
            size = 0
        units[-1].append(piece)
        size += piece.nbytes
    return [u for u in units if u]


# ---- reading: the documents of a piece -------------------------------------------------------------------------


def _decode(data: bytes, path: str, errors: str, offset: int = 0, line: int = 1) -> str:
    """UTF-8 text of ``data`` (read at byte ``offset``, line ``line`` of ``path``); DataError names the bad byte."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        bad_line = line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}:{bad_line}:{column}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset "
            f"{offset + exc.start}); convert the file to UTF-8"
        ) from None


def _read_range(path: str, start: int = 0, stop: int | None = None) -> bytes:
    """Bytes [start, stop) of a file (to its end when ``stop`` is None); DataError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read() if stop is None else f.read(stop - start)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def read_piece(piece: Piece, text_field: str = "text", text_column: str = "text") -> Iterator[str]:
    """The non-empty documents of ``piece``, in order; :class:`DataError` names the file and line or row."""
    if piece.kind == "text":
        text = _decode(_read_range(piece.path), piece.path, piece.errors)
        if text:
            yield text
    elif piece.kind == "jsonl":
        data = _read_range(piece.path, piece.start, piece.stop)
        text = _decode(data, piece.path, piece.errors, piece.start, piece.first_line)
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            where = f"{piece.path}:{piece.first_line + i}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}:{exc.colno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
                raise DataError(f"{where}: no {text_field!r} field (found: {keys}); choose one with --text-field")
            value = record[text_field]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string")
            if value:
                yield value
    elif piece.kind == "parquet":
        try:
            values = pq.ParquetFile(piece.path).read_row_group(piece.start, columns=[text_column]).column(0)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{piece.path}: cannot read row group {piece.start} ({exc})") from None
        for i, value in enumerate(values.to_pylist()):
            if value is None:
                raise DataError(f"{piece.path}: row {piece.first_line + i} (0-based): column {text_column!r} is null")
            if value:
                yield value
    else:
        raise ValueError(f"unknown piece kind {piece.kind!r}")


# ---- the tokenizer ---------------------------------------------------------------------------------------------


def _find_eos(tokenizer: Any, source: Path, eos_token: str | None) -> int:
    """The EOS id: ``eos_token``, else ``tokenizer_config.json``'s beside ``source``, else a known name."""
    names = [eos_token] if eos_token else []
    config_path = source.parent / TOKENIZER_CONFIG_FILE
    if not names and config_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
            names.append(eos.get("content") if isinstance(eos, dict) else eos)
    names += [] if eos_token else list(EOS_CANDIDATES)
    for name in names:
        if isinstance(name, str) and tokenizer.token_to_id(name) is not None:
            return int(tokenizer.token_to_id(name))
    raise DataError(f"{source}: no end-of-document token among {', '.join(map(str, names))}; name it with --eos-token")


def _load_tokenizer(config: PrepareConfig, pieces: list[Piece]) -> tuple[Any, int, Path | None]:
    """Load ``config.tokenizer`` or train a BPE on the corpus (in memory); return (tokenizer, EOS id, source file)."""
    from tokenizers import Tokenizer

    if config.tokenizer is not None:
        source = Path(config.tokenizer)
        if not source.is_file():
            raise DataError(f"{source}: tokenizer file not found")
        try:
            tokenizer = Tokenizer.from_file(str(source))
        except Exception as exc:  # tokenizers raises a plain Exception on a bad file
            raise DataError(f"{source}: not a tokenizer.json the `tokenizers` library can load ({exc})") from None
        return tokenizer, _find_eos(tokenizer, source, config.eos_token), source
    chars = 0

    def texts() -> Iterator[str]:
        nonlocal chars
        for piece in pieces:
            for text in read_piece(piece, config.text_field, config.text_column):
                chars += len(text)
                yield text

    logger.info("training a %d-token byte-level BPE on %d pieces of the corpus", config.vocab_size, len(pieces))
    tokenizer = train_tokenizer(texts(), config.vocab_size)
    if chars == 0:
        raise DataError(_empty_corpus_message(pieces))
    return tokenizer, tokenizer.token_to_id(EOS_TOKEN), None


def _save_tokenizer(tokenizer: Any, eos_id: int, source: Path | None, out_dir: str) -> dict[str, Any]:
    """Write ``out_dir/tokenizer.json`` (a byte copy of ``source``, if given); return its manifest entry."""
    target = data_file(out_dir, TOKENIZER_FILE)
    if source is None:
        data = tokenizer.to_str(pretty=True).encode("utf-8")  # the bytes Tokenizer.save writes
    else:
        data = _read_range(str(source))
    # unless it is there already (--tokenizer OUT/tokenizer.json): never truncate the source being copied
    if not (storage.is_file(target) and sha256_file(target) == sha256_bytes(data)):
        storage.write_bytes(target, data)
    return {
        "file": TOKENIZER_FILE,
        "sha256": sha256_bytes(data),
        "source": "trained" if source is None else str(source),
        "eos_token": tokenizer.id_to_token(eos_id),
    }


def _empty_corpus_message(pieces: list[Piece]) -> str:
    files = sorted({p.path for p in pieces})
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"empty corpus: no text in {len(files)} file(s) ({shown})"


# ---- tokenizing units, in this process or in parallel ---------------------------------------------------------

UnitMap = Callable[[list[dict[str, Any]], Callable[..., pa.Table], dict[str, Any]], Iterator[pa.Table]]
"""How the units are tokenized: ``map_units(items, fn, fn_kwargs)`` yields ``fn(batch, **fn_kwargs)`` for
every item (a one-row pyarrow batch each), in any order. :func:`map_in_process` runs them here, one by one;
``raymoe.actors.data.ray_data_map`` spreads them over a Ray cluster with Ray Data (what ``raymoe
prepare-data`` uses)."""


def map_in_process(items: list[dict[str, Any]], fn: Callable[..., pa.Table], fn_kwargs: dict[str, Any]):
    """:data:`UnitMap` in this process."""
    for item in items:
        yield fn(pa.Table.from_pylist([item]), **fn_kwargs)


@functools.lru_cache(maxsize=2)
def _tokenizer_from_json(tokenizer_json: str) -> Any:
    """A tokenizer built once per worker process and reused by the tasks it runs."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def _tokenize_units(
    batch: pa.Table, *, tokenizer_json: str, eos_id: int, text_field: str, text_column: str
) -> pa.Table:
    """The map over units (``unit``, ``pieces`` as JSON) → their token ids, one row per unit.

    Output columns: ``unit``; ``ids`` (list<int32>: every document's ids then ``eos_id``);
    ``doc_tokens`` (list<int32>: ids per document, EOS excluded); ``chars``; ``error`` (a
    :class:`DataError` message, or null; errors travel as values so that the driver raises them as they are).
    """
    tokenizer = _tokenizer_from_json(tokenizer_json)
    ids, doc_tokens, chars, errors = [], [], [], []
    for pieces_json in batch.column("pieces").to_pylist():
        try:
            docs = [d for p in json.loads(pieces_json) for d in read_piece(Piece(**p), text_field, text_column)]
            error = None
        except DataError as exc:
            docs, error = [], str(exc)
        encodings = tokenizer.encode_batch(docs, add_special_tokens=False) if docs else []
        lengths = np.array([len(e.ids) for e in encodings], dtype=TOKEN_DTYPE)
        flat = np.full(int(lengths.sum()) + len(lengths), eos_id, dtype=TOKEN_DTYPE)  # EOS after every document
        for e, start in zip(encodings, np.cumsum(lengths + 1) - lengths - 1):
            flat[start : start + len(e.ids)] = e.ids
        ids.append(flat)
        doc_tokens.append(lengths)
        chars.append(sum(len(d) for d in docs))
        errors.append(error)
    return pa.table(
        {
            "unit": batch.column("unit"),
            "ids": pa.array(ids, type=pa.list_(pa.int32())),
            "doc_tokens": pa.array(doc_tokens, type=pa.list_(pa.int32())),
            "chars": pa.array(chars, type=pa.int64()),
            "error": pa.array(errors, type=pa.string()),
        }
    )


def _tokenize(
    units: list[list[Piece]], tokenizer: Any, eos_id: int, config: PrepareConfig, progress: bool, map_units: UnitMap
) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokenize all units with ``map_units``; return (token stream [N] int32, ids per document [D], characters)."""
    from tqdm import tqdm

    items = [{"unit": i, "pieces": json.dumps([asdict(p) for p in unit])} for i, unit in enumerate(units)]
    unit_bytes = [sum(p.nbytes for p in unit) for unit in units]
    results: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    kwargs = {"tokenizer_json": tokenizer.to_str(), "eos_id": eos_id, "text_field": config.text_field,
              "text_column": config.text_column}  # fmt: skip
    bar = tqdm(total=sum(unit_bytes), desc="tokenize", unit="B", unit_scale=True, disable=None if progress else True)
    with bar:
        for batch in map_units(items, _tokenize_units, kwargs):
            for i, unit in enumerate(batch.column("unit").to_pylist()):
                if (error := batch.column("error")[i].as_py()) is not None:
                    raise DataError(error)
                ids = batch.column("ids")[i].values.to_numpy(zero_copy_only=False).astype(TOKEN_DTYPE)
                doc_tokens = batch.column("doc_tokens")[i].values.to_numpy(zero_copy_only=False).astype(np.int64)
                results[unit] = (ids, doc_tokens, batch.column("chars")[i].as_py())
                bar.update(unit_bytes[unit])
    ordered = [results[i] for i in range(len(units))]  # by unit: the same stream for any parallelism
    stream = np.concatenate([r[0] for r in ordered]) if ordered else np.zeros(0, TOKEN_DTYPE)
    doc_tokens = np.concatenate([r[1] for r in ordered]) if ordered else np.zeros(0, np.int64)
    return stream, doc_tokens, sum(r[2] for r in ordered)


def prepare_dataset(
    out_dir: Path | str,
    config: PrepareConfig | None = None,
    *,
    progress: bool = False,
    map_units: UnitMap | None = None,
) -> Manifest:
    """Tokenize ``config``'s corpus into shards under ``out_dir``; return the manifest written there.

    ``out_dir`` is a local path or a URI (``s3://bucket/data``); the corpus files are local. The
    units are tokenized by ``map_units`` (default :func:`map_in_process`; the shards are the same
    byte for byte whatever runs them). Raises :class:`DataError` for a wrong input, naming the file and line.
    """
    config = config or PrepareConfig()
    config.validate()
    out = str(out_dir)  # a local path or a URI: every write goes through pyarrow filesystems
    pieces, corpus = plan_corpus(config)
    tokenizer, eos_id, source = _load_tokenizer(config, pieces)
    units = _units(pieces)
    logger.info("tokenizing %d bytes of %d files in %d units", corpus["bytes"], corpus["files"], len(units))
    stream, doc_tokens, chars = _tokenize(units, tokenizer, eos_id, config, progress, map_units or map_in_process)
    if chars == 0:
        raise DataError(_empty_corpus_message(pieces))
    seq_len = config.seq_len
    num_sequences = max(0, (len(stream) - 1) // seq_len)
    if num_sequences == 0:
        raise DataError(f"corpus too small: {len(stream)} tokens, fewer than one sequence of {seq_len + 1}")
    # the input is good: only now replace what out_dir held
    try:
        storage.make_dirs(out)
    except OSError as exc:  # e.g. a bucket that does not exist
        raise storage.StorageError(f"cannot create the output directory {out}: {exc}") from None
    clear_data_dir(out)
    tokenizer_entry = _save_tokenizer(tokenizer, eos_id, source, out)
    doc_ends = np.cumsum(doc_tokens + 1)  # [D] end of each document (its EOS included) in the stream
    splits: dict[str, SplitInfo] = {}
    from tqdm import tqdm

    with tqdm(total=num_sequences, desc="write shards", unit="seq", disable=None if progress else True) as bar:
        for split, indices in split_sequences(num_sequences, config.val_fraction, config.seed).items():
            splits[split] = write_split(
                out, split, stream, indices, doc_ends, seq_len, config.shard_sequences, on_shard=bar.update
            )
    manifest = Manifest(
        seq_len=seq_len,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eos_id=eos_id,
        documents=len(doc_tokens),
        tokens=len(stream),
        dropped_tokens=len(stream) - (num_sequences * seq_len + 1),
        seed=config.seed,
        val_fraction=config.val_fraction,
        tokenizer=tokenizer_entry,
        corpus=corpus,
        splits=splits,
    )
    checksum = write_manifest(out, manifest)  # last: a directory without a manifest is not a prepared dataset
    logger.info("prepared %d sequences (%d tokens) in %s", num_sequences, len(stream), out)
    return replace(manifest, checksum=checksum)
