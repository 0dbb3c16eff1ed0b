"""Embeddings stay tied to the weights that made them: `clipkit embed` re-run after the run trained on
recomputes every part (checked against a fresh embed and against open_clip's own forward pass on the later
weights), the digest it records is the sha256 of the weights as defined in clipkit.models.digest (recomputed
here from the safetensors file alone), and `clipkit search` / `clipkit serve` refuse queries encoded with other
weights unless told --allow-other-weights."""
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipkit import cli
from clipkit.checkpoint import commit, read_manifest
from clipkit.errors import UserError
from clipkit.models import save_weights
from clipkit.retrieval.embed import embed_shards
from clipkit.retrieval.index import build_index
from clipkit.retrieval.search import Searcher
from test_embed import PART, _good_shard, concat, reference, tar_samples
from helpers import free_port

QUERY = "a red circle on a white background"


def file_sha256(weights_file) -> str:
    """The weights digest, computed independently from the file's tensors (the definition in
    clipkit.models.digest: sorted keys, "key\\tdtype\\tshape\\n", then the raw bytes)."""
    h = hashlib.sha256()
    state = load_file(str(weights_file))
    for key in sorted(state):
        t = state[key]
        h.update(f"{key}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def train_on(run_dir):
    """The run's next checkpoint, as its trainer would commit it: step 41 with the two projections moved (a
    fixed, seeded change), sealed by clipkit.checkpoint.commit, `latest` pointing at it."""
    checkpoints = run_dir / "checkpoints"
    early = checkpoints / (checkpoints / "latest").read_text().strip()
    state = load_file(str(early / "model.safetensors"))
    g = torch.Generator().manual_seed(41)
    for key in ("visual.proj", "text_projection"):
        state[key] = state[key] + 0.1 * torch.randn(state[key].shape, generator=g)
    tmp = checkpoints / "step_00000041.tmp"
    tmp.mkdir()
    with safe_open(str(early / "model.safetensors"), framework="pt") as f:
        header = f.metadata()
    save_weights(state, tmp / "model.safetensors", header["model_name"], json.loads(header["model_cfg"]))
    later = commit(tmp, {"step": 41, "engine": read_manifest(early)["engine"]})
    assert (checkpoints / "latest").read_text().strip() == later.name
    return early, later


@pytest.fixture(scope="module")
def run(trained_nano, tmp_path_factory):
    """A copy of a trained run directory (the shared fixture stays as it is) and its export."""
    checkpoint, export = trained_nano
    run_dir = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(checkpoint.parent.parent, run_dir)
    return run_dir, export


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    for s in range(2):
        _good_shard(d / f"g-{s:02d}.tar", s, rng)
    return d


@pytest.fixture(scope="module")
def embedded_early(run, data, tmp_path_factory):
    """An embed of the run while its newest checkpoint is the early one, and an index over it."""
    run_dir, _ = run
    root = tmp_path_factory.mktemp("early")
    result = embed_shards(run_dir, str(data / "g-{00..01}.tar"), root / "emb", batch_size=8, part_size=PART,
                          workers=0, progress=False)
    copy = root / "emb-early"  # what the early weights made, kept for comparison
    shutil.copytree(root / "emb", copy)
    build_index(root / "emb", root / "idx")
    return root, result, copy


def test_rerun_after_the_run_trained_on_recomputes_with_the_later_weights(run, data, embedded_early, tmp_path,
                                                                          caplog):
    run_dir, _ = run
    root, first, early_copy = embedded_early
    early_step = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    info = first.info
    assert info["checkpoint"] == str(early_step.resolve())  # the run directory resolved to its step
    assert info["weights_sha256"] == file_sha256(early_step / "model.safetensors")

    early, later = train_on(run_dir)
    with caplog.at_level(logging.WARNING, logger="clipkit.embed"):
        again = embed_shards(run_dir, str(data / "g-{00..01}.tar"), root / "emb", batch_size=8, part_size=PART,
                             workers=0, progress=False)
    # Everything recomputed, nothing kept from the early weights, and one line saying why.
    assert (again.rows_embedded, again.parts_written, again.parts_reused) == (20, 4, 0)
    said = [r.getMessage() for r in caplog.records if r.name == "clipkit.embed"]
    assert len(said) == 1 and "discarded 4 parts made by another model" in said[0]
    assert info["weights_sha256"][:16] in said[0] and again.info["weights_sha256"] in said[0]
    info = json.loads((root / "emb" / "clipkit_embed.json").read_text())
    assert info["checkpoint"] == str(later.resolve()) and info["complete"] and info["count"] == 20
    assert info["weights_sha256"] == file_sha256(later / "model.safetensors") != first.info["weights_sha256"]

    # The same vectors as a fresh embed with the later weights, and as open_clip's own forward pass on them.
    fresh = embed_shards(later, str(data / "g-{00..01}.tar"), tmp_path / "fresh", batch_size=8, part_size=PART,
                         workers=0, progress=False)
    keys, img, txt = concat(root / "emb")
    fresh_keys, fresh_img, fresh_txt = concat(fresh.out)
    assert keys == fresh_keys
    np.testing.assert_array_equal(img, fresh_img)
    np.testing.assert_array_equal(txt, fresh_txt)
    samples = [s for i in range(2) for s in tar_samples(data / f"g-{i:02d}.tar")]
    ref_img, ref_txt = reference(later / "model.safetensors", samples)
    np.testing.assert_allclose(txt, ref_txt, atol=3e-4)  # tolerances as in test_embed: float16 storage,
    np.testing.assert_allclose(img, ref_img, atol=4e-3)  # reduced-scale JPEG decoding
    _, early_img, early_txt = concat(early_copy)
    assert np.abs(early_txt - txt).max() > 0.05 and np.abs(early_img - img).max() > 0.05  # they did change

    # The same weights named another way (the export of the early step vs the step itself) are the same digest.
    same = embed_shards(early, str(data / "g-{00..01}.tar"), tmp_path / "same", batch_size=8, part_size=PART,
                        workers=0, progress=False)
    assert same.info["weights_sha256"] == first.info["weights_sha256"]
    exported = embed_shards(run[1], str(data / "g-{00..01}.tar"), tmp_path / "same", batch_size=8, part_size=PART,
                            workers=0, progress=False)
    assert (exported.rows_embedded, exported.parts_reused) == (0, 4)  # nothing to redo: the weights are the same


def test_search_refuses_queries_encoded_with_other_weights(run, embedded_early, capsys):
    run_dir, export = run
    root, first, _ = embedded_early
    idx = root / "idx"
    assert json.loads((idx / "clipkit_embed.json").read_text())["weights_sha256"] == first.info["weights_sha256"]
    if (run_dir / "checkpoints" / "latest").read_text().strip() != "step_00000041":
        train_on(run_dir)
    recorded = Searcher(idx).search_text(QUERY, 3)  # the recorded (resolved) step: the early weights
    assert len(recorded) == 3
    assert Searcher(idx, checkpoint=export).search_text(QUERY, 3) == recorded  # same weights, other form

    with pytest.raises(UserError, match=r"holds other weights \(sha256 [0-9a-f]{16}\) than the ones"):
        Searcher(idx, checkpoint=run_dir).search_text(QUERY, 3)  # the run moved on: other weights
    assert len(Searcher(idx, checkpoint=run_dir, allow_other_weights=True).search_text(QUERY, 3)) == 3

    argv = ["search", "--index", str(idx), "--text", QUERY, "-k", "3", "--checkpoint", str(run_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other weights" in err and "--allow-other-weights" in err
    assert cli.main(argv + ["--allow-other-weights"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3

    # Vectors whose record names no digest (an older embed) cannot be checked: refused the same way.
    info = json.loads((idx / "clipkit_embed.json").read_text())
    old = root / "idx-old"
    shutil.copytree(idx, old)
    (old / "clipkit_embed.json").write_text(json.dumps({k: v for k, v in info.items() if k != "weights_sha256"}))
    with pytest.raises(UserError, match="records no weights digest"):
        Searcher(old).search_text(QUERY, 3)


def test_serve_refuses_other_weights_at_startup(run, embedded_early):
    run_dir, _ = run
    root, _, _ = embedded_early
    if (run_dir / "checkpoints" / "latest").read_text().strip() != "step_00000041":
        train_on(run_dir)
    cmd = [sys.executable, "-m", "clipkit", "serve", "--index", str(root / "idx"), "--checkpoint", str(run_dir)]
    proc = subprocess.run(cmd + ["--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "other weights" in err, err

    port = free_port()
    server = subprocess.Popen(cmd + ["--port", str(port), "--allow-other-weights"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url, answer = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + 90
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                answer = httpx.post(f"{url}/knn-service", json={"text": QUERY, "num_images": 3}, timeout=30)
            except httpx.TransportError:
                time.sleep(0.3)
        assert answer is not None, server.stdout.read() if server.poll() is not None else "no answer"
        assert answer.status_code == 200 and len(answer.json()) == 3, answer.text
    finally:
        server.terminate()
        server.wait(30)
