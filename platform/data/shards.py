"""The on-disk format of a prepared corpus: Parquet shards of token sequences and their manifest.

A prepared data directory holds::

    manifest.json              what is there (see :class:`Manifest`), written last
    tokenizer.json             the tokenizer that made the ids
    train-00000.parquet ...    the training sequences
    validation-00000.parquet   the held-out sequences

Each shard is a Parquet table with one column, ``input_ids``: ``fixed_size_list<int32>[seq_len + 1]``,
one row per sequence (the inputs are ``row[:-1]``, the next-token labels ``row[1:]``). The manifest
records every shard's sequence count and sha256, so a corrupt or changed shard is caught when it is
read.

A data directory is a local path or a pyarrow filesystem URI (``s3://bucket/data``, ``file:///x``):
every read and write goes through :mod:`raymoe.platform.storage`. Locally the manifest is written
to a temporary name and renamed; on an object store (no rename) it is one PUT, the last write, so
a half-written directory has no manifest and is not a prepared dataset.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import TOKENIZER_FILE  # one name for checkpoints and prepared data

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "raymoe-token-shards"
FORMAT_VERSION = 1
TOKEN_COLUMN = "input_ids"
TOKEN_DTYPE = np.int32
SPLITS = ("train", "validation")
SHARD_PATTERN = "{split}-{index:05d}.parquet"
HASH_CHUNK_BYTES = 1 << 20
TMP_SUFFIX = ".tmp"

Location = Path | str  # a local path, or a URI such as s3://bucket/data


class DataError(ValueError):
    """A corpus, shard or data directory is wrong; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name in the data directory, how many sequences it holds and its sha256."""

    file: str
    sequences: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split: documents with at least one token in it, label tokens (sequences × seq_len), shards."""

    documents: int
    tokens: int
    sequences: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``.

    Args:
        seq_len: S; every sequence holds S + 1 ids.
        vocab_size: the tokenizer's vocabulary size (added tokens included).
        eos_id: the id that follows every document in the token stream.
        documents: non-empty documents in the corpus.
        tokens: length of the token stream (documents and their EOS ids).
        dropped_tokens: stream tokens after the last whole sequence.
        seed: seed of the train/validation split.
        val_fraction: requested fraction of sequences held out for validation.
        tokenizer: ``{"file", "sha256", "source"}``.
        corpus: where the text came from (source, paths, files, bytes, field names, max_bytes).
        splits: ``{"train": SplitInfo, "validation": SplitInfo}``.
        checksum: sha256 of the manifest file itself (set by :func:`read_manifest`; not stored).
    """

    seq_len: int
    vocab_size: int
    eos_id: int
    documents: int
    tokens: int
    dropped_tokens: int
    seed: int
    val_fraction: float
    tokenizer: dict[str, Any]
    corpus: dict[str, Any]
    splits: dict[str, SplitInfo]
    format_version: int = FORMAT_VERSION
    checksum: str = field(default="", compare=False)

    @property
    def sequences(self) -> int:
        """Sequences in all splits."""
        return sum(s.sequences for s in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what ``manifest.json`` holds)."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "seq_len": self.seq_len,
            "ids_per_sequence": self.seq_len + 1,
            "token_column": TOKEN_COLUMN,
            "token_dtype": np.dtype(TOKEN_DTYPE).name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "documents": self.documents,
            "tokens": self.tokens,
            "dropped_tokens": self.dropped_tokens,
            "sequences": self.sequences,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "tokenizer": self.tokenizer,
            "corpus": self.corpus,
            "splits": {
                name: {
                    "documents": s.documents,
                    "tokens": s.tokens,
                    "sequences": s.sequences,
                    "shards": [{"file": x.file, "sequences": x.sequences, "sha256": x.sha256} for x in s.shards],
                }
                for name, s in self.splits.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], checksum: str = "") -> Manifest:
        """Parse the JSON form; a missing key raises ``KeyError``."""
        splits = {
            name: SplitInfo(
                documents=int(s["documents"]),
                tokens=int(s["tokens"]),
                sequences=int(s["sequences"]),
                shards=tuple(ShardInfo(str(x["file"]), int(x["sequences"]), str(x["sha256"])) for x in s["shards"]),
            )
            for name, s in d["splits"].items()
        }
        return cls(
            seq_len=int(d["seq_len"]),
            vocab_size=int(d["vocab_size"]),
            eos_id=int(d["eos_id"]),
            documents=int(d["documents"]),
            tokens=int(d["tokens"]),
            dropped_tokens=int(d["dropped_tokens"]),
            seed=int(d["seed"]),
            val_fraction=float(d["val_fraction"]),
            tokenizer=dict(d["tokenizer"]),
            corpus=dict(d["corpus"]),
            splits=splits,
            format_version=int(d["format_version"]),
            checksum=checksum,
        )


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train-00003.parquet``."""
    return SHARD_PATTERN.format(split=split, index=index)


def data_file(data_dir: Location, name: str) -> str:
    """The location of file ``name`` in a data directory (a local path or a URI, its query kept at the end)."""
    return storage.join(str(data_dir), name)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Location) -> str:
    """Hex sha256 of a file's bytes (a local path or a URI), read in chunks."""
    fs, fs_path = storage.filesystem(str(path))
    digest = hashlib.sha256()
    with fs.open_input_stream(fs_path) as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def encode_shard(sequences: np.ndarray) -> bytes:
    """The Parquet bytes of one shard: ``sequences`` [n, S + 1] int32, one row each."""
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be [n, S + 1], got shape {sequences.shape}")
    width = sequences.shape[1]
    values = pa.array(np.ascontiguousarray(sequences, dtype=TOKEN_DTYPE).reshape(-1))
    table = pa.table({TOKEN_COLUMN: pa.FixedSizeListArray.from_arrays(values, width)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)  # no timestamps in the file: the same sequences give the same bytes
    return sink.getvalue().to_pybytes()


def write_shard(data_dir: Location, split: str, index: int, sequences: np.ndarray) -> ShardInfo:
    """Write ``sequences`` [n, S + 1] as shard ``index`` of ``split``; return its name, count and sha256."""
    data = encode_shard(sequences)
    name = shard_name(split, index)
    storage.write_bytes(data_file(data_dir, name), data)
    return ShardInfo(file=name, sequences=int(sequences.shape[0]), sha256=sha256_bytes(data))


def read_shard(data_dir: Location, shard: ShardInfo, seq_len: int, verify: bool = True) -> torch.Tensor:
    """The sequences of one shard: [n, S + 1] int32.

    With ``verify``, the file's sha256 must match the manifest's. Raises :class:`DataError` naming
    the shard when it is missing, changed ("checksum mismatch"), not readable Parquet, or not of the
    manifest's shape.
    """
    path = data_file(data_dir, shard.file)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"shard {path}: cannot read it (no such file); run prepare-data again") from None
    except OSError as exc:
        raise DataError(f"shard {path}: cannot read it ({exc.strerror or exc}); run prepare-data again") from None
    if verify:
        actual = sha256_bytes(data)
        if actual != shard.sha256:
            raise DataError(
                f"shard {path}: checksum mismatch (manifest sha256 {shard.sha256[:16]}…, file {actual[:16]}…): "
                "the file is corrupt or was changed; run prepare-data again"
            )
    try:
        table = pq.read_table(pa.BufferReader(data), columns=[TOKEN_COLUMN])
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"shard {path}: not a readable Parquet shard ({exc}); run prepare-data again") from None
    width = seq_len + 1
    column = table.column(TOKEN_COLUMN).combine_chunks()
    if not (pa.types.is_fixed_size_list(column.type) and column.type.list_size == width):
        raise DataError(f"shard {path}: column {TOKEN_COLUMN} is {column.type}, expected {width} ids per row")
    if len(column) != shard.sequences:
        raise DataError(f"shard {path}: {len(column)} sequences, the manifest says {shard.sequences}")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(TOKEN_DTYPE, copy=True)
    return torch.from_numpy(values.reshape(len(column), width))


def split_sequences(num_sequences: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sequence indices of each split, ascending: a seeded random ``val_fraction`` (at least one when > 0)."""
    num_val = 0
    if val_fraction > 0 and num_sequences > 1:
        num_val = min(num_sequences - 1, max(1, round(val_fraction * num_sequences)))
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed)).numpy()
    is_val = np.zeros(num_sequences, dtype=bool)
    is_val[perm[:num_val]] = True
    return {"train": np.flatnonzero(~is_val), "validation": np.flatnonzero(is_val)}


def documents_covered(indices: np.ndarray, doc_ends: np.ndarray, seq_len: int) -> int:
    """How many documents have a token in the sequences ``indices`` [n]; ``doc_ends`` [D]: cumulative, EOS included."""
    if len(indices) == 0:
        return 0
    first = np.searchsorted(doc_ends, indices * seq_len, side="right")  # [n] document of each first id
    last = np.searchsorted(doc_ends, indices * seq_len + seq_len, side="right")  # [n] and of each last id
    marks = np.zeros(len(doc_ends) + 1, dtype=np.int64)  # +1 where a covered range starts, -1 after it ends
    np.add.at(marks, first, 1)
    np.add.at(marks, last + 1, -1)
    return int((np.cumsum(marks)[: len(doc_ends)] > 0).sum())


def write_split(
    data_dir: Location,
    split: str,
    stream: np.ndarray,
    indices: np.ndarray,
    doc_ends: np.ndarray,
    seq_len: int,
    shard_sequences: int,
    on_shard: Callable[[int], object] | None = None,
) -> SplitInfo:
    """Write sequences ``indices`` [n] of the token ``stream`` [N] as shards of ``split``; return its SplitInfo.

    Sequence i is ``stream[i * seq_len : i * seq_len + seq_len + 1]``. ``on_shard(count)`` is called
    after each shard (a progress bar's ``update``).
    """
    offsets = np.arange(seq_len + 1)
    shards = []
    for k, lo in enumerate(range(0, len(indices), shard_sequences)):
        chunk = indices[lo : lo + shard_sequences]
        shards.append(write_shard(data_dir, split, k, stream[chunk[:, None] * seq_len + offsets]))
        if on_shard is not None:
            on_shard(len(chunk))
    return SplitInfo(
        documents=documents_covered(indices, doc_ends, seq_len),
        tokens=len(indices) * seq_len,
        sequences=len(indices),
        shards=tuple(shards),
    )


def _delete_file(location: str) -> None:
    """Remove one file; nothing when it is not there (a helper :mod:`raymoe.platform.storage` lacks)."""
    fs, path = storage.filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if fs.get_file_info(path).type.name != "NotFound":
            raise storage.StorageError(f"cannot remove {location}: {exc}") from None


def clear_data_dir(data_dir: Location) -> None:
    """Remove a previous manifest first (so a crash leaves no valid manifest), then its shards."""
    _delete_file(data_file(data_dir, MANIFEST_FILE))
    patterns = [f"{split}-*.parquet" for split in SPLITS]
    for name, is_dir in storage.list_dir(str(data_dir)):
        if not is_dir and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            _delete_file(data_file(data_dir, name))


def write_manifest(data_dir: Location, manifest: Manifest) -> str:
    """Write ``manifest.json``, the last file of a prepared directory; return its sha256.

    On a local disk atomically: a temporary file, then a rename. On an object store, which has no
    rename, as one object: it appears whole or not at all.
    """
    data = (json.dumps(manifest.to_dict(), indent=2) + "\n").encode("utf-8")
    target = data_file(data_dir, MANIFEST_FILE)
    fs, path = storage.filesystem(target)
    if storage.is_local(fs):
        storage.write_bytes(path + TMP_SUFFIX, data)
        os.replace(path + TMP_SUFFIX, path)
    else:
        storage.write_bytes(target, data)
    return sha256_bytes(data)


def read_manifest(data_dir: Location) -> Manifest:
    """The manifest of a prepared data directory, with its ``checksum``; :class:`DataError` if absent or wrong."""
    path = data_file(data_dir, MANIFEST_FILE)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(
            f"{data_dir}: no {MANIFEST_FILE}; prepare the data first (`raymoe prepare-data --out {data_dir}`)"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run prepare-data again") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a raymoe data manifest (format is not {FORMAT_NAME!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {d.get('format_version')}, this raymoe reads {FORMAT_VERSION}; "
            "run prepare-data again"
        )
    try:
        return Manifest.from_dict(d, checksum=sha256_bytes(raw))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: incomplete manifest ({type(exc).__name__}: {exc}); run prepare-data again") from None


def read_tokenizer_json(data_dir: Location) -> str:
    """The text of a data directory's ``tokenizer.json`` (``tokenizers.Tokenizer.from_str`` loads it).

    Raises :class:`DataError` naming the location when it is absent or unreadable.
    """
    path = data_file(data_dir, TOKENIZER_FILE)
    try:
        return storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{data_dir}: no {TOKENIZER_FILE}; run prepare-data again") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc}); run prepare-data again") from None
