"""Shard specs: which tar files a run reads, with what sampling weight, and how each one is opened.

A spec is a path or URL with optional brace patterns, several joined by "::" (or a list of them):

    /data/laion/{00000..41455}.tar
    s3://bucket/datacomp/{00000000..00001023}.tar::s3://bucket/cc12m/{00000..01242}.tar
    pipe:aws s3 cp s3://bucket/{00000..00099}.tar -

Weights follow OpenCLIP's `--train-data-upsampling-factors` convention: one factor per "::" source
("1::2"), applied to each of that source's shards, so a source's share of the samples is
proportional to factor x number of shards.
"""
from __future__ import annotations

import os
from pathlib import Path

import braceexpand
import fsspec


class ShardSpecError(ValueError):
    """A shard spec or shard path a user must fix (or data that cannot be used): a one-line message.

    Raised in a DataLoader worker, it reaches the training process re-created by torch with the whole
    worker traceback as its message; the one line is recovered from it here."""

    def __init__(self, *args) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0], type(self).__name__),)
        super().__init__(*args)


def _worker_message(message: str, name: str) -> str:
    """The message of "Caught NAME in DataLoader worker process N.\nOriginal Traceback ... NAME: msg"."""
    head = f"Caught {name} in DataLoader worker process "
    if not message.startswith(head) or "\n" not in message:
        return message
    where = message[len(f"Caught {name} "):message.index("\n")].rstrip(".")
    lines = [line for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        _, sep, text = line.partition(f"{name}: ")
        if sep:
            return f"{text} ({where})"
    return message


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://") or url.startswith("pipe:")


def split_sources(spec: str | list[str]) -> list[str]:
    """The "::"-separated (or listed) sources of a spec, braces not yet expanded."""
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    return [p.strip() for p in parts if p and p.strip()]


def expand_shards(spec: str | list[str], check_local: bool = True) -> list[str]:
    """Expand "a/{000..009}.tar::b/x.tar" (or a list of such specs) into a flat list of shard URLs.

    Local shards are checked up front so that a wrong path fails at start-up with its name, not
    inside a loader worker minutes later.
    """
    urls, _ = expand_sources(spec, None, check_local=check_local)
    return urls


def parse_weights(weights: str | list[float] | None, n_sources: int, spec: object) -> list[float] | None:
    if weights is None or weights == "":
        return None
    if isinstance(weights, str):
        try:
            values = [float(w) for w in weights.split("::")]
        except ValueError:
            raise ShardSpecError(f"weights {weights!r} must be numbers joined by '::', e.g. '1::2'") from None
    else:
        values = [float(w) for w in weights]
    if len(values) != n_sources:
        raise ShardSpecError(f"{len(values)} weights ({weights!r}) for {n_sources} sources in spec {spec!r}: "
                             f"give one upsampling factor per '::'-separated source")
    if any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise ShardSpecError(f"weights {weights!r} must be >= 0 with at least one > 0")
    return values


def expand_sources(spec: str | list[str], weights: str | list[float] | None = None,
                   check_local: bool = True) -> tuple[list[str], list[float] | None]:
    """(shard URLs, per-shard upsampling factor or None) for a spec and its per-source weights."""
    sources = split_sources(spec)
    factors = parse_weights(weights, len(sources), spec)
    urls: list[str] = []
    per_shard: list[float] = []
    for i, source in enumerate(sources):
        expanded = list(braceexpand.braceexpand(source))
        urls.extend(expanded)
        per_shard.extend([factors[i] if factors else 1.0] * len(expanded))
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} names no shards")
    if check_local:
        _check_local(urls, spec)
    check_protocols(urls)
    return urls, (per_shard if factors else None)


def _check_local(urls: list[str], spec: object) -> None:
    missing = [u for u in urls if not is_remote(u) and not Path(_local_path(u)).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardSpecError(f"shard not found: {missing[0]}{more} (from spec {spec!r})")


def check_protocols(urls: list[str]) -> None:
    """Fail at start-up, with the package to install, when a URL scheme has no fsspec backend here
    (otherwise every shard would be skipped as unreachable, one by one, inside the workers)."""
    protocols = {u.split("://", 1)[0] for u in urls if is_remote(u) and not u.startswith("pipe:")}
    for proto in sorted(protocols):
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as e:
            raise ShardSpecError(f"cannot read {proto}:// shards here: {e}") from None


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
    # Tar members are read front to back: a large read-ahead block keeps remote round trips few.
    fs, path = fsspec.core.url_to_fs(url)
    return fs.open(path, "rb", block_size=8 << 20)
