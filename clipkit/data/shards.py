"""Shard specs: which tar files a run reads, and how each one is opened."""
from __future__ import annotations

import os
from pathlib import Path

import braceexpand
import fsspec


class ShardSpecError(ValueError):
    """A shard spec or shard path a user must fix."""


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://") or url.startswith("pipe:")


def expand_shards(spec: str | list[str], check_local: bool = True) -> list[str]:
    """Expand "a/{000..009}.tar::b/x.tar" (or a list of such specs) into a flat list of shard URLs.

    Local shards are checked up front so that a wrong path fails at start-up with its name, not
    inside a loader worker minutes later.
    """
    parts = spec if isinstance(spec, list) else str(spec).split("::")
    urls: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} names no shards")
    if check_local:
        missing = [u for u in urls if not is_remote(u) and not Path(_local_path(u)).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ShardSpecError(f"shard not found: {missing[0]}{more} (from spec {spec!r})")
    return urls


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else os.path.expanduser(url)


def open_shard(url: str):
    """A binary stream for a shard: local paths and any fsspec URL (s3://, gs://, http(s)://, ...);
    `pipe:CMD` runs CMD and reads its stdout, as OpenCLIP's specs do."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if not is_remote(url):
        return open(_local_path(url), "rb")
    return fsspec.open(url, "rb").open()
