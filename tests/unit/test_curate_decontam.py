import io
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageOps

from clipkit.curate import decontam
from clipkit.curate.decontam import EvalFeatures, decontaminate, eval_set_features
from clipkit.curate.hashing import hamming, perceptual_hashes
from clipkit.data.synth import render, sample_scene


def _img(seed, size=48):
    rng = random.Random(seed)
    return render(sample_scene(rng, "eval"), size, rng)


def _jpeg(img, q=92):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def _write_sets(tmp_path):
    """A CLIP_benchmark root (two shards) and a plain folder with a sub-folder; returns their images."""
    bench = tmp_path / "bench"
    (bench / "test").mkdir(parents=True)
    images = {}
    for shard in range(2):
        with wds.TarWriter(str(bench / "test" / f"{shard}.tar")) as sink:
            for i in range(5):
                key = f"{shard}{i:03d}"
                img = _img(100 + shard * 10 + i)
                images[("bench", key)] = img
                sink.write({"__key__": key, "jpg": _jpeg(img), "cls": "0"})
    (bench / "test" / "nshards.txt").write_text("2\n")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        img = _img(200 + i)
        rel = f"sub/x{i}.png" if i % 2 else f"y{i}.png"
        img.save(folder / rel)
        images[("folder", rel)] = Image.open(folder / rel).convert("RGB")
    return [str(bench), str(folder)], images


def test_eval_set_features_read_both_layouts(tmp_path):
    roots, images = _write_sets(tmp_path)
    sets = eval_set_features(roots, None, batch_size=4, max_image_pixels=None)
    assert [s.name for s in sets] == ["bench", "folder"]
    assert sets[0].keys == [f"{s}{i:03d}" for s in range(2) for i in range(5)]
    assert sets[1].keys == ["sub/x1.png", "sub/x3.png", "y0.png", "y2.png"]
    for s in sets:
        assert s.emb is None
        for key, h, hf in zip(s.keys, s.phash, s.phash_flip):
            img = images[(s.name, key)]
            if s.name == "bench":
                img = Image.open(io.BytesIO(_jpeg(img))).convert("RGB")
            assert (int(h), int(hf)) == perceptual_hashes(img)


def test_eval_set_features_embed_with_a_model(tmp_path, nano_checkpoint):
    from clipkit.models import load_model

    roots, images = _write_sets(tmp_path)
    loaded = load_model(nano_checkpoint)
    sets = eval_set_features(roots[1:], loaded, batch_size=3, max_image_pixels=None)
    with torch.inference_mode():
        ref = loaded.model.encode_image(torch.stack([loaded.eval_transform(images[("folder", k)])
                                                     for k in sets[0].keys]))
    ref = torch.nn.functional.normalize(ref.float(), dim=-1).numpy()
    assert sets[0].emb.shape == ref.shape
    np.testing.assert_allclose(sets[0].emb, ref, atol=1e-5)


def _brute(phash, flip, emb, alive, sets, max_distance, cosine):
    out = {}
    for i in range(len(alive)):
        if not alive[i]:
            continue
        best = None
        for s in sets:
            for k, h in zip(s.keys, s.phash):
                d = min(int(hamming(phash[i], h)), int(hamming(flip[i], h)))
                if d <= max_distance and (best is None or d < best[0]):
                    best = (d, f"{s.name}:{k}")
        if best is None and cosine is not None:
            cands = [(float(np.dot(emb[i], e)), f"{s.name}:{k}") for s in sets for k, e in zip(s.keys, s.emb)]
            top = max(cands, key=lambda t: t[0])
            if top[0] >= cosine:
                best = (None, top[1])
        if best is not None:
            out[i] = best[1]
    return out


def test_hash_matching_against_brute_force(tmp_path, monkeypatch):
    monkeypatch.setattr(decontam, "HASH_BLOCK", 1)  # several blocks even for this small set
    roots, images = _write_sets(tmp_path)
    sets = eval_set_features(roots, None, batch_size=4, max_image_pixels=None)
    evals = list(images.values())
    train = []
    for j in range(40):
        train.append(_img(1000 + j, 48))  # unrelated
    train += [Image.open(io.BytesIO(_jpeg(evals[0], 40))).convert("RGB"),  # re-encoded
              ImageOps.mirror(evals[3]),  # flipped
              evals[12].resize((64, 64)),  # resized
              evals[7]]  # the same pixels, but not alive
    hashes = np.array([perceptual_hashes(im) for im in train], dtype=np.uint64)
    alive = np.ones(len(train), bool)
    alive[-1] = False
    res = decontaminate(hashes[:, 0], hashes[:, 1], None, alive, sets, max_distance=6, cosine=None).check(alive)
    ref = _brute(hashes[:, 0], hashes[:, 1], None, alive, sets, 6, None)
    assert {40, 41, 42} <= set(ref)
    assert set(np.flatnonzero(res.drop)) == set(ref)
    for i, label in ref.items():
        assert res.reason[i] == "eval_near_duplicate"
        # the nearest: equal distance to two eval images would make either right, so check the distance
        name, key = res.detail[i].split(":", 1)
        s = next(s for s in sets if s.name == name)
        h = s.phash[s.keys.index(key)]
        d = min(int(hamming(hashes[i, 0], h)), int(hamming(hashes[i, 1], h)))
        assert d == res.score[i] <= 6
    assert not res.drop[-1]
    total = sum(res.summary["matches"].values())
    assert total == len(ref) == res.summary["dropped"]["eval_near_duplicate"]


def test_embedding_matching_against_brute_force():
    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    e1, e2 = unit(rng.normal(size=(30, 16))), unit(rng.normal(size=(20, 16)))
    sets = [EvalFeatures("a", [f"a{i}" for i in range(30)], rng.integers(0, 2**63, 30, dtype=np.uint64),
                         rng.integers(0, 2**63, 30, dtype=np.uint64), e1),
            EvalFeatures("b", [f"b{i}" for i in range(20)], rng.integers(0, 2**63, 20, dtype=np.uint64),
                         rng.integers(0, 2**63, 20, dtype=np.uint64), e2)]
    train = unit(rng.normal(size=(200, 16)))
    train[:10] = unit(e1[:10] + 0.05 * rng.normal(size=(10, 16)))
    train[10:20] = unit(e2[:10] + 0.05 * rng.normal(size=(10, 16)))
    ph = rng.integers(0, 2**63, 200, dtype=np.uint64)
    ph[25] = sets[1].phash[5]  # one exact hash match too
    alive = rng.random(200) < 0.95
    res = decontaminate(ph, ph ^ np.uint64(1), train, alive, sets, max_distance=2, cosine=0.9).check(alive)
    ref = _brute(ph, ph ^ np.uint64(1), train, alive, sets, 2, 0.9)
    assert len(ref) >= 15
    assert {i: res.detail[i] for i in np.flatnonzero(res.drop)} == ref
    assert res.summary["matches"]["a"] == sum(v.startswith("a:") for v in ref.values())
    with pytest.raises(ValueError):
        decontaminate(ph, ph, None, alive, sets, max_distance=2, cosine=0.9)


def test_no_eval_images_and_nothing_alive():
    ph = np.arange(5, dtype=np.uint64)
    empty = EvalFeatures("e", [], np.zeros(0, np.uint64), np.zeros(0, np.uint64), None)
    alive = np.ones(5, bool)
    res = decontaminate(ph, ph, None, alive, [empty], max_distance=4, cosine=None).check(alive)
    assert not res.drop.any() and res.summary["matches"] == {"e": 0}
    full = EvalFeatures("f", ["k"], ph[:1], ph[:1], None)
    dead = np.zeros(5, bool)
    res = decontaminate(ph, ph, None, dead, [full], max_distance=4, cosine=None).check(dead)
    assert not res.drop.any()


def test_a_root_without_images_is_one_line(tmp_path):
    from clipkit.errors import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no test/\\*.tar"):
        eval_set_features([str(tmp_path / "empty")], None, batch_size=4, max_image_pixels=None)
