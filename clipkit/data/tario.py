"""Reading webdataset tar shards into samples: {"__key__", "__url__", ext: bytes, ...}.

Members are grouped by key as webdataset does (KEY.jpg + KEY.txt + KEY.json -> one sample; the key
is the path up to the first dot of the file name). Each sample carries its index in the shard, so a
resumed stream can step over samples it already delivered without reading their bytes.

A shard is read as a stream (local files, fsspec URLs and pipes alike), never seeked. A complete tar
ends with an end-of-archive block (512 zero bytes; writers add a second one and pad to a 10 KiB
record). Python's tarfile, reading a stream, also ends quietly where the data stops in or before a
header, or at a damaged header after the first member; those are told apart here from the header
read that ended the archive, so a shard cut short (a partial download, a disk that filled up while
it was written) is counted, with what was read before the cut still delivered.
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


def count_samples(url: str) -> int:
    """How many sample indices read_shard gives this shard (its members are read over, not kept; damage
    ends the count where reading ends; an unreadable shard counts 0)."""
    indices: list[int] = []
    counter = SkipCounter()
    counter.muted = True  # the stream that reads the shard counts its damage

    def over(index: int) -> bool:
        indices.append(index)
        return False

    for _ in read_shard(url, counter, over):
        pass
    return indices[-1] + 1 if indices else 0


class _ShardErrors:
    """Counts at most one shard-level failure per shard, so one broken shard is one count. A read that
    fails because a `pipe:` command died is the shard not opening, not a damaged tar."""

    def __init__(self, stream, url: str, counter: SkipCounter) -> None:
        self.stream, self.url, self.counter, self.counted = stream, url, counter, False

    def skip(self, reason: str, where: str, detail: object, at_eof: bool = False) -> None:
        if self.counted:
            return
        proc = getattr(self.stream, "proc", None)  # webdataset's Pipe keeps its subprocess here
        at_eof = at_eof or reason == "empty_shard"
        if proc is not None and _exit_status(proc, at_eof=at_eof) not in (None, 0):
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


class _WatchedInfo(tarfile.TarInfo):
    """Notes on the archive why tarfile's last header read failed: reading a stream, tarfile takes a
    missing header (the data ends between members), a partial one (it ends inside a header block) and,
    after the first member, a damaged one for the end of the archive, just as it takes a zero block."""

    @classmethod
    def fromtarfile(cls, tar):
        tar.clipkit_stop = None
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exn:
            tar.clipkit_stop = exn
            raise


def _unclean_end(tar) -> tuple[str, bool] | None:
    """(why, whether the data ended there) for an archive whose members ran out before its
    end-of-archive block; None when it ended with one."""
    stop = getattr(tar, "clipkit_stop", None)
    where = f"at byte {tar.offset}"
    if isinstance(stop, tarfile.EmptyHeaderError):
        return f"truncated: the data ends {where}, after the last member, without the end-of-archive blocks", True
    if isinstance(stop, tarfile.TruncatedHeaderError):
        return f"truncated: the data ends inside the header block {where}", True
    if isinstance(stop, tarfile.InvalidHeaderError):
        return f"damaged header {where} ({stop}): the rest of the shard cannot be read", False
    return None  # a zero block (EOFHeaderError): the end of the archive


def _ended(exn: Exception) -> bool:
    """Whether a read error means the data stopped (rather than bytes that make no sense)."""
    return isinstance(exn, EOFError) or "unexpected end of data" in str(exn) or "truncated header" in str(exn)


def _samples(stream, url: str, counter: SkipCounter, errors: _ShardErrors, want: Callable[[int], bool] | None,
             last: int | None) -> Iterator[tuple[int, dict]]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedInfo)
    except tarfile.ReadError as exn:
        reason = "empty_shard" if "empty file" in str(exn) else "tar_read_error"
        errors.skip(reason, url, repr(exn), at_eof=_ended(exn))
        return
    except Exception as exn:  # a remote read failing on the very first block
        errors.skip("tar_read_error", url, repr(exn))
        return
    index, current, keep = -1, None, False
    members = iter(tar)
    damage = None  # (where, what, whether the data ended there) when reading stopped before the archive's end
    while True:
        try:
            member = next(members, None)
        except Exception as exn:  # damage in (or data cut short before) a header: the sample before it is whole
            damage = url, f"truncated or damaged at byte {tar.offset}: {exn!r}", _ended(exn)
            break
        if member is None:
            end = _unclean_end(tar)
            if end is not None:
                damage = url, *end
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
            except Exception as exn:  # the member's data is cut short: the members before it are whole
                damage = (f"{url}:{key}", f"truncated inside member {member.name} (data at byte "
                          f"{member.offset_data}, {member.size} bytes): {exn!r}", _ended(exn))
                break
    if damage is not None:
        errors.skip("tar_read_error", damage[0], damage[1], at_eof=damage[2])
    if current is not None and keep and len(current) > 2:  # a sample keeps the members read whole before a cut
        yield index, current
    if index < 0 and damage is None:
        errors.skip("empty_shard", url, "no samples")
