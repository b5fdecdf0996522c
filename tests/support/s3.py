"""A real S3 API for tests: moto's server (``ThreadedMotoServer``) on 127.0.0.1, in this process, spoken
to over HTTP by s3fs/botocore exactly as a real store would be.

One difference from S3 matters to tests of conditional writes: moto checks ``If-Match`` /
``If-None-Match`` and stores the object in two steps without a lock (moto 5.2.5,
``S3Response.put_object``), so two truly simultaneous conditional PUTs of one key can both pass,
which S3 never allows. ``moto_s3_server`` therefore serialises moto's object PUTs and DELETEs while
it runs (one request at a time per server; the test objects are tiny), making each conditional
write atomic as on S3.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

BUCKET = "qarm-test"
# Dummy credentials: moto accepts any; botocore refuses to sign without some.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# Variables that could point a test at a developer's real account or make botocore probe for one.
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
         "AWS_ENDPOINT_URL", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


@dataclass(frozen=True)
class S3Server:
    endpoint: str      # http://127.0.0.1:<port>
    bucket: str


@contextlib.contextmanager
def _atomic_conditional_writes() -> Iterator[None]:
    """Make moto's check-then-store of an object PUT or DELETE one step (see the module docstring)."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    originals = {name: getattr(S3Response, name) for name in ("put_object", "delete_object")}

    def serialised(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(S3Response, name, serialised(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(S3Response, name, fn)


@contextlib.contextmanager
def moto_s3_server(bucket: str = BUCKET) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 (a free port) holding an empty ``bucket``; stopped on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)       # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with _atomic_conditional_writes():
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                         region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
            yield S3Server(endpoint=endpoint, bucket=bucket)
        finally:
            server.stop()
            werkzeug_log.setLevel(level)


def use_s3_server(monkeypatch: pytest.MonkeyPatch, server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Point botocore at ``server`` for one test (endpoint and dummy credentials in the environment,
    no profile or config file of the developer's) and return a fresh home URL,
    ``s3://<bucket>/<unique prefix>``, so that tests sharing the server never see each other's objects."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    empty = tmp_path_factory.mktemp("aws")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    return f"s3://{server.bucket}/home-{uuid.uuid4().hex[:8]}"
