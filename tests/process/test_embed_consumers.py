"""`clipkit embed`'s output read as is by the real consumers of clip-retrieval's layout: autofaiss 2.18's
build_index (what `clip-retrieval index` calls) on OUT/img_emb, and embedding-reader pairing OUT/img_emb
with OUT/metadata (file_format="parquet_npy", how clip-retrieval pairs embeddings and metadata).

autofaiss 2.18 needs numpy<2 and clipkit's environment has numpy 2, so they run in a virtual environment of
their own, created once (from the same base Python) under ~/.cache/clipkit/autofaiss_peer/ (CLIPKIT_CACHE
moves it) with an exactly pinned set, and are driven through a subprocess that writes its results to files.
The first run installs (needs the package registry); later runs reuse the environment."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipkit.retrieval.embed import embed_shards

CACHE = Path(os.environ.get("CLIPKIT_CACHE", Path.home() / ".cache" / "clipkit"))
# autofaiss 2.18.0 and its dependencies, resolved together (pip check clean) for Python 3.11 with numpy<2.
PEER_PACKAGES = [
    "autofaiss==2.18.0", "embedding-reader==1.8.1", "faiss-cpu==1.15.1", "numpy==1.26.4", "pyarrow==19.0.1",
    "pandas==2.3.3", "fire==0.6.0", "fsspec==2026.9.0", "tqdm==4.70.1", "termcolor==3.3.0", "packaging==26.4",
    "python-dateutil==4.0.0", "pytz==2026.6", "six==1.17.0", "tzdata==2026.6",
]
PART = 100  # rows per part: shards of 150 samples give parts of 100 and 50
K = 10


def peer_python() -> Path:
    """The peer environment's python, created once; a lock keeps concurrent runs from building it twice."""
    root = CACHE / "autofaiss_peer"
    venv, marker = root / "venv", root / "venv" / ".complete"
    python = venv / "bin" / "python"
    if marker.is_file() and marker.read_text() == " ".join(PEER_PACKAGES):
        return python
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == " ".join(PEER_PACKAGES):
            return python  # built by a concurrent run while we waited
        shutil.rmtree(venv, ignore_errors=True)  # a partial or outdated one
        # sys.executable is clipkit's venv: `-m venv` bases the new one on the same base interpreter.
        for cmd in ([sys.executable, "-m", "venv", str(venv)],
                    [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_peer_env())
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
        marker.write_text(" ".join(PEER_PACKAGES))
    return python


def _peer_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"}


PEER_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import faiss, numpy as np
    from autofaiss import build_index
    from embedding_reader import EmbeddingReader

    out, work, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    faiss.omp_set_num_threads(1)
    _, infos = build_index(embeddings=f"{out}/img_emb", index_path=f"{work}/knn.index",
                           index_infos_path=f"{work}/index_infos.json", metric_type="ip", nb_cores=1,
                           max_index_memory_usage="1G", current_memory_available="2G", verbose=logging.WARNING)
    index = faiss.read_index(f"{work}/knn.index")  # as clip-retrieval back loads it
    distances, ids = index.search(np.load(f"{work}/queries.npy"), k)

    reader = EmbeddingReader(f"{out}/img_emb", file_format="parquet_npy", metadata_folder=f"{out}/metadata",
                             meta_columns=["key", "caption"])
    rows, keys, captions, embs = [], [], [], []
    for emb, meta in reader(batch_size=64, start=0, end=reader.count, show_progress=False):
        embs.append(emb)
        rows += meta["i"].tolist()
        keys += meta["key"].tolist()
        captions += meta["caption"].tolist()
    np.save(f"{work}/reader_emb.npy", np.concatenate(embs))
    json.dump({"numpy": np.__version__, "faiss": faiss.__version__, "ntotal": int(index.ntotal),
               "index_key": infos and infos.get("index_key"), "index_class": type(index).__name__,
               "ids": ids.tolist(), "distances": distances.tolist(), "reader_count": int(reader.count),
               "reader_dimension": int(reader.dimension), "rows": rows, "keys": keys, "captions": captions},
              open(f"{work}/result.json", "w"))
""")


def test_autofaiss_and_embedding_reader_read_the_embed_output_as_is(synth_small, nano_checkpoint, tmp_path):
    checkpoint = nano_checkpoint
    out = tmp_path / "emb"
    result = embed_shards(checkpoint, synth_small.train_spec, out, batch_size=64, part_size=PART, workers=0,
                          progress=False)
    assert result.rows == 600

    # Ours, as the parts lie on disk: sorted file names, paired by position.
    imgs = sorted((out / "img_emb").glob("*.npy"))
    metas = sorted((out / "metadata").glob("*.parquet"))
    assert len(imgs) == len(metas) == 8
    stored = np.concatenate([np.load(p) for p in imgs])
    assert stored.dtype == np.float16
    stored = stored.astype(np.float32)
    tables = [pq.read_table(p) for p in metas]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    captions = [c for t in tables for c in t.column("caption").to_pylist()]
    assert len(keys) == len(stored) == 600 and len(set(keys)) == 600

    work = tmp_path / "peer"
    work.mkdir()
    query_rows = [0, 99, 100, 149, 150, 333, 451, 599]  # part boundaries and a few inside
    queries = stored[query_rows]
    np.save(work / "queries.npy", queries)
    (work / "peer.py").write_text(PEER_SCRIPT)
    proc = subprocess.run([str(peer_python()), "-I", str(work / "peer.py"), str(out), str(work), str(K)],
                          capture_output=True, text=True, env=_peer_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    peer = json.loads((work / "result.json").read_text())
    assert peer["numpy"].startswith("1.")  # really autofaiss's own environment, not clipkit's numpy 2

    # autofaiss indexed every row we wrote, in an exact inner-product index (small data: Flat).
    assert peer["ntotal"] == 600 and peer["index_key"] == "Flat" and peer["index_class"] == "IndexFlatIP"
    # Its nearest neighbours are a brute force over our parts (inner product = cosine: rows are normalised).
    scores = queries @ stored.T
    ids, distances = np.array(peer["ids"]), np.array(peer["distances"])
    for q, row in enumerate(query_rows):
        order = np.argsort(-scores[q], kind="stable")
        top = scores[q][order]
        np.testing.assert_allclose(distances[q], top[:K], atol=1e-5)
        np.testing.assert_allclose(scores[q][ids[q]], distances[q], atol=1e-5)  # ids are rows of our parts
        assert ids[q][0] == row or abs(top[0] - scores[q][row]) < 1e-5  # a row is its own nearest neighbour
        # Same ids rank by rank, except where two scores tie within float rounding (then either order is right).
        for r in range(K):
            tied = abs(top[r] - top[r - 1]) < 1e-5 if r else False
            tied = tied or abs(top[r] - top[r + 1]) < 1e-5
            if not tied:
                assert ids[q][r] == order[r], (row, r, ids[q], order[:K])
        assert set(ids[q]) == set(order[:K]) or abs(top[K - 1] - top[K]) < 1e-5

    # embedding-reader pairs every embedding row with our metadata row of the same position.
    assert peer["reader_count"] == 600 and peer["reader_dimension"] == stored.shape[1]
    assert peer["rows"] == list(range(600))
    assert peer["keys"] == keys and peer["captions"] == captions
    np.testing.assert_array_equal(np.load(work / "reader_emb.npy"), stored)
