"""``[storage.s3]``: the S3 backend's settings, in a module of their own so that reading a
config (every command, and each worker's identity child) does not import boto3."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Config:
    """``[storage.s3]``: the S3 backend's settings."""

    bucket: str = ""
    prefix: str = ""
    region: str = ""
    endpoint_url: str = ""
    redirect_get: bool = False
    presign_ttl_s: int = 300
    max_connections: int = 32
    timeout_s: float = 10.0
    index: bool = True
    index_refresh_s: int = 300
    # Trust a complete index for misses too (no S3 HEAD per miss): only when this service is
    # the bucket's only writer.
    only_writer: bool = False
