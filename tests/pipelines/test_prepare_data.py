"""``raymoe prepare-data`` end to end on the user's JSONL and Parquet files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymoe.pipelines import prepare_data
from raymoe.platform.data.loader import ShardLoader
from raymoe.platform.data.shards import TOKENIZER_FILE, read_manifest

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
