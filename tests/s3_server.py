"""A real S3 endpoint on loopback for the object-storage tests: moto's server in a subprocess.

A plain helper module (no fixtures): the test files wrap :func:`start` in their own fixtures. The
server speaks the S3 REST API over HTTP, so obstore (the code under test) and boto3 (the test's
independent view: listings, multipart uploads, ETags) talk to it exactly as to a real endpoint.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.moto_s3 import CREDENTIALS, start_moto, stop


@dataclass
class S3Server:
    """A running moto server: its endpoint, the environment pointing at it, and a boto3 client."""

    endpoint: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` (a plain string prefix) and its size."""
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def upload_folder(self, bucket: str, folder: Path, prefix: str) -> None:
        """Upload every file of ``folder`` under ``prefix/``."""
        client = self.client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    def etags(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """Every object under ``prefix`` and its ETag (from a HEAD of each)."""
        client = self.client()
        return {k: client.head_object(Bucket=bucket, Key=k)["ETag"] for k in self.keys(bucket, prefix)}

    def uploads(self, bucket: str) -> list[str]:
        """The keys of the multipart uploads still open in ``bucket``."""
        return [u["Key"] for u in self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@contextlib.contextmanager
def start() -> Iterator[S3Server]:
    """Run ``moto_server -H 127.0.0.1 -p PORT`` (:func:`tests.moto_s3.start_moto`) until the block ends."""
    with tempfile.TemporaryDirectory(prefix="moto-") as logs:
        proc, endpoint = start_moto(Path(logs) / "moto.log")
        try:
            yield S3Server(endpoint, proc)
        finally:
            stop(proc)
