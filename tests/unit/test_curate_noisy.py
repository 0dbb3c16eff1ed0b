import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from clipkit.data.noisy import PROPORTIONS, write_noisy_dataset
from clipkit.data.synth import COLOURS, SHAPES


def _read(paths):
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy")
    manifest = write_noisy_dataset(out, samples=400, seed=7, samples_per_shard=150, image_size=32)
    train = _read(sorted((out / "train").glob("*.tar")))
    evals = _read(sorted((out / "eval" / "test").glob("*.tar")))
    planted = [json.loads(line) for line in (out / "planted.jsonl").read_text().splitlines()]
    return out, manifest, train, evals, planted


def _encode(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _px(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_layout_counts_and_determinism(noisy, tmp_path):
    out, manifest, train, evals, planted = noisy
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (out / "eval" / "test" / "nshards.txt").read_text().strip() == "1"
    assert len(evals) == 40 and all("cls" in s and "jpg" in s for s in evals.values())
    assert [r["key"] for r in planted] == sorted(train)
    counts = Counter(r["kind"] for r in planted)
    for kind, p in PROPORTIONS.items():
        assert counts[kind] == int(p * 400) == manifest["counts"][kind]
    assert counts["clean"] == 400 - sum(int(p * 400) for p in PROPORTIONS.values())
    for s in train.values():
        meta = json.loads(s["json"])
        assert set(meta) == {"key", "caption", "width", "height", "status", "url"}  # no hint of the kind
        assert meta["caption"] == s["txt"].decode()
    again = write_noisy_dataset(tmp_path / "again", samples=400, seed=7, samples_per_shard=150, image_size=32)
    assert again["head_classes"] == manifest["head_classes"]
    assert (tmp_path / "again" / "planted.jsonl").read_text() == (out / "planted.jsonl").read_text()
    assert _read([tmp_path / "again" / "train" / "00001.tar"]) == _read([out / "train" / "00001.tar"])


def test_copies_are_what_their_labels_say(noisy):
    _, _, train, evals, planted = noisy
    seen = Counter()
    for r in planted:
        s = train[r["key"]]
        if r["kind"] == "exact_dup":
            o = train[r["original"]]
            assert s["jpg"] == o["jpg"] and s["txt"] == o["txt"]
            assert next(p for p in planted if p["key"] == r["original"])["kind"] == "clean"
        elif r["kind"] == "near_dup":
            o = train[r["original"]]
            assert s["jpg"] != o["jpg"] and s["txt"] == o["txt"]
            a, b = _px(s["jpg"]), _px(o["jpg"])
            assert a.shape == b.shape
            orig = Image.open(io.BytesIO(o["jpg"])).convert("RGB")
            # the label's recipe, redone here with Pillow: the same bytes
            if r["variant"] == "flip":
                expected = _encode(orig.transpose(Image.FLIP_LEFT_RIGHT), 92)
                assert np.abs(a - b[:, ::-1]).mean() < np.abs(a - b).mean() / 2  # and the pixels are a mirror
            elif r["variant"] == "jpeg_quality":
                expected = _encode(orig, 60)
                assert np.abs(a - b).mean() < 12
            else:
                box = r["crop"]
                assert 0 < box[0] and 0 < box[1] and box[2] < 32 and box[3] < 32
                expected = _encode(orig.crop(box).resize((32, 32), Image.LANCZOS), 92)
            assert s["jpg"] == expected
            seen[r["variant"]] += 1
        elif r["kind"] == "eval_leak":
            src = r["original"].removeprefix("eval:")
            assert r["original"].startswith("eval:") and src in evals
            assert s["txt"] == evals[src]["txt"]
            assert s["jpg"] != evals[src]["jpg"]
            assert s["jpg"] == _encode(Image.open(io.BytesIO(evals[src]["jpg"])).convert("RGB"), 85)
    assert set(seen) == {"jpeg_quality", "crop_resize", "flip"}


def test_flip_is_a_mirror_not_a_copy(noisy):
    _, _, train, _, planted = noisy
    flips = [r for r in planted if r.get("variant") == "flip"]
    mirrored = unflipped = 0.0
    for r in flips:
        a, b = _px(train[r["key"]]["jpg"]), _px(train[r["original"]]["jpg"])
        mirrored += np.abs(a - b[:, ::-1]).mean()
        unflipped += np.abs(a - b).mean()
    assert mirrored < unflipped / 2


def test_captions_and_images_of_the_other_kinds(noisy):
    lingua = pytest.importorskip("lingua")
    detector = lingua.LanguageDetectorBuilder.from_languages(
        lingua.Language.ENGLISH, lingua.Language.GERMAN, lingua.Language.FRENCH, lingua.Language.SPANISH).build()
    _, manifest, train, _, planted = noisy
    clean_classes = Counter()
    for r in planted:
        s = train[r["key"]]
        text = s["txt"].decode()
        w, h = Image.open(io.BytesIO(s["jpg"])).size
        if r["kind"] == "mismatched":
            colour, shape = r["image_class"].split()
            words = set(re.findall(r"[a-z]+", text))
            assert colour not in words and not any(w_.startswith(shape) for w_ in words)
            assert any(c in words for c in COLOURS) and any(w_.startswith(tuple(SHAPES)) for w_ in words)
        elif r["kind"] == "filename_caption":
            assert re.fullmatch(r"IMG_\d{4}\.JPG|DSC\d{5}\.jpg|photo_\d{4}_\d\d_\d\d\.png", text)
        elif r["kind"] == "foreign_language":
            assert detector.detect_language_of(text).name.lower() == r["variant"]
        elif r["kind"] == "small_image":
            assert (w, h) == (8, 8)
        elif r["kind"] == "extreme_aspect":
            assert w / h >= 4
        elif r["kind"] == "clean":
            assert (w, h) == (32, 32)
            assert detector.detect_language_of(text) == lingua.Language.ENGLISH
            clean_classes[r["image_class"]] += 1
            colour, shape = r["image_class"].split()
            assert colour in text
    # head-heavy: each head class far above the 1/30 a uniform draw gives
    total = sum(clean_classes.values())
    for c in manifest["head_classes"]:
        assert clean_classes[c] / total > 3 / 30


def test_cli_writes_the_same_set(noisy, tmp_path, capsys):
    from clipkit import cli

    out, _, _, _, _ = noisy
    assert cli.main(["data", "synth", "--noisy", "--out", str(tmp_path / "n"), "--train-samples", "400",
                     "--eval-samples", "40", "--samples-per-shard", "150", "--image-size", "32", "--seed", "7"]) == 0
    assert "planted" in capsys.readouterr().out
    assert (tmp_path / "n" / "planted.jsonl").read_text() == (out / "planted.jsonl").read_text()


def test_hash_decontamination_finds_every_planted_leak(noisy):
    """Recall of decontaminate's hash rule on the planted leaks (re-encoded eval images), each matched to its
    own source. Precision on this set is low (synthetic scenes are flat enough that unrelated ones share a
    pHash): docs/curation.md gives both numbers."""
    from clipkit.curate.decontam import decontaminate, eval_set_features
    from clipkit.curate.hashing import perceptual_hashes

    out, _, train, _, planted = noisy
    keys = [r["key"] for r in planted]
    hashes = np.array([perceptual_hashes(Image.open(io.BytesIO(train[k]["jpg"]))) for k in keys], dtype=np.uint64)
    sets = eval_set_features([str(out / "eval")], None, batch_size=16, max_image_pixels=None)
    alive = np.ones(len(keys), bool)
    res = decontaminate(hashes[:, 0], hashes[:, 1], None, alive, sets, max_distance=6, cosine=None).check(alive)
    leaks = [i for i, r in enumerate(planted) if r["kind"] == "eval_leak"]
    assert len(leaks) == 16
    found = [i for i in leaks if res.drop[i] and res.detail[i] == "eval:" + planted[i]["original"][len("eval:"):]]
    assert len(found) / len(leaks) >= 0.95
