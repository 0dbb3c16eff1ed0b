"""`clipkit curate` with every stage on, in this process, on the noisy set with planted truth: the embeddings the
scan stores are the model's own (open_clip's encode_image / encode_text on the decoded pixels), each stage's
decisions are the stage function's over the samples alive when it ran, the decisions table and the output shards
agree, and the report carries the balancing plot."""
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipkit.config import load_config
from clipkit.curate import balance as balance_mod
from clipkit.curate import clipscore, decontam, semdedup
from clipkit.curate.run import STAGES, curate
from clipkit.curate.scan import load_features
from clipkit.data.noisy import write_noisy_dataset
from clipkit.models import load_model


@pytest.fixture(scope="module")
def run(nano_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("curate_every_stage")
    write_noisy_dataset(root / "noisy", samples=96, seed=5, samples_per_shard=48, image_size=32, eval_samples=24)
    out = root / "out"
    cfg = load_config(None, [
        f"curate.model={nano_checkpoint}", "curate.batch_size=16", "curate.samples_per_shard=20",
        "curate.progress=false", "curate.dedup.semantic=true", "curate.dedup.semantic_threshold=0.999",
        f"curate.decontam.eval_sets=[{root / 'noisy' / 'eval'}]", "curate.decontam.cosine=0.9999",
        "curate.score.enabled=true", "curate.score.threshold=null", "curate.score.top_fraction=0.9",
        "curate.balance.enabled=true", "curate.balance.entries=builtin", "curate.balance.t=4"])
    cfg.curate.data = str(root / "noisy" / "train" / "{00000..00001}.tar")
    cfg.curate.out = str(out)
    summary = curate(cfg)
    return cfg, summary, out


def test_scan_stores_the_models_embeddings(run, nano_checkpoint):
    cfg, _, out = run
    cols, emb = load_features(out / "work", 2, with_embeddings=True)
    loaded = load_model(nano_checkpoint, device=torch.device("cpu"))
    loaded.model.eval()
    picks = [0, 17, 50, 95]
    images, captions = [], []
    for i in picks:
        with tarfile.open(cols["shard"][i]) as tar:
            data = tar.extractfile(f"{cols['key'][i]}.{cols['image_member'][i]}").read()
        images.append(loaded.eval_transform(Image.open(io.BytesIO(data)).convert("RGB")))
        captions.append(cols["caption"][i])
    with torch.no_grad():
        img = torch.nn.functional.normalize(loaded.model.encode_image(torch.stack(images)), dim=-1)
        txt = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(captions)), dim=-1)
    np.testing.assert_allclose(emb["image_emb"][picks], img.numpy(), atol=1e-5)
    np.testing.assert_allclose(emb["text_emb"][picks], txt.numpy(), atol=1e-5)


def test_each_stage_decides_over_the_samples_alive_when_it_ran(run):
    cfg, summary, out = run
    c = cfg.curate
    decisions = pq.read_table(out / "decisions.parquet").to_pylist()
    cols, emb = load_features(out / "work", 2, with_embeddings=True)
    assert [d["key"] for d in decisions] == list(cols["key"])
    assert list(summary["counts"]["stages"]) == list(STAGES)
    keys = list(cols["key"])
    alive = np.ones(len(keys), dtype=bool)
    for stage in STAGES[:3]:  # filters and hash dedup: their own tests; here only what is left alive after them
        alive &= np.array([not (d["stage"] == stage and not d["kept"]) for d in decisions])
    sets = decontam.eval_set_features([c.decontam.eval_sets[0]], load_model(c.model, device=torch.device("cpu")),
                                      batch_size=16, max_image_pixels=c.max_image_pixels)
    expected = [
        ("semantic_dedup", lambda a: semdedup.semantic_dedup(emb["image_emb"], a, keys, threshold=0.999,
                                                             clusters=None, seed=c.seed)),
        ("decontam", lambda a: decontam.decontaminate(cols["phash"], cols["phash_flip"], emb["image_emb"], a, sets,
                                                      max_distance=c.decontam.phash_max_distance, cosine=0.9999)),
        ("clip_score", lambda a: clipscore.clip_score_filter(emb["image_emb"], emb["text_emb"], a, threshold=None,
                                                             top_fraction=0.9)),
        ("balance", lambda a: balance_mod.balance(list(cols["caption"]), a, keys,
                                                  balance_mod.builtin_entries([c.decontam.eval_sets[0]]), t=4,
                                                  seed=c.seed)),
    ]
    for stage, fn in expected:
        res = fn(alive.copy())
        got = np.array([d["stage"] == stage and not d["kept"] for d in decisions])
        np.testing.assert_array_equal(got, res.drop, err_msg=stage)
        assert [d["reason"] for d in decisions if d["stage"] == stage] == list(res.reason[res.drop]), stage
        alive &= ~res.drop
    assert summary["counts"]["stages"]["clip_score"]["dropped"] > 0
    assert summary["counts"]["stages"]["balance"]["dropped"] > 0
    assert [d["kept"] for d in decisions] == alive.tolist()


def test_outputs_hold_the_kept_samples_and_the_report_the_balance_plot(run):
    _, summary, out = run
    decisions = pq.read_table(out / "decisions.parquet").to_pylist()
    kept = [d["key"] for d in decisions if d["kept"]]
    manifest = json.loads((out / "manifest.json").read_text())
    written = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            written += list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    assert written == kept == [s["key"] for shard in manifest["shards"] for s in shard["samples"]]
    assert (out / "balance_entry_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "curate_report.html").read_text()
    assert report.count("data:image/png;base64,") >= 2 and "balance" in report
    pairs = report.count('<div class="pair">')  # every example pair shown with its image's thumbnail
    assert pairs > 0 and report.count('<div class="pair"><img src="data:image/jpeg;base64,') == pairs
    assert json.loads((out / "curate_summary.json").read_text())["counts"]["kept"] == len(kept)
