"""safetensors files on any pyarrow filesystem, read and written tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte range) and the tensors' bytes. :class:`TensorFile` reads the header once and then each
tensor asked for by one ranged read (neighbouring tensors in one read, up to
:data:`MAX_READ_BYTES`), so a process holds at most the tensors it asked for, whether the file is
on a local disk or in an object store. :func:`write_tensors` writes the header and then one tensor
at a time, never the whole file in memory. Nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import CheckpointError

MAX_READ_BYTES = 64 * 2**20  # neighbouring tensors are read together up to this size (fewer object-store requests)
HEADER_LIMIT_BYTES = 100 * 2**20  # a longer header is a corrupt file

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file as its header describes it (no data read)."""

    name: str
    file: str  # the file's name in its directory
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: "F32", "BF16", "F8_E4M3", ...
    begin: int  # byte range in the file's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class TensorFile:
    """The header of a safetensors file at ``location`` (local path or URI); tensors are read on demand."""

    def __init__(self, location: str) -> None:
        self.location = str(location)
        self.file = self.location.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        fs, path = storage.filesystem(self.location)
        self._fs, self._path = fs, path
        try:
            with fs.open_input_file(path) as f:
                size = f.size()
                if size < 8:
                    raise CheckpointError(f"{self.location} is not a safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", f.read_at(8, 0))
                if n > HEADER_LIMIT_BYTES or 8 + n > size:
                    raise CheckpointError(f"{self.location} is not a safetensors file (header of {n} bytes)")
                header = json.loads(f.read_at(n, 8))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.location} is missing") from None
        except (OSError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"cannot read safetensors file {self.location}: {exc}") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                info = TensorInfo(
                    name, self.file, tuple(int(d) for d in entry["shape"]), str(entry["dtype"]), begin, end
                )
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.location}: malformed header entry for {name}") from None
            if info.dtype not in DTYPES:
                raise CheckpointError(
                    f"{self.location}: tensor {name} has dtype {info.dtype}, which raymoe cannot read"
                )
            numel = 1
            for d in info.shape:
                numel *= d
            if info.nbytes != numel * DTYPES[info.dtype].itemsize or self.data_start + end > size:
                raise CheckpointError(f"{self.location}: tensor {name}'s byte range does not match its shape")
            self.tensors[name] = info

    def read(self, names: Iterable[str], rows: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (``rows[name] = r``: only row r of its first dimension, read alone)."""
        rows = rows or {}
        spans = []  # (begin, end, name, shape)
        for name in names:
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.location} has no tensor {name}")
            if name in rows:
                r = rows[name]
                row_bytes = info.nbytes // info.shape[0]
                spans.append((info.begin + r * row_bytes, info.begin + (r + 1) * row_bytes, name, info.shape[1:]))
            else:
                spans.append((info.begin, info.end, name, info.shape))
        spans.sort()
        out: dict[str, torch.Tensor] = {}
        try:
            with self._fs.open_input_file(self._path) as f:
                i = 0
                while i < len(spans):  # one read for a run of adjacent tensors
                    j = i + 1
                    while (
                        j < len(spans)
                        and spans[j][0] == spans[j - 1][1]
                        and spans[j][1] - spans[i][0] <= MAX_READ_BYTES
                    ):
                        j += 1
                    begin, end = spans[i][0], spans[j - 1][1]
                    buf = bytearray(end - begin)  # one copy: straight from the file into the tensors' memory
                    f.seek(self.data_start + begin)
                    if f.readinto(buf) != len(buf):
                        raise CheckpointError(f"{self.location} ends inside tensor {spans[i][2]}")
                    data = memoryview(buf)
                    for b, e, name, shape in spans[i:j]:
                        dtype = DTYPES[self.tensors[name].dtype]
                        if e == b:
                            out[name] = torch.empty(shape, dtype=dtype)
                            continue
                        t = torch.frombuffer(data[b - begin : e - begin], dtype=dtype)  # a view of the read
                        if (b - begin) % dtype.itemsize:  # misaligned for its dtype: a copy of its own
                            t = t.clone()
                        out[name] = t.reshape(shape)
                    i = j
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor data of {self.location}: {exc}") from None
        return out


def write_tensors(location: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` as a safetensors file at ``location``, one tensor at a time; returns the names written."""
    # largest element first, as safetensors orders them: every tensor then starts aligned for its dtype
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in NAMES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    fs, path = storage.filesystem(location)
    if storage.is_local(fs):
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with fs.open_output_stream(path) as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                t = tensors[name].detach().cpu().contiguous().reshape(-1)
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).numpy()))
    except OSError as exc:
        raise CheckpointError(f"cannot write {location}: {exc}") from None
    return names
