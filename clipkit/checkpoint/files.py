"""Checkpoint directories on disk: written whole or not at all, verified before anything reads them.

    checkpoints/
        step_00000600/            one checkpoint
            manifest.json         written last: format, step, engine, sha256 and size of every other file,
                                  and an HMAC of all that under this machine's checkpoint key
            ...                   the files of the state providers (weights, optimizer, per-rank state)
        latest                    the name of the newest complete checkpoint (step_NNNNNNNN or best, nothing else)

A checkpoint is written as step_N.tmp/: every file is fsynced, the manifest written and fsynced last, then
the directory is renamed to step_N and its parent fsynced. Saving a step again moves the old step_N aside
(step_N.old) before the new one takes its name, and deletes it after. A crash at any point leaves a complete
checkpoint under one of those three names, and the next start (recover_interrupted) puts it back under its
own: a sealed .tmp whose files match its manifest is renamed into place, else an .old one is. A checkpoint
holds regular files and directories only. Nothing here unpickles anything.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath

from ..atomic import atomic_write_text, fsync_path
from .errors import CheckpointError
from .key import key_path, signing_key

FORMAT = "clipkit-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"step_(\d{8})")
LATEST_RE = re.compile(r"step_\d{8}|best")  # what `latest` may name: a checkpoint beside it, nothing else
TMP_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"  # a checkpoint being replaced by a new save of the same step

def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def list_steps(directory: str | Path) -> list[Path]:
    """Complete checkpoint directories (temporaries excluded), oldest first. clipkit writes them as directories:
    a symbolic link named like one is not one of them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := STEP_RE.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()]
    return [p for _, p in sorted(found)]


def recover_interrupted(directory: str | Path) -> list[str]:
    """Finish or undo what an interrupted save (NAME.tmp, NAME.old) or resume (.NAME.tmp: a checkpoint converted
    for another world size, a private copy being loaded) left in a checkpoints directory; one line per change.

    NAME missing: a NAME.tmp whose files match its manifest was sealed (the crash came before its rename) and
    becomes NAME; failing that, NAME.old (moved aside for it) is put back. Whatever is left over then is
    either unfinished or superseded by a complete NAME, and is deleted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    notes = []
    for name in sorted({_base_name(p.name) for p in directory.iterdir()} - {None}):  # step_N and best only
        notes += _recover(directory / name)
    for path in sorted(directory.glob(f".*{TMP_SUFFIX}")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path}, left by an interrupted resume")
    return notes


def _base_name(name: str) -> str | None:
    """NAME for a NAME.tmp or NAME.old entry of a checkpoints directory, where NAME is a checkpoint's name."""
    for suffix in (TMP_SUFFIX, ASIDE_SUFFIX):
        if name.endswith(suffix) and LATEST_RE.fullmatch(name[: -len(suffix)]):
            return name[: -len(suffix)]
    return None


def _recover(final: Path) -> list[str]:
    tmp, aside = final.with_name(final.name + TMP_SUFFIX), final.with_name(final.name + ASIDE_SUFFIX)
    notes = []
    if not os.path.lexists(final):
        if tmp.is_dir() and not tmp.is_symlink() and _sealed(tmp):
            os.rename(tmp, final)
            fsync_path(final.parent)
            _write_latest(final)
            notes.append(f"completed the save of {final}: {tmp.name} was sealed when the run stopped")
        elif aside.is_dir() and not aside.is_symlink():
            os.rename(aside, final)
            fsync_path(final.parent)
            notes.append(f"restored {final} from {aside.name}: the save replacing it did not complete")
    for leftover in (tmp, aside):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
            notes.append(f"removed {leftover}, left by an interrupted save")
    return notes


def _sealed(tmp: Path) -> bool:
    try:
        verify(tmp)
    except (CheckpointError, OSError):
        return False
    return True


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint (retention): renamed to a hidden .tmp name first, so that a crash while deleting
    leaves no half checkpoint under a checkpoint's name, only what the next start removes."""
    doomed = path.with_name(f".{path.name}.removed{TMP_SUFFIX}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


# -- the latest pointer --------------------------------------------------------------------------------


def read_latest(directory: str | Path) -> Path | None:
    """The checkpoint `directory/latest` names (None when there is no pointer). The pointer is data: it may
    name a checkpoint beside it (step_NNNNNNNN or best) and nothing else, and it must be a plain file."""
    pointer = Path(directory) / LATEST
    if not os.path.lexists(pointer):
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a plain file (a symbolic link or other entry): clipkit writes "
                              "it as a file naming the newest checkpoint; delete it and name the checkpoint")
    with open(pointer, "rb") as f:
        name = f.read(4096).decode("utf-8", "replace").strip()
    if not LATEST_RE.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name!r}; a latest pointer may only name a checkpoint beside it "
                              "(step_NNNNNNNN or best): delete it and name the checkpoint")
    return pointer.parent / name


# -- writing -------------------------------------------------------------------------------------------


def _signature(manifest: dict, key: bytes) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "hmac"}, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """A checkpoint's JSON file, whole or not at all, fsynced with its folder (errors raise)."""
    atomic_write_text(path, json.dumps(obj), strict=True)


def _regular_files(directory: Path) -> list[str]:
    """The names (relative, '/'-separated) of the regular files under `directory`, read without following
    links. A checkpoint holds regular files and directories only: a symbolic link would make verification read
    one file while a loader that finds files by pattern (DeepSpeed's) reads others, and a FIFO or device
    blocks or streams; either is refused, by name."""
    directory = Path(directory)
    found, pending = [], [directory]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append(Path(entry.path))
                elif stat.S_ISREG(mode):
                    found.append(Path(entry.path).relative_to(directory).as_posix())
                else:
                    raise CheckpointError(
                        f"{directory} holds {_kind(mode)}, {Path(entry.path).relative_to(directory).as_posix()}: a "
                        "checkpoint holds regular files and directories only, so it is refused")
    return sorted(found)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"


def commit(tmp: Path, meta: dict) -> Path:
    """Seal a fully written NAME.tmp/ directory: fsync its files, write the manifest, rename it to NAME."""
    names = [n for n in _regular_files(tmp) if n != MANIFEST]
    files = {}
    for name in names:
        path = tmp / name
        fsync_path(path)
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    for sub in sorted({(tmp / n).parent for n in names}, reverse=True):
        fsync_path(sub)
    manifest = {"format": FORMAT, **meta, "files": files}
    manifest["hmac"] = _signature(manifest, signing_key())
    write_json(tmp / MANIFEST, manifest)
    fsync_path(tmp)
    final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
    _rename_into_place(tmp, final)
    _write_latest(final)
    return final


def _rename_into_place(tmp: Path, final: Path) -> None:
    """tmp becomes final. An existing final (the same step saved again: a finished run re-run) is moved aside
    first and deleted last, so that at every instant a complete checkpoint is on disk under a name
    recover_interrupted knows."""
    aside = final.with_name(final.name + ASIDE_SUFFIX)
    if os.path.lexists(final):
        if aside.exists():  # left by an earlier interrupted save; final is the complete one
            shutil.rmtree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if aside.exists():
        shutil.rmtree(aside)


def _write_latest(final: Path) -> None:
    atomic_write_text(final.parent / LATEST, final.name + "\n", strict=True)


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
    for name in manifest["files"]:
        if not _inside(name):
            raise CheckpointError(f"{path} lists {name!r}, which is not a file inside the checkpoint")
    return manifest


def _inside(name: str) -> bool:
    """Whether a manifest's file name is a plain relative path below the checkpoint directory."""
    return (isinstance(name, str) and name != MANIFEST and not PurePosixPath(name).is_absolute()
            and all(part not in ("", ".", "..") for part in name.split("/")) and "\0" not in name)


def check_listing(directory: str | Path, *, signed: bool = False, complete: bool = True) -> dict:
    """The checkpoint's manifest once its signature (signed=True), its entries (regular files and directories
    only) and, when complete, its file list (nothing unlisted on disk, nothing listed missing) are right;
    the files' contents are not read (verify and the private copy hash them)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if signed:
        key = signing_key(create=False)
        if key is None or not hmac.compare_digest(str(manifest.get("hmac")), _signature(manifest, key)):
            raise CheckpointError(
                f"{directory} was not written by this clipkit installation (its manifest's signature does not "
                f"verify with the key in {key_path()}); its files are read by a loader that unpickles, so "
                "clipkit refuses to load it")
    on_disk = set(_regular_files(directory)) - {MANIFEST}
    listed = set(manifest["files"])
    if complete and on_disk - listed:
        raise CheckpointError(f"{directory} holds a file its manifest does not list: {sorted(on_disk - listed)[0]}")
    if complete and listed - on_disk:
        raise CheckpointError(f"{directory / sorted(listed - on_disk)[0]} is missing")
    return manifest


def check_file(path: Path, entry: dict, size: int, digest: str) -> None:
    """Raise unless a file's size and sha256 are the ones its manifest entry records."""
    if size != entry.get("bytes") or digest != entry.get("sha256"):
        raise CheckpointError(f"{path} is damaged (its sha256 differs from the manifest's)")


def verify(directory: str | Path, *, signed: bool = False, only: list[str] | None = None) -> dict:
    """The checkpoint's manifest, once every file it lists (or the `only` ones) matches its sha256.

    signed=True also requires the manifest's HMAC to verify under this user's key: the proof that this
    installation wrote the checkpoint. A loader that unpickles (DeepSpeed's) reads a private copy made by
    clipkit.checkpoint.stage_verified instead, which checks the same while it copies."""
    directory = Path(directory)
    manifest = check_listing(directory, signed=signed, complete=only is None)
    files = manifest["files"]
    for name in files if only is None else only:
        entry, path = files.get(name), directory / name
        if entry is None:
            raise CheckpointError(f"{directory} has no {name}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        check_file(path, entry, path.stat().st_size, sha256_file(path))
    return manifest
