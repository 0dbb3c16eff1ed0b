"""Files that appear whole or not at all: the one way clipkit's writers put a finished file under its name.

    with atomic_file("OUT/00000.tar") as f:      # f: a binary file object on a temporary file
        f.write(...)                             # an exception here leaves no OUT/00000.tar (and no temporary)
    atomic_write_text("RUN/result.json", text)

The temporary file lies beside the final one (same folder, so the rename is one atomic step on the same file
system) as .NAME.tmp: hidden, and ending in .tmp, so globs for *.tar, *.npy, *.parquet or *.json never match
it; one a killed run left behind is replaced by the next write of the same file. It is
flushed and fsynced before it is renamed over the final name, and the folder is fsynced after: a crash at
any moment leaves the old file, or the complete new one, never a truncated file under the final name. A
process killed outright (SIGKILL, power loss) may leave the hidden temporary behind; nothing reads it. One
file has one writer at a time (clipkit's ranks and workers write files of their own).

This module imports nothing of clipkit: data, models, retrieval and finetune can all use it.
"""
from __future__ import annotations

import os
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


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` when the block ends without an exception."""
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
    fsync_folder(path.parent)


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


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write(f)` into a temporary file, then rename it to `path`."""
    with atomic_file(path) as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
