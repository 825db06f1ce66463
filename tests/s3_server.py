"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, one per test session.

``s3_server`` sets the AWS variables in ``os.environ`` for the whole session, so pyarrow
(``FileSystem.from_uri``, which :mod:`raymoe.platform.storage` uses), boto3 and every process
started afterwards reach it with plain ``s3://bucket/key`` URIs: ``AWS_ENDPOINT_URL`` with an
``http://`` endpoint is honoured by pyarrow's ``from_uri`` (not by a bare ``pyarrow.fs.S3FileSystem()``).
Ray workers inherit the environment only at ``ray.init``, hence the ``ray_local`` fixture depends on
this one. Where the environment cannot be relied on, :meth:`S3Server.uri` with ``endpoint=True``
puts the endpoint in the URI's query instead (``?endpoint_override=127.0.0.1:PORT&scheme=http``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BUCKET = "raymoe-test"
HOST = "127.0.0.1"
REGION = "us-east-1"
CONFLICTING_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")  # would win over ours


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server.

    Args:
        endpoint: ``http://127.0.0.1:PORT``.
        bucket: a bucket created on it.
        env: the variables set in ``os.environ`` while it runs (pass them to a subprocess's env).
    """

    endpoint: str
    bucket: str
    env: dict[str, str]

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``, as pyarrow's ``endpoint_override`` wants it."""
        return self.endpoint.removeprefix("http://")

    def uri(self, path: str = "", *, endpoint: bool = False) -> str:
        """``s3://bucket/path``; with ``endpoint``, the server named in the query (no environment needed)."""
        uri = f"s3://{self.bucket}/{path.lstrip('/')}".rstrip("/")
        return f"{uri}?endpoint_override={self.host_port}&scheme=http" if endpoint else uri

    def client(self):  # noqa: ANN201
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION)

    def keys(self, uri: str) -> list[str]:
        """The names of the objects under ``uri`` (``s3://bucket/prefix``), relative to it and sorted.

        Directory markers (empty keys ending in ``/``, which pyarrow's ``create_dir`` makes) are left out.
        """
        bucket, _, prefix = uri.split("?")[0].removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/"
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = (obj["Key"] for page in pages for obj in page.get("Contents", []))
        return sorted(key[len(prefix) :] for key in keys if not key.endswith("/"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1 and a free port, with a bucket; the AWS variables set until the session ends."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }
    try:
        with pytest.MonkeyPatch.context() as patch:  # the environment comes back as it was at the end
            for name in CONFLICTING_VARIABLES:
                patch.delenv(name, raising=False)
            for name, value in env.items():
                patch.setenv(name, value)
            s3 = S3Server(endpoint=endpoint, bucket=BUCKET, env=env)
            s3.client().create_bucket(Bucket=BUCKET)
            yield s3
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh, empty ``s3://bucket/<test name>-<random>`` for one test."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
    return s3_server.uri(f"{name}-{uuid.uuid4().hex[:8]}")
