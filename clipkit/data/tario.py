"""Reading webdataset tar shards into samples: {"__key__", "__url__", ext: bytes, ...}.

Members are grouped by key as webdataset does (KEY.jpg + KEY.txt + KEY.json -> one sample; the key
is the path up to the first dot of the file name). Each sample carries its index in the shard, so a
resumed stream can step over samples it already delivered without reading their bytes.
"""
from __future__ import annotations

import re
import subprocess
import tarfile
from typing import Callable, Iterator

from .shards import open_shard
from .skips import SkipCounter

# webdataset's base_plus_ext: the key runs up to the first dot of the file name.
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str | None, str]:
    """("dir/KEY", "ext") for "dir/KEY.ext" (ext lower-cased, may hold dots: "seg.png");
    (None, "") for names that are not sample members."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("__") and base.endswith("__"):  # webdataset's meta files (__index__ ...)
        return None, ""
    m = _NAME.match(name)
    if m is None:
        return None, ""
    return m.group(1), m.group(2).lower()


def read_shard(url: str, counter: SkipCounter, want: Callable[[int], bool] | None = None,
               last: int | None = None) -> Iterator[tuple[int, dict]]:
    """(index, sample) for the samples of one shard. `want(index)` False steps over a sample
    without reading its bytes; reading stops after index `last`. Unreadable shards and damage are
    counted and logged, never raised: what was read before the damage is still delivered."""
    try:
        stream = open_shard(url)
    except Exception as exn:  # unreachable host, missing object, ...
        counter.skip("shard_open_error", url, repr(exn))
        return
    errors = _ShardErrors(stream, url, counter)
    try:
        yield from _samples(stream, url, counter, errors, want, last)
    finally:
        try:
            stream.close()
        except Exception as exn:  # e.g. a pipe: command that exited non-zero after its output was read
            errors.skip("shard_open_error", url, f"on close: {exn!r}")


class _ShardErrors:
    """Counts at most one shard-level failure per shard, so one broken shard is one count. A read that
    fails because a `pipe:` command died is the shard not opening, not a damaged tar."""

    def __init__(self, stream, url: str, counter: SkipCounter) -> None:
        self.stream, self.url, self.counter, self.counted = stream, url, counter, False

    def skip(self, reason: str, where: str, detail: object) -> None:
        if self.counted:
            return
        proc = getattr(self.stream, "proc", None)  # webdataset's Pipe keeps its subprocess here
        if proc is not None and _exit_status(proc, at_eof=reason == "empty_shard") not in (None, 0):
            reason, detail = "shard_open_error", f"command exited with {proc.returncode}: {detail}"
        self.counted = True
        self.counter.skip(reason, where, detail)


def _exit_status(proc, at_eof: bool) -> int | None:
    # At the end of its output the command has closed stdout and is exiting, but may not have exited yet:
    # a bare poll() races with it and would misread a failed command as an empty shard. Elsewhere the
    # command may still be writing, so it is only polled.
    if not at_eof:
        return proc.poll()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def _samples(stream, url: str, counter: SkipCounter, errors: _ShardErrors, want: Callable[[int], bool] | None,
             last: int | None) -> Iterator[tuple[int, dict]]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except tarfile.ReadError as exn:
        reason = "empty_shard" if "empty file" in str(exn) else "tar_read_error"
        errors.skip(reason, url, repr(exn))
        return
    except Exception as exn:  # a remote read failing on the very first block
        errors.skip("tar_read_error", url, repr(exn))
        return
    index, current, keep = -1, None, False
    members = iter(tar)
    while True:
        try:
            member = next(members, None)
        except Exception as exn:  # damage in a header: the sample before it is whole
            errors.skip("tar_read_error", url, repr(exn))
            break
        if member is None:
            break
        if not member.isfile():
            continue
        key, ext = split_name(member.name)
        if key is None:
            continue
        if current is None or key != current["__key__"] or ext in current:
            if current is not None and keep:
                yield index, current
            index += 1
            if last is not None and index > last:
                return
            current = {"__key__": key, "__url__": url}
            keep = want is None or want(index)
        if keep:
            try:
                current[ext] = tar.extractfile(member).read()
            except Exception as exn:  # the member's data is cut short: its sample is incomplete
                errors.skip("tar_read_error", f"{url}:{key}", repr(exn))
                return
    if current is not None and keep:
        yield index, current
    if index < 0:
        errors.skip("empty_shard", url, "no samples")
