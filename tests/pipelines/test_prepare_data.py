"""``raymoe prepare-data`` end to end on the user's JSONL and Parquet files, to a local directory or S3."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymoe.pipelines import prepare_data
from raymoe.platform import storage
from raymoe.platform.data.loader import ShardLoader
from raymoe.platform.data.shards import TOKENIZER_FILE, data_file, read_manifest

JSONL_DOCS = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)]
PARQUET_DOCS = [f"class C{i}:\n    value = {i!r}\n" for i in range(30)]
SMALL = ["--vocab-size", "300", "--seq-len", "16", "--val-fraction", "0.1", "--no-progress"]


def _run(argv: list[str]) -> int:
    """Parse and run ``raymoe prepare-data ARGV`` as ``raymoe.pipelines.cli.main`` does."""
    parser = argparse.ArgumentParser(prog="raymoe")
    prepare_data.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare-data", *argv])
    return args.func(args)


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    """A JSONL file (field ``content``) and a Parquet file of two row groups (column ``body``)."""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(JSONL_DOCS)))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": PARQUET_DOCS, "n": list(range(len(PARQUET_DOCS)))}), parquet, row_group_size=20)
    return [str(jsonl), str(parquet)]


def test_jsonl_and_parquet_end_to_end(ray_local, corpus: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    fields = ["--text-field", "content", "--text-column", "body"]
    assert _run(["--out", str(out), "--corpus", *corpus, *fields, *SMALL]) == 0
    assert f"data: {out}" in capsys.readouterr().out
    m = read_manifest(out)
    assert m.documents == len(JSONL_DOCS) + len(PARQUET_DOCS)
    assert m.corpus["files"] == 2 and m.corpus["paths"] == corpus and m.tokenizer["source"] == "trained"
    assert m.splits["validation"].sequences > 0 and m.seq_len == 16
    inputs, labels = ShardLoader(out, batch_size=4).next_batch()
    assert inputs.shape == labels.shape == (4, 16)

    # the same corpus again with the tokenizer just trained: the same data
    again = tmp_path / "again"
    tokenizer = ["--tokenizer", str(out / TOKENIZER_FILE)]
    assert _run(["--out", str(again), "--corpus", *corpus, *fields, *tokenizer, *SMALL]) == 0
    m2 = read_manifest(again)
    assert m2.tokenizer["sha256"] == m.tokenizer["sha256"] and m2.splits == m.splits


def test_bad_input_exits_2_with_the_place(ray_local, corpus: list[str], tmp_path: Path, capsys) -> None:
    out = ["--out", str(tmp_path / "out"), *SMALL]
    assert _run([*out, "--corpus", *corpus, "--text-column", "body"]) == 2  # the JSONL lacks "text"
    err = capsys.readouterr().err
    assert "docs.jsonl:1: no 'text' field (found: content, id)" in err and "Traceback" not in err

    assert _run([*out, "--corpus", corpus[1], "--text-column", "nope"]) == 2
    assert "rows.parquet: no column 'nope' (its columns: body, n)" in capsys.readouterr().err

    assert _run([*out, "--corpus", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file or directory" in capsys.readouterr().err

    (tmp_path / "blank.txt").write_text("")
    assert _run([*out, "--corpus", str(tmp_path / "blank.txt"), "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert "none.json: tokenizer file not found" in capsys.readouterr().err

    assert _run([*out, "--corpus", corpus[0], "--seq-len", "0"]) == 2
    assert "seq_len must be >= 1" in capsys.readouterr().err


def test_out_on_s3(ray_local, corpus: list[str], tmp_path: Path, s3_prefix: str, s3_server, capsys) -> None:
    """``--out s3://…`` writes the same files as a local --out; the loader reads the same batches back."""
    args = ["--corpus", *corpus, "--text-field", "content", "--text-column", "body", *SMALL, "--shard-sequences", "8"]
    assert _run(["--out", s3_prefix, *args]) == 0
    assert f"data: {s3_prefix}" in capsys.readouterr().out
    local = tmp_path / "local"
    assert _run(["--out", str(local), *args]) == 0
    names = sorted(p.name for p in local.iterdir())
    assert s3_server.keys(s3_prefix) == names and len(names) > 4  # several shards a split, nothing else
    for name in names:
        assert storage.read_bytes(data_file(s3_prefix, name)) == (local / name).read_bytes(), name
    m = read_manifest(s3_prefix)
    assert m.documents == len(JSONL_DOCS) + len(PARQUET_DOCS) and m.checksum == read_manifest(local).checksum
    remote, here = ShardLoader(s3_prefix, batch_size=4, seed=1), ShardLoader(local, batch_size=4, seed=1)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(remote.next_batch(), here.next_batch()))


def test_out_in_a_missing_bucket_exits_2_with_the_place(ray_local, corpus: list[str], capsys) -> None:
    out = "s3://no-such-bucket-raymoe/data"
    assert _run(["--out", out, "--corpus", corpus[0], "--text-field", "content", *SMALL]) == 2
    # the last line: (Ray Data's console log handler, bound to an earlier test's captured stderr, may
    # write a "--- Logging error ---" before it)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"raymoe prepare-data: cannot create the output directory {out}: ")
