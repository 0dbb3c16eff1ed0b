"""Writers interrupted mid-write leave no truncated file under a final name and no half part: make-shards and
finetune's result.json run under a file-size limit (RLIMIT_FSIZE, as a full disk would stop them: the write
fails with EFBIG, or the process is killed by SIGXFSZ), and embed meets a part whose metadata cannot be
renamed into place. Readers see the previous state, or the complete new one."""
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipkit.models import create_model, get_model_config, save_weights
from clipkit.retrieval.embed import embed_shards
from test_embed import PART, _good_shard, concat

LIMIT = 60_000  # bytes any one file may grow to in the limited process

# Runs FUNC(*ARGS) of MODULE with the file-size limit; argv: mode (error | kill), limit, module, func; stdin: ARGS
# as JSON.
LIMITED = textwrap.dedent("""
    import importlib, json, resource, signal, sys
    import pyarrow.parquet, webdataset  # imported before the limit
    mode, limit, module, func, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.load(sys.stdin)
    target = getattr(importlib.import_module(module), func)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if mode == "error" else signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    target(*args)
""")


def run_limited(mode: str, module: str, func: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", LIMITED, mode, str(LIMIT), module, func], input=json.dumps(args),
                          capture_output=True, text=True, timeout=300, env=env)


def _noise_photos(folder, sides):
    """JPEGs of noise (they do not compress: ~18 KB at side 120, ~2 KB at 32), each with its caption file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, side in enumerate(sides):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"p{i}.jpg", quality=95)
        (folder / f"p{i}.txt").write_text(f"noise photo {i}")
    return folder


@pytest.mark.parametrize("mode", ["error", "kill"])
def test_make_shards_interrupted_leaves_no_truncated_tar(tmp_path, mode):
    src = _noise_photos(tmp_path / "photos", [32] * 5 + [120] * 5)
    out = tmp_path / "out"
    # Shard 0 (5 small photos) fits under the limit; shard 1 (5 large ones) is cut off while its tar is written.
    proc = run_limited(mode, "clipkit.data.make_shards", "main",
                       ["--data", str(src), "--out", str(out), "--samples-per-shard", "5", "--keep-original"])
    if mode == "error":
        assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json"]  # shard 1 left nothing under its names
    with tarfile.open(out / "00000.tar") as tar:  # the finished shard is whole
        members = tar.getnames()
    assert len(members) == 5 * 3 and json.loads((out / "00000_stats.json").read_text())["successes"] == 5
    if mode == "error":  # an exception also removes the temporary; a killed process may leave its hidden one
        assert sorted(p.name for p in out.iterdir()) == names


def test_finetune_result_is_replaced_whole_or_not_at_all(tmp_path):
    previous = {"method": "full", "test": {"acc1": 0.5}}
    (tmp_path / "result.json").write_text(json.dumps(previous, indent=2))
    bigger = {"method": "full", "test": {"acc1": 0.75}, "history": [{"epoch": i, "loss": 0.1} for i in range(5000)]}
    assert len(json.dumps(bigger, indent=2)) > LIMIT
    proc = run_limited("error", "clipkit.finetune.run", "write_result", str(tmp_path), bigger)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp_path / "result.json").read_text()) == previous  # the previous result, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    small = {"method": "full", "test": {"acc1": 0.75}}
    proc = run_limited("error", "clipkit.finetune.run", "write_result", str(tmp_path), small)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "result.json").read_text()) == small


def _parts(folder, suffix):
    """Part numbers of the regular files a consumer's glob would pair by position."""
    return sorted(re.fullmatch(r"[a-z_]+_(\d+)\." + suffix, p.name).group(1) for p in folder.glob(f"*.{suffix}")
                  if p.is_file())


def test_embed_part_whose_rename_fails_is_taken_back(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _good_shard(data / "g-00.tar", 0, np.random.default_rng(0))
    torch.manual_seed(0)
    checkpoint = tmp_path / "nano.safetensors"
    save_weights(create_model("clipkit-nano").state_dict(), checkpoint, "clipkit-nano",
                 get_model_config("clipkit-nano"))
    out = tmp_path / "out"
    # Part 000000001's metadata cannot be renamed into place: a folder holds its name.
    (out / "metadata" / "metadata_000000001.parquet").mkdir(parents=True)
    (out / "metadata" / "metadata_000000001.parquet" / "x").write_text("in the way")
    with pytest.raises(IsADirectoryError):
        embed_shards(checkpoint, str(data / "g-00.tar"), out, batch_size=4, part_size=PART, workers=0,
                     progress=False)
    # What consumers pair by position: the same parts in the three folders, the finished one only.
    assert _parts(out / "img_emb", "npy") == _parts(out / "text_emb", "npy") == _parts(out / "metadata", "parquet") \
        == ["000000000"]
    assert not [p for p in out.rglob("*.tmp")]
    assert pq.read_table(out / "metadata" / "metadata_000000000.parquet").num_rows == PART

    (out / "metadata" / "metadata_000000001.parquet" / "x").unlink()
    (out / "metadata" / "metadata_000000001.parquet").rmdir()
    result = embed_shards(checkpoint, str(data / "g-00.tar"), out, batch_size=4, part_size=PART, workers=0,
                          progress=False)
    assert (result.parts_written, result.parts_reused, result.info["count"]) == (1, 1, 10)
    fresh = embed_shards(checkpoint, str(data / "g-00.tar"), tmp_path / "fresh", batch_size=4, part_size=PART,
                         workers=0, progress=False)
    keys, img, txt = concat(out)
    fresh_keys, fresh_img, fresh_txt = concat(fresh.out)
    assert keys == fresh_keys
    np.testing.assert_array_equal(img, fresh_img)
    np.testing.assert_array_equal(txt, fresh_txt)
