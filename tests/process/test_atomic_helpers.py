"""The atomic-write helpers every writer goes through (clipkit.atomic): a file appears whole or not at all,
also for writers that open the file by name (atomic_path) and for files made once by whichever process
gets there first (create_exclusive)."""
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from clipkit.atomic import atomic_path, atomic_write_text, create_exclusive, fsync_path, temporary_name

# A features cache rewritten under a file-size limit too small for the new one (the writer, safetensors,
# opens the file by name): argv: path, limit.
LIMITED_FEATURES = textwrap.dedent("""
    import resource, signal, sys, torch
    from clipkit.finetune.linear_probe import Features, save_features
    n = 4000
    feats = Features(torch.ones(n, 64), torch.zeros(n, dtype=torch.int64), [f"k{i}" for i in range(n)])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    save_features(feats, sys.argv[1], {"run": "new"})
""")


def test_atomic_path_replaces_only_a_complete_file(tmp_path):
    path = tmp_path / "index.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["index.bin"]
    temporary_name(path).write_bytes(b"left by a killed run")
    with atomic_path(path) as tmp:
        assert not tmp.exists()  # the leftover is gone before the writer opens the name
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["index.bin"]


def test_features_cache_cut_short_leaves_the_previous_one(tmp_path):
    from clipkit.finetune.linear_probe import Features, load_features, save_features

    path = tmp_path / "features" / "train.safetensors"
    old = Features(torch.eye(3), torch.tensor([0, 1, 2]), ["a", "b", "c"])
    save_features(old, path, {"run": "old"})
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", LIMITED_FEATURES, str(path), str(200_000)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    kept = load_features(path, {"run": "old"})
    assert kept is not None and torch.equal(kept.features, old.features) and kept.keys == old.keys
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.safetensors"]


def test_create_exclusive_keeps_the_first_file_and_makes_it_private(tmp_path):
    path = tmp_path / "checkpoint.key"
    assert create_exclusive(path, b"first") is True
    assert create_exclusive(path, b"second") is False  # another process's key got there first: it stays
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.key"]


def test_fsync_path_raises_and_a_strict_write_completes(tmp_path):
    """fsync_path (the checkpoints' fsync) raises what os.open/os.fsync raise, where fsync_folder would not."""
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")
    atomic_write_text(tmp_path / "latest", "step_00000001\n", strict=True)
    assert (tmp_path / "latest").read_text() == "step_00000001\n"
