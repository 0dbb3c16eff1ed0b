"""A private, verified copy of a checkpoint: what a loader that unpickles (DeepSpeed's) is allowed to read.

Verifying a checkpoint in place and then handing its path to a loader leaves a window: a file can be swapped
after its hash was checked, and DeepSpeed finds some of its files by pattern. stage_verified closes it: after
checking the manifest's signature and the checkpoint's entries, it puts each listed file (and nothing else)
into a fresh directory readable by this user alone, hashing what it put there, and the loader reads that
directory. A file is hard-linked when nobody but this user can change its contents (it is this user's and
not writable by group or others), so that the link's contents are as fixed as a copy's; otherwise, or across
file systems, it is copied.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from .errors import CheckpointError
from .files import check_file, check_listing

BLOCK = 1 << 20
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def stage_verified(directory: str | Path, into: str | Path, *, signed: bool) -> dict:
    """Verify `directory` as clipkit.checkpoint.verify does, leaving in `into` (an empty directory of mode 0700,
    e.g. from tempfile.mkdtemp) the files its manifest lists, each checked against its sha256 as it is put
    there; returns the manifest. Whatever happens to `directory` afterwards, `into` holds what was verified."""
    directory, into = Path(directory), Path(into)
    manifest = check_listing(directory, signed=signed)
    for name, entry in sorted(manifest["files"].items()):
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        size, digest = _private_file(directory / name, target)
        check_file(directory / name, entry, size, digest)
    return manifest


def _private_file(source: Path, target: Path) -> tuple[int, str]:
    """Link or copy `source` to `target`; the size and sha256 of what `target` holds."""
    try:  # O_NOFOLLOW: the entry checked as a regular file may since have become a link
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"{source} cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{source} is not a regular file: a checkpoint holds regular files only")
        if _link(source, target, info):
            return _hash(f, None)
        with open(target, "xb") as out:
            return _hash(f, out)


def _link(source: Path, target: Path, info: os.stat_result) -> bool:
    """Hard-link source's inode (the one `info` describes) as target, when only this user can change it."""
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return False
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_LINK:
            return False
        raise
    linked = os.lstat(target)
    if (linked.st_dev, linked.st_ino) != (info.st_dev, info.st_ino):  # source was replaced since it was opened
        os.unlink(target)
        return False
    return True


def _hash(f, out) -> tuple[int, str]:
    """Read `f` to its end (writing it to `out` when given): its size and sha256."""
    h, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(BLOCK), b""):
        h.update(block)
        size += len(block)
        if out is not None:
            out.write(block)
    return size, h.hexdigest()
