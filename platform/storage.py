"""Files on a local path or any pyarrow filesystem URI (``s3://bucket/run``, ``gs://…``, ``file:///x``).

Every checkpoint and data read or write in raymoe goes through these helpers, so a location is
always a string that may be a local path or a URI. Errors are :class:`StorageError`, naming the
location and what went wrong.

S3-compatible stores are configured as pyarrow configures them: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` in the environment, or
query parameters of the URI (``s3://bucket/run?endpoint_override=host:9000&scheme=http``).
"""

from __future__ import annotations

import json
import os
from typing import Any


class StorageError(OSError):
    """A location cannot be opened, read or written; the message names it."""


def filesystem(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local path or a URI."""
    import pyarrow.fs as pafs

    location = str(location)
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as exc:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
            raise StorageError(f"cannot open location {location!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(location)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (query parameters of a URI stay at its end)."""
    base = str(base)
    if "://" in base and "?" in base:
        head, _, query = base.partition("?")
        return "/".join([head.rstrip("/"), *parts]) + "?" + query
    return "/".join([base.rstrip("/"), *parts])


def is_uri(location: str) -> bool:
    return "://" in str(location)


def is_local(fs: Any) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def exists(location: str) -> bool:
    """Whether a file or directory is at ``location``."""
    fs, path = filesystem(location)
    return fs.get_file_info(path).type.name != "NotFound"


def is_file(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(location: str) -> bytes:
    """The whole file at ``location``; FileNotFoundError when there is none."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if fs.get_file_info(path).type.name == "NotFound":
            raise FileNotFoundError(location) from None
        raise StorageError(f"cannot read {location}: {exc}") from None


def read_text(location: str) -> str | None:
    """The file at ``location`` as UTF-8 text, or None when there is no such file."""
    try:
        return read_bytes(location).decode()
    except FileNotFoundError:
        return None


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` to ``location`` (its parent directories are made on a local disk)."""
    fs, path = filesystem(location)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise StorageError(f"cannot write {location}: {exc}") from None


def read_json(location: str) -> Any:
    """The JSON at ``location``; FileNotFoundError when absent, StorageError when unreadable."""
    data = read_bytes(location)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"cannot read {location}: not JSON ({exc})") from None


def write_json(location: str, obj: Any) -> None:
    write_bytes(location, json.dumps(obj, indent=1).encode())


def make_dirs(location: str) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def list_dir(location: str) -> list[tuple[str, bool]]:
    """(name, is a directory) of the entries directly in ``location`` ([] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [(info.base_name, info.type == pafs.FileType.Directory) for info in infos]


def delete_dir(location: str) -> None:
    """Remove a directory and everything in it (nothing when it is not there)."""
    fs, path = filesystem(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if fs.get_file_info(path).type.name != "NotFound":
            raise StorageError(f"cannot remove {location}: {exc}") from None
