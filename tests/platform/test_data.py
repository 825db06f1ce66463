"""Data preparation (Ray Data → Parquet shards), shard verification and the resumable loader."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymoe.platform import storage
from raymoe.platform.data import prepare as prepare_module
from raymoe.platform.data.loader import ShardLoader, ShardStore, epoch_permutation, iter_batches
from raymoe.platform.data.prepare import PrepareConfig, plan_corpus, prepare_dataset, read_piece
from raymoe.platform.data.shards import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    DataError,
    data_file,
    read_manifest,
    read_shard,
    read_tokenizer_json,
    sha256_file,
    split_sequences,
)

TINY = dict(max_bytes=40_000, vocab_size=300, seq_len=32, val_fraction=0.05, shard_sequences=64)
BATCH = 24


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory) -> Path:
    """A few stdlib files prepared into several shards."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare_dataset(out, PrepareConfig(**TINY))
    return out


def _all_sequences(data_dir: Path) -> np.ndarray:
    """Every sequence of both splits back in stream order: [N, S + 1]."""
    m = read_manifest(data_dir)
    indices = split_sequences(m.sequences, m.val_fraction, m.seed)
    out = np.zeros((m.sequences, m.seq_len + 1), dtype=np.int64)
    for split, info in m.splits.items():
        rows = [read_shard(data_dir, s, m.seq_len).numpy() for s in info.shards]
        out[indices[split]] = np.concatenate(rows)
    return out


# ---- preparation -----------------------------------------------------------------------------------------------


def test_manifest_counts_are_consistent(prepared: Path) -> None:
    m = read_manifest(prepared)
    assert m.seq_len == TINY["seq_len"] and m.vocab_size <= TINY["vocab_size"] and m.eos_id == 1
    assert m.sequences == (m.tokens - 1) // m.seq_len
    assert m.dropped_tokens == m.tokens - (m.sequences * m.seq_len + 1)
    assert m.splits["validation"].sequences == round(TINY["val_fraction"] * m.sequences)
    assert len(m.splits["train"].shards) > 1  # the split really is sharded
    for info in m.splits.values():
        assert sum(s.sequences for s in info.shards) == info.sequences
        assert info.tokens == info.sequences * m.seq_len
        assert 0 < info.documents <= m.documents
        for shard in info.shards:
            assert sha256_file(prepared / shard.file) == shard.sha256
    assert m.splits["train"].documents == m.documents
    assert m.tokenizer["sha256"] == sha256_file(prepared / TOKENIZER_FILE)
    assert m.corpus["source"] == "python-stdlib" and m.corpus["bytes"] <= TINY["max_bytes"]
    assert (
        json.loads((prepared / MANIFEST_FILE).read_text())["splits"]["train"]["sequences"]
        == m.splits["train"].sequences
    )


def test_sequences_decode_to_the_documents(prepared: Path) -> None:
    from tokenizers import Tokenizer

    m = read_manifest(prepared)
    seqs = _all_sequences(prepared)
    assert (seqs[1:, 0] == seqs[:-1, -1]).all()  # stride S: consecutive sequences share one id
    stream = np.concatenate([seqs[0], seqs[1:, 1:].reshape(-1)])
    assert len(stream) == m.tokens - m.dropped_tokens
    pieces, _ = plan_corpus(PrepareConfig(**TINY))
    docs = [d for p in pieces for d in read_piece(p)]
    assert len(docs) == m.documents
    tokenizer = Tokenizer.from_file(str(prepared / TOKENIZER_FILE))
    ends = np.flatnonzero(stream == m.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    for i, (lo, hi) in enumerate(zip(starts, ends)):  # every whole document of the stream, in order
        assert tokenizer.decode(stream[lo:hi].tolist(), skip_special_tokens=False) == docs[i]
    assert len(ends) >= m.documents - 1


def test_prepare_is_deterministic_for_any_parallelism(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prepare_module, "UNIT_TARGET_BYTES", 3_000)  # many small tasks, finishing in any order
    again = prepare_dataset(tmp_path / "again", PrepareConfig(**TINY))
    assert (tmp_path / "again" / MANIFEST_FILE).read_bytes() == (prepared / MANIFEST_FILE).read_bytes()
    assert again.checksum == read_manifest(prepared).checksum
    for info in again.splits.values():
        for shard in info.shards:
            assert (tmp_path / "again" / shard.file).read_bytes() == (prepared / shard.file).read_bytes()


# ---- bad input -------------------------------------------------------------------------------------------------


def _prepare_files(tmp_path: Path, files: dict[str, bytes | pa.Table], **kw) -> None:
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        else:
            path.write_bytes(content)
    prepare_dataset(tmp_path / "out", PrepareConfig(corpus=[str(tmp_path / n) for n in files], **kw))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        prepare_dataset(tmp_path / "out", PrepareConfig(corpus=[str(tmp_path / "nope.txt")]))


def test_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"empty corpus: no text in 2 file\(s\).*a\.txt"):
        _prepare_files(tmp_path, {"a.txt": b"", "b.jsonl": b'{"text": ""}\n\n'})
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: empty corpus"):
        prepare_dataset(tmp_path / "out", PrepareConfig(corpus=[str(tmp_path / "empty_dir")]))


def test_non_utf8_text_names_line_column_and_offset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"bad\.txt:2:2: not UTF-8 text \(byte 0xff at byte offset 7\)"):
        _prepare_files(tmp_path, {"good.txt": b"fine\n", "bad.txt": b"hello\nw\xffrld\n"})


def test_jsonl_line_that_is_not_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"docs\.jsonl:3:10: not valid JSON"):
        _prepare_files(tmp_path, {"docs.jsonl": b'{"text": "a"}\n\n{"text": oops}\n'})


def test_jsonl_line_without_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"docs\.jsonl:2: no 'text' field \(found: body\)"):
        _prepare_files(tmp_path, {"docs.jsonl": b'{"text": "a"}\n{"body": "b"}\n'})
    with pytest.raises(DataError, match=r"docs\.jsonl:1: field 'body' is int"):
        _prepare_files(tmp_path, {"docs.jsonl": b'{"body": 3}\n'}, text_field="body")


def test_parquet_without_the_column(tmp_path: Path) -> None:
    table = pa.table({"content": ["x"], "id": [1]})
    with pytest.raises(DataError, match=r"rows\.parquet: no column 'text' \(its columns: content, id\)"):
        _prepare_files(tmp_path, {"rows.parquet": table})


def test_garbled_parquet_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"rows\.parquet: not a readable Parquet file"):
        _prepare_files(tmp_path, {"rows.parquet": b"PAR1 garbage"})


def test_bad_line_found_by_a_ray_worker_keeps_the_previous_data(prepared: Path, tmp_path: Path) -> None:
    """With a given tokenizer the driver reads nothing itself: the error comes back from Ray Data as it is."""
    out = shutil.copytree(prepared, tmp_path / "previous")
    bad = tmp_path / "big.jsonl"
    bad.write_bytes(b"".join(b'{"text": "line %d"}\n' % i for i in range(50)) + b'{"txt": "x"}\n')
    config = PrepareConfig(corpus=[str(bad)], tokenizer=str(prepared / TOKENIZER_FILE))
    with pytest.raises(DataError, match=r"big\.jsonl:51: no 'text' field \(found: txt\)"):
        prepare_dataset(out, config)
    assert read_manifest(out).checksum == read_manifest(prepared).checksum  # a failed prepare changes nothing
    assert ShardLoader(out, batch_size=BATCH).next_batch()[0].shape == (BATCH, TINY["seq_len"])


def test_invalid_config() -> None:
    with pytest.raises(DataError, match="val_fraction"):
        PrepareConfig(val_fraction=1.0).validate()
    with pytest.raises(DataError, match="vocab_size"):
        PrepareConfig(vocab_size=100).validate()


# ---- corrupt shards --------------------------------------------------------------------------------------------


def test_corrupt_shard_is_a_checksum_mismatch(prepared: Path, tmp_path: Path) -> None:
    data = shutil.copytree(prepared, tmp_path / "data")
    shard = data / read_manifest(data).splits["train"].shards[1].file
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    loader = ShardLoader(data, batch_size=BATCH, shuffle=False)
    with pytest.raises(DataError, match=rf"{shard.name}: checksum mismatch"):
        for _ in range(len(loader.store) // BATCH + 1):
            loader.next_batch()


def test_truncated_shard_is_named(prepared: Path, tmp_path: Path) -> None:
    info = read_manifest(prepared).splits["train"].shards[0]
    (tmp_path / info.file).write_bytes((prepared / info.file).read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{info.file}: not a readable Parquet shard"):
        read_shard(tmp_path, info, TINY["seq_len"], verify=False)
    with pytest.raises(DataError, match="checksum mismatch"):
        read_shard(tmp_path, info, TINY["seq_len"])


# ---- the loader ------------------------------------------------------------------------------------------------


def _run(loader: ShardLoader, steps: int) -> list[list[int]]:
    """The split indices of ``steps`` batches."""
    return [loader.next_indices().tolist() for _ in range(steps)]


def test_batches_are_shifted_sequences(prepared: Path) -> None:
    loader = ShardLoader(prepared, batch_size=BATCH, seed=3)
    indices = loader.next_indices()
    loader.load_state_dict({**loader.state_dict(), "position": 0})
    inputs, labels = loader.next_batch()
    assert inputs.shape == labels.shape == (BATCH, TINY["seq_len"]) and inputs.dtype == labels.dtype == torch.long
    rows = loader.store.rows(indices).long()
    assert torch.equal(inputs, rows[:, :-1]) and torch.equal(labels, rows[:, 1:])


def test_resume_is_exact_across_an_epoch_boundary(prepared: Path) -> None:
    n = len(ShardStore(prepared))
    steps = 2 * n // BATCH + 3  # more than two epochs
    reference = _run(ShardLoader(prepared, batch_size=BATCH, seed=7), steps)
    flat = [i for batch in reference for i in batch]
    assert sorted(flat[:n]) == list(range(n))  # epoch 0: each sequence once
    assert flat[:n] == epoch_permutation(n, 7, 0).tolist() and flat[n : 2 * n] == epoch_permutation(n, 7, 1).tolist()
    assert flat[:n] != flat[n : 2 * n]
    for k in (3, n // BATCH, n // BATCH + 1):  # mid-epoch, before the batch that crosses into epoch 1, after it
        first = ShardLoader(prepared, batch_size=BATCH, seed=7)
        seen = _run(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = ShardLoader(prepared, batch_size=BATCH, seed=0)
        resumed.load_state_dict(state)
        assert seen + _run(resumed, steps - k) == reference


def _take(loader: ShardLoader, count: int) -> list[int]:
    """The next ``count`` split indices of ``loader`` (whole batches drawn)."""
    batches = _run(loader, -(-count // loader.batch_size))
    return [i for batch in batches for i in batch][:count]


def test_ranks_are_disjoint_and_cover_the_epoch(prepared: Path) -> None:
    n = len(ShardStore(prepared))
    loaders = [ShardLoader(prepared, batch_size=8, seed=1, rank=r, world_size=2) for r in range(2)]
    per_rank = loaders[0].samples_per_epoch
    assert per_rank == n // 2
    seen = [_take(loader, per_rank) for loader in loaders]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(epoch_permutation(n, 1, 0).tolist()[: 2 * per_rank])
    # a rank resumed from its state mid-epoch goes on with its own share
    mid = ShardLoader(prepared, batch_size=8, seed=1, rank=1, world_size=2)
    _run(mid, 3)
    again = ShardLoader(prepared, batch_size=8, seed=1, rank=1, world_size=2)
    again.load_state_dict(mid.state_dict())
    assert again.next_indices().tolist() == seen[1][24:32]


def test_resume_on_another_world_size_skips_and_repeats_nothing(prepared: Path) -> None:
    n = len(ShardStore(prepared))
    two = [ShardLoader(prepared, batch_size=8, seed=2, rank=r, world_size=2) for r in range(2)]
    seen = [i for loader in two for i in _take(loader, 40)]
    one = ShardLoader(prepared, batch_size=8, seed=2)
    one.load_state_dict(two[0].state_dict())
    assert one.samples_per_epoch == n - 80
    seen += _take(one, n - 80)
    assert sorted(seen) == list(range(n))  # the epoch exactly once over both world sizes


def test_state_of_other_data_is_refused(prepared: Path) -> None:
    loader = ShardLoader(prepared, batch_size=BATCH)
    state = {**loader.state_dict(), "manifest_sha256": "0" * 64}
    with pytest.raises(DataError, match="differ from the data of the saved loader state"):
        loader.load_state_dict(state)


def test_iter_batches_covers_the_validation_split_in_order(prepared: Path) -> None:
    m = read_manifest(prepared)
    rows = torch.cat([read_shard(prepared, s, m.seq_len) for s in m.splits["validation"].shards]).long()
    batches = list(iter_batches(prepared, "validation", batch_size=7))
    inputs = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(inputs, rows[:, :-1]) and torch.equal(labels, rows[:, 1:])
    store = ShardStore(prepared, "validation")  # reused: its shards are read once
    halves = [torch.cat([b[0] for b in iter_batches(store, batch_size=5, rank=r, world_size=2)]) for r in range(2)]
    assert torch.equal(halves[0], rows[0::2, :-1]) and torch.equal(halves[1], rows[1::2, :-1])


def test_missing_manifest_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="prepare-data"):
        ShardLoader(tmp_path, batch_size=2)


# ---- a data directory on S3 (moto's server, see tests/s3_server.py) ------------------------------------------


@pytest.fixture(scope="module")
def prepared_s3(ray_local, s3_server) -> str:
    """The corpus and settings of ``prepared``, written straight to ``s3://``."""
    uri = s3_server.uri(f"{__name__}/stdlib")
    prepare_dataset(uri, PrepareConfig(**TINY))
    return uri


def _copy(src: str, dst: str, names: list[str]) -> None:
    """Copy files ``names`` of directory ``src`` to ``dst`` (local paths or URIs)."""
    for name in names:
        storage.write_bytes(data_file(dst, name), storage.read_bytes(data_file(src, name)))


def _names(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir())


def test_s3_directory_is_byte_identical_to_a_local_one(prepared: Path, prepared_s3: str, s3_server) -> None:
    names = _names(prepared)
    assert s3_server.keys(prepared_s3) == names  # nothing else: no temporary manifest, no stray shard
    for name in names:
        assert storage.read_bytes(data_file(prepared_s3, name)) == (prepared / name).read_bytes(), name
    m = read_manifest(prepared_s3)
    assert m == read_manifest(prepared) and m.checksum == read_manifest(prepared).checksum
    assert read_tokenizer_json(prepared_s3) == (prepared / TOKENIZER_FILE).read_text(encoding="utf-8")
    shard = m.splits["train"].shards[2]
    assert sha256_file(data_file(prepared_s3, shard.file)) == shard.sha256


def test_loader_reads_the_same_batches_from_a_uri(prepared: Path, prepared_s3: str, s3_server, monkeypatch) -> None:
    n = len(ShardStore(prepared))
    steps = n // BATCH + 2  # into the second epoch
    for uri in (prepared_s3, f"file://{prepared}"):
        local = ShardLoader(prepared, batch_size=BATCH, seed=5, rank=1, world_size=2)
        remote = ShardLoader(uri, batch_size=BATCH, seed=5, rank=1, world_size=2)
        assert remote.store.data_dir == uri
        for _ in range(steps):
            for a, b in zip(local.next_batch(), remote.next_batch()):
                assert torch.equal(a, b)
        # a state saved on the URI resumes on the local copy (the same manifest) at the same sample
        resumed = ShardLoader(prepared, batch_size=BATCH, seed=0, rank=1, world_size=2)
        resumed.load_state_dict(remote.state_dict())
        assert torch.equal(resumed.next_batch()[0], remote.next_batch()[0])
        expected = list(iter_batches(prepared, "validation", batch_size=7))
        got = list(iter_batches(uri, "validation", batch_size=7))
        assert len(got) == len(expected) > 1
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    # the endpoint in the URI's query instead of the environment: every shard's location keeps it
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    in_query = s3_server.uri(f"{__name__}/stdlib", endpoint=True)
    rows = torch.cat([b[0] for b in iter_batches(in_query, "train", batch_size=64)])
    assert torch.equal(rows, torch.cat([b[0] for b in iter_batches(prepared, "train", batch_size=64)]))


def test_a_ray_worker_reads_the_s3_directory(prepared: Path, prepared_s3: str, ray_local) -> None:
    """ray_local starts after s3_server: its workers have the endpoint and credentials in their environment."""

    @ray_local.remote(num_cpus=0)
    def first_batch(data_dir: str) -> torch.Tensor:
        return ShardLoader(data_dir, batch_size=BATCH, seed=9).next_batch()[0]

    got = ray_local.get(first_batch.remote(prepared_s3), timeout=120)
    assert torch.equal(got, ShardLoader(prepared, batch_size=BATCH, seed=9).next_batch()[0])


def test_corrupt_or_missing_shard_on_s3_is_named(prepared: Path, prepared_s3: str, s3_prefix: str) -> None:
    _copy(prepared_s3, s3_prefix, _names(prepared))
    shards = read_manifest(s3_prefix).splits["train"].shards
    raw = bytearray(storage.read_bytes(data_file(s3_prefix, shards[1].file)))
    raw[len(raw) // 2] ^= 0xFF
    storage.write_bytes(data_file(s3_prefix, shards[1].file), bytes(raw))
    loader = ShardLoader(s3_prefix, batch_size=BATCH, shuffle=False)
    with pytest.raises(DataError, match=re.escape(f"shard {s3_prefix}/{shards[1].file}: checksum mismatch")):
        for _ in range(len(loader.store) // BATCH + 1):
            loader.next_batch()
    storage.delete_dir(s3_prefix)  # the whole prefix, manifest included, is gone
    with pytest.raises(DataError, match=re.escape(f"shard {s3_prefix}/{shards[0].file}: cannot read it (no such")):
        read_shard(s3_prefix, shards[0], TINY["seq_len"])


def test_prefix_without_a_manifest_is_not_a_dataset(prepared: Path, prepared_s3: str, s3_prefix: str) -> None:
    expected = f"{s3_prefix}: no {MANIFEST_FILE}; prepare the data first (`raymoe prepare-data --out {s3_prefix}`)"
    with pytest.raises(DataError, match=re.escape(expected)):  # nothing there
        ShardLoader(s3_prefix, batch_size=2)
    _copy(prepared_s3, s3_prefix, [n for n in _names(prepared) if n != MANIFEST_FILE])  # all but the manifest
    with pytest.raises(DataError, match=re.escape(expected)):
        ShardStore(s3_prefix)
    with pytest.raises(DataError, match=re.escape(f"s3://no-such-bucket-raymoe/data: no {MANIFEST_FILE}")):
        read_manifest("s3://no-such-bucket-raymoe/data")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prepare_that_fails_midway_leaves_no_manifest(
    prepared: Path, prepared_s3: str, s3_prefix: str, tmp_path: Path, monkeypatch, where: str
) -> None:
    """Preparing over a dataset removes its manifest first and writes the new one last."""
    out = s3_prefix if where == "s3" else str(tmp_path / "data")
    _copy(prepared_s3, out, _names(prepared))
    assert len(read_manifest(out).splits["train"].shards) > 1
    one_shard = PrepareConfig(**{**TINY, "shard_sequences": 100_000})
    real_write_split = prepare_module.write_split

    def write_split_then_fail(data_dir, split, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        info = real_write_split(data_dir, split, *args, **kwargs)
        if split == "validation":
            raise OSError("disk full (injected)")
        return info

    monkeypatch.setattr(prepare_module, "write_split", write_split_then_fail)
    with pytest.raises(OSError, match="injected"):
        prepare_dataset(out, one_shard)
    with pytest.raises(DataError, match=f"no {MANIFEST_FILE}"):
        read_manifest(out)
    monkeypatch.undo()
    manifest = prepare_dataset(out, one_shard)
    files = sorted(name for name, is_dir in storage.list_dir(out) if not is_dir)
    # the old shards (train-00001…) are gone, and no temporary manifest is left
    assert files == [MANIFEST_FILE, TOKENIZER_FILE, "train-00000.parquet", "validation-00000.parquet"]
    assert read_manifest(out).checksum == manifest.checksum
    assert ShardLoader(out, batch_size=BATCH).next_batch()[0].shape == (BATCH, TINY["seq_len"])
