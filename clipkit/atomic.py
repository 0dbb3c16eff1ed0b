"""Files that appear whole or not at all: the one way clipkit's writers put a finished file under its name.

    with atomic_file("OUT/00000.tar") as f:      # f: a binary file object on a temporary file
        f.write(...)                             # an exception here leaves no OUT/00000.tar (and no temporary)
    atomic_write_text("RUN/result.json", text)
    with atomic_path("IDX/image.index") as tmp:  # for writers that open the file by name (faiss, safetensors)
        faiss.write_index(index, str(tmp))
    create_exclusive(KEY, data)                  # a file made once, by whichever process gets there first

The temporary file lies beside the final one (same folder, so the rename is one atomic step on the same file
system) as .NAME.tmp: hidden, and ending in .tmp, so globs for *.tar, *.npy, *.parquet or *.json never match
it; one a killed run left behind is replaced by the next write of the same file. It is
flushed and fsynced before it is renamed over the final name, and the folder is fsynced after: a crash at
any moment leaves the old file, or the complete new one, never a truncated file under the final name. A
process killed outright (SIGKILL, power loss) may leave the hidden temporary behind; nothing reads it. One
file has one writer at a time (clipkit's ranks and workers write files of their own).

fsync_path is the strict fsync (errors raise) that checkpoints use for their files and folders; the writers
here fsync the folder on a best-effort basis (fsync_folder) unless asked to be strict.

This module imports nothing of clipkit: every package, checkpoint included, can use it.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def temporary_name(path: Path) -> Path:
    """The hidden name beside `path` that its content is written under first."""
    return path.with_name(f".{path.name}.tmp")


def open_temporary(path: Path) -> BinaryIO:
    """A new, empty temporary file for `path`. A leftover of a killed run is removed first, and the file is
    created exclusively, so a link planted under the temporary name is never written through."""
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)
    return open(tmp, "xb")  # created with the umask's mode, as a plain open() would


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder: make the renames in it durable); errors raise."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable where the platform allows opening and fsyncing a folder; a
    platform or file system that does not is no reason to fail a write that is complete."""
    try:
        fsync_path(folder)
    except OSError:
        pass


def _sync_folder(folder: Path, strict: bool) -> None:
    if strict:
        fsync_path(folder)
    else:
        fsync_folder(folder)


@contextmanager
def atomic_file(path: str | Path, *, strict: bool = False) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` when the block ends without an exception.
    strict: a folder fsync that fails raises (checkpoints: a pointer that may not survive a crash is an error)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open_temporary(path) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent, strict)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The temporary name of `path`, for a writer that opens the file by name itself (faiss, safetensors,
    a parquet writer): once the block ends without an exception the file there is fsynced and replaces
    `path`; after one, it is removed. A leftover of a killed run is removed before the block starts."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def create_exclusive(path: str | Path, data: bytes) -> bool:
    """Create `path` holding `data`, readable by its owner alone (0600), unless it exists: the data goes to a
    temporary file of a unique name, fsynced, then hard-linked to `path`, which never replaces a file, so
    of processes racing to create it the first one's file is everyone's. True when this call created it.
    The folder is fsynced strictly: a key that may not survive a crash is an error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
    finally:
        os.unlink(tmp)
    fsync_path(path.parent)
    return created


def write_temporary(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write(f)` into the temporary file of `path`, complete and fsynced but not yet renamed: for files that
    must appear together (see publish). Nothing is left when `write` raises."""
    path = Path(path)
    try:
        with open_temporary(path) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temporary_name(path).unlink(missing_ok=True)
        raise
    return temporary_name(path)


def publish(files: list[tuple[Path, Path]]) -> None:
    """Rename complete temporaries (from write_temporary) to their final names, in the given order: readers
    that take the last one's presence as the mark of a whole set see it only once the others are in place.
    Renames into several folders cannot be one step: if one fails (or is interrupted by an exception), the
    files renamed so far are removed again and the remaining temporaries deleted, so the set is whole or
    absent. Only a process killed between two renames leaves the first ones; the set's next write replaces
    them."""
    done: list[Path] = []
    try:
        for tmp, path in files:
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):
            path.unlink(missing_ok=True)
        for tmp, _ in files:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for _, path in files):
        fsync_folder(folder)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *, strict: bool = False) -> Path:
    """`write(f)` into a temporary file, then rename it to `path`."""
    with atomic_file(path, strict=strict) as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, *, strict: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), strict=strict)


def atomic_write_text(path: str | Path, text: str, *, strict: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), strict=strict)
