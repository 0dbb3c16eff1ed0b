"""The checkpoint signing key: proof that this installation wrote a checkpoint's manifest.

The key is a file readable by its owner alone (mode 0600), `~/.config/clipkit/checkpoint.key` or the one
CLIPKIT_CHECKPOINT_KEY names, created on first use. It is created whole or not at all: a new key is written
to a temporary file beside it, fsynced and hard-linked to the key's name, which fails if another process
linked its key first; every process then reads the one key that won. A key shorter than MIN_KEY_BYTES, or
one that group or others may read or write, is refused with the fix (as ssh refuses a private key).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..atomic import create_exclusive
from .errors import CheckpointError

KEY_ENV = "CLIPKIT_CHECKPOINT_KEY"
DEFAULT_KEY_PATH = Path("~/.config/clipkit/checkpoint.key")
MIN_KEY_BYTES = 32  # HMAC-SHA256 keys of fewer bytes than its output weaken it (RFC 2104, section 3)
NEW_KEY_BYTES = 32  # random bytes in a new key (written as 64 hex digits)


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or DEFAULT_KEY_PATH).expanduser()


def signing_key(create: bool = True) -> bytes | None:
    """This user's checkpoint key; None when it does not exist and create is False."""
    path = key_path()
    key = _read_key(path)
    if key is None and create:
        _create_key(path)
        key = _read_key(path)
    return key


def _read_key(path: Path) -> bytes | None:
    """The key in `path` once it passes the checks; None when there is no file there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symbolic link, which could point at a key someone else controls
        raise CheckpointError(f"checkpoint key {path} cannot be read ({e.strerror}): it must be a regular file "
                              f"of this user's, mode 0600; delete it to have a new one made") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"checkpoint key {path} is not a regular file: delete it to have a new one made")
        if info.st_mode & 0o077:
            raise CheckpointError(f"checkpoint key {path} is accessible by group or others (mode "
                                  f"{stat.S_IMODE(info.st_mode):04o}): run chmod 600 {path}")
        key = f.read()
    if len(key) < MIN_KEY_BYTES:
        raise CheckpointError(f"checkpoint key {path} holds {len(key)} bytes, fewer than the {MIN_KEY_BYTES} a "
                              f"key needs: delete it to have a new one made (DeepSpeed checkpoints signed with "
                              f"it are then refused)")
    return key


def _create_key(path: Path) -> None:
    """Put a new key at `path` unless another process got there first (then theirs is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    create_exclusive(path, os.urandom(NEW_KEY_BYTES).hex().encode())
