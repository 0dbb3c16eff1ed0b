"""Checkpoint directories on disk: written whole or not at all, verified before anything reads them.

    checkpoints/
        step_00000600/            one checkpoint
            manifest.json         written last: format, step, engine, sha256 and size of every other file,
                                  and an HMAC of all that under this machine's checkpoint key
            ...                   the files of the state providers (weights, optimizer, per-rank state)
        latest                    the name of the newest complete checkpoint

A checkpoint is written as step_N.tmp/: every file is fsynced, the manifest written and fsynced last,
the directory renamed to step_N and its parent fsynced. A crash at any point leaves either a complete
checkpoint or a .tmp directory, which the next run removes. Nothing here unpickles anything.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import shutil
from pathlib import Path

FORMAT = "clipkit-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"step_(\d{8})")
TMP_SUFFIX = ".tmp"
KEY_ENV = "CLIPKIT_CHECKPOINT_KEY"
DEFAULT_KEY_PATH = Path("~/.config/clipkit/checkpoint.key")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, found, trusted or used; the message names it."""


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def list_steps(directory: str | Path) -> list[Path]:
    """Complete checkpoint directories (temporaries excluded), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the .tmp directories an interrupted save (step_N.tmp) or an interrupted resume (.NAME.tmp: a
    checkpoint converted for another world size) left behind."""
    directory = Path(directory)
    found = [*directory.glob(f"step_*{TMP_SUFFIX}"), *directory.glob(f".*{TMP_SUFFIX}")] if directory.is_dir() else []
    stale = sorted(p for p in found if p.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# -- the signing key: proof that this installation wrote a manifest ------------------------------------


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or DEFAULT_KEY_PATH).expanduser()


def signing_key(create: bool = True) -> bytes | None:
    """This user's checkpoint key (created on first use, readable by the user alone)."""
    path = key_path()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32).hex().encode())
            f.flush()
            os.fsync(f.fileno())
    return path.read_bytes()


def _signature(manifest: dict, key: bytes) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "hmac"}, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


# -- writing -------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def commit(tmp: Path, meta: dict) -> Path:
    """Seal a fully written step_N.tmp/ directory: fsync its files, write the manifest, rename it."""
    files = {}
    for path in _files(tmp):
        fsync_path(path)
        files[path.relative_to(tmp).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    for sub in sorted({p.parent for p in _files(tmp)}, reverse=True):
        fsync_path(sub)
    manifest = {"format": FORMAT, **meta, "files": files}
    manifest["hmac"] = _signature(manifest, signing_key())
    write_json(tmp / MANIFEST, manifest)
    fsync_path(tmp)
    final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
    if final.exists():  # the same step saved again (a finished run re-run): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    _write_latest(final)
    return final


def _write_latest(final: Path) -> None:
    pointer = final.parent / LATEST
    tmp = pointer.with_name(LATEST + TMP_SUFFIX)
    tmp.write_text(final.name + "\n")
    fsync_path(tmp)
    os.replace(tmp, pointer)
    fsync_path(final.parent)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also where a writer (torch's zip writer) turned it into a RuntimeError."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "file write failed" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(where: Path, exc: BaseException) -> CheckpointError:
    free = shutil.disk_usage(where if where.exists() else where.parent).free
    return CheckpointError(f"disk full: no space left on the device of {where} while writing a checkpoint "
                           f"({free} bytes free); the checkpoints saved before are intact: free space, then "
                           f"resume with train.resume=latest")


# -- reading -------------------------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file: a clipkit checkpoint is a step_NNNNNNNN directory (pickled "
                              ".pt checkpoints are not read, since loading them could run code)")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found: {directory}")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete clipkit checkpoint ({MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged (not JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    return manifest


def verify(directory: str | Path, *, signed: bool = False, only: list[str] | None = None) -> dict:
    """The checkpoint's manifest, once every file it lists (or the `only` ones) matches its sha256.

    signed=True also requires the manifest's HMAC to verify under this user's key: the proof that this
    installation wrote the checkpoint, required before a loader that unpickles (DeepSpeed's) may read it."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest["files"]
    if signed:
        key = signing_key(create=False)
        if key is None or not hmac.compare_digest(str(manifest.get("hmac")), _signature(manifest, key)):
            raise CheckpointError(
                f"{directory} was not written by this clipkit installation (its manifest's signature does not "
                f"verify with the key in {key_path()}); its files are read by a loader that unpickles, so "
                "clipkit refuses to load it")
    unlisted = sorted(set(p.relative_to(directory).as_posix() for p in _files(directory)) - set(files))
    if only is None and unlisted:
        raise CheckpointError(f"{directory} holds a file its manifest does not list: {unlisted[0]}")
    for name in files if only is None else only:
        entry = files.get(name)
        path = directory / name
        if entry is None:
            raise CheckpointError(f"{directory} has no {name}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} is damaged (its sha256 differs from the manifest's)")
    return manifest
