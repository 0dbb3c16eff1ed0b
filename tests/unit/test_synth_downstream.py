"""The built-in dataset's downstream split: a labelled classification set (the shapes' fill style) for
adaptation experiments. Read back with plain tarfile and PIL, not with the writer's own code."""
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipkit.data import SynthDataset, downstream_class_names, ensure_synth_dataset, write_synth_dataset
from clipkit.data.synth import (BACKGROUNDS, CAPTION_TEMPLATES, COLOURS, COUNTS, FILL_STYLES, POSITIONS,
                                RETRIEVAL_TEMPLATES, SHAPES, SIZES)

SMALL = dict(train_samples=40, eval_samples=10, retrieval_samples=5, samples_per_shard=150, image_size=32, seed=3)


@pytest.fixture(scope="module")
def synth_ds(tmp_path_factory):
    """Downstream: 400 train samples in 3 shards (150, 150, 100), 200 test samples in 2 (150, 50)."""
    return write_synth_dataset(tmp_path_factory.mktemp("synth_ds"), workers=1, downstream_train_samples=400,
                               downstream_test_samples=200, **SMALL)


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _read_split(root: Path, split: str) -> list[dict]:
    """Every sample of root/split, in shard order: key, image (uint8 array), label, meta."""
    nshards = int((root / split / "nshards.txt").read_text())
    assert sorted(p.name for p in (root / split).glob("*.tar")) == sorted(f"{i}.tar" for i in range(nshards))
    samples = []
    for i in range(nshards):
        members = _members(root / split / f"{i}.tar")
        keys = sorted({name.split(".")[0] for name in members})
        assert set(members) == {f"{k}.{ext}" for k in keys for ext in ("jpg", "cls", "json")}
        for key in keys:
            img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            assert img.format == "JPEG"
            samples.append({"key": key, "image": np.asarray(img.convert("RGB")),
                            "label": int(members[f"{key}.cls"].decode()), "meta": json.loads(members[f"{key}.json"])})
    return samples


def test_downstream_split_uses_clip_benchmark_classification_layout(synth_ds):
    root = synth_ds.root / "downstream"
    assert synth_ds.downstream_root == root
    assert (synth_ds.num_downstream_train, synth_ds.num_downstream_test) == (400, 200)
    assert sorted(p.name for p in root.iterdir()) == ["classnames.txt", "dataset_type.txt", "test", "train",
                                                       "zeroshot_classification_templates.txt"]  # no val split
    assert (root / "dataset_type.txt").read_text() == "classification\n"
    names = (root / "classnames.txt").read_text().splitlines()
    assert names == downstream_class_names() == ["solid shape", "outlined shape", "hatched shape", "dotted shape"]
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all(t.count("{c}") == 1 for t in templates)
    assert (root / "train" / "nshards.txt").read_text() == "3\n"
    assert (root / "test" / "nshards.txt").read_text() == "2\n"
    manifest = json.loads((synth_ds.root / "manifest.json").read_text())
    assert manifest["format"] == "clipkit-synth-v4" and manifest["downstream"] == "downstream"
    assert manifest["params"]["downstream_train_samples"] == 400
    assert manifest["params"]["downstream_test_samples"] == 200


@pytest.mark.parametrize("split, total", [("train", 400), ("test", 200)])
def test_labels_are_balanced_and_agree_with_the_scene(synth_ds, split, total):
    samples = _read_split(synth_ds.downstream_root, split)
    assert len(samples) == total and len({s["key"] for s in samples}) == total
    counts = Counter(s["label"] for s in samples)
    assert set(counts) == set(range(4))  # every class present
    assert max(counts.values()) - min(counts.values()) <= 1
    for s in samples:
        meta = s["meta"]
        assert s["image"].shape == (32, 32, 3)
        assert meta["key"] == s["key"] and (meta["width"], meta["height"]) == (32, 32)
        assert meta["fill"] == FILL_STYLES[s["label"]] and meta["classname"] == downstream_class_names()[s["label"]]
        assert meta["label"] == s["label"]
        assert (meta["colour"] in COLOURS and meta["shape"] in SHAPES and meta["size"] in SIZES
                and meta["position"] in POSITIONS and meta["background"] in BACKGROUNDS and meta["count"] in COUNTS)
    # the scenes vary as in the rest of the dataset, independently of the label
    assert len({s["meta"]["colour"] for s in samples}) == len(COLOURS)
    assert len({s["meta"]["shape"] for s in samples}) == len(SHAPES)
    assert len({s["meta"]["background"] for s in samples}) == len(BACKGROUNDS)


def test_train_and_test_images_differ(synth_ds):
    train = {s["image"].tobytes() for s in _read_split(synth_ds.downstream_root, "train")}
    test = {s["image"].tobytes() for s in _read_split(synth_ds.downstream_root, "test")}
    assert not train & test


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_no_pretraining_caption_names_the_fill_style(synth_ds):
    names = downstream_class_names()
    common = set.intersection(*(_words(n) for n in names))  # "shape"
    distinguishing = set.union(*(_words(n) for n in names)) - common
    assert distinguishing == {"solid", "outlined", "hatched", "dotted"}
    # every word any caption can hold: the templates and every attribute value ...
    vocabulary = set()
    for text in CAPTION_TEMPLATES + RETRIEVAL_TEMPLATES + list(COLOURS) + SHAPES + list(SIZES) + list(POSITIONS) \
            + BACKGROUNDS + list(COUNTS.values()):
        vocabulary |= _words(text.replace("{", " ").replace("}", " "))
    assert not distinguishing & vocabulary
    # ... and the captions actually written, of the training and the retrieval split
    captions = []
    for tar in sorted((synth_ds.root / "train").glob("*.tar")) + sorted((synth_ds.root / "retrieval").rglob("*.tar")):
        captions += [data.decode() for name, data in _members(tar).items() if name.endswith(".txt")]
    assert len(captions) == 40 + 5
    for text in captions:
        assert not distinguishing & _words(text), text
        assert not any(word in text.lower() for word in distinguishing), text


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")  # CLIP_benchmark's reader
def test_downstream_split_is_read_as_a_zeroshot_set(synth_ds):
    from clip_benchmark.datasets.builder import build_wds_dataset

    from clipkit.evaluation import load_zeroshot_set

    for split in ("train", "test"):
        zs = load_zeroshot_set(synth_ds.downstream_root, split=split)
        assert zs.classnames == downstream_class_names() and all("{c}" in t for t in zs.templates)
    ds = build_wds_dataset("downstream", transform=lambda img: img.size, split="test",
                           data_dir=str(synth_ds.downstream_root))
    read = list(ds)
    assert len(read) == 200 and all(size == (32, 32) and 0 <= label < 4 for size, label in read)


def _shape_features(image: np.ndarray, meta: dict) -> list[float]:
    """How the pixels of the shape's colour lie: how many, how many inside the mask rather than on its edge,
    how much closing its gaps and filling its holes adds, how many pieces per shape; and how many of the
    pixels among them are near white or near black."""
    from scipy import ndimage

    pixels = image.astype(np.float32)
    mask = np.abs(pixels - np.array(COLOURS[meta["colour"]], np.float32)).max(-1) < 70
    n = max(int(mask.sum()), 1)
    closed = ndimage.binary_closing(mask)
    region = ndimage.binary_fill_holes(closed) & ~mask
    white, dark = (region & (pixels.min(-1) > 200)).sum(), (region & (pixels.max(-1) < 60)).sum()
    return [np.log(n), ndimage.binary_erosion(mask).sum() / n, ndimage.binary_fill_holes(mask).sum() / n,
            closed.sum() / n, ndimage.binary_fill_holes(closed).sum() / n, ndimage.label(mask)[1] / meta["count"],
            white / n, dark / n]


def test_fill_style_is_visible_in_the_pixels(synth_ds):
    """A logistic regression on simple statistics of the shape-coloured pixels tells the fill styles apart well
    above chance (0.25), even at 32 px: the label is in the image, not only in the metadata."""
    from sklearn.linear_model import LogisticRegression

    def xy(split):
        samples = _read_split(synth_ds.downstream_root, split)
        return (np.array([_shape_features(s["image"], s["meta"]) for s in samples]),
                np.array([s["label"] for s in samples]))

    (x_train, y_train), (x_test, y_test) = xy("train"), xy("test")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=1000).fit((x_train - mean) / std, y_train)
    assert clf.score((x_test - mean) / std, y_test) > 0.5
    # solid shapes cover the most pixels of their colour
    coverage = {c: x_train[y_train == c, 0].mean() for c in range(4)}
    assert max(coverage, key=coverage.get) == FILL_STYLES.index("solid")


def _tree(root: Path, split: str) -> dict:
    """Every file under root/split (a tar as its members: the archive's headers hold write times)."""
    return {p.relative_to(root).as_posix(): _members(p) if p.suffix == ".tar" else p.read_bytes()
            for p in sorted((root / split).rglob("*")) if p.is_file()}


def test_writer_is_deterministic_and_a_sample_does_not_depend_on_the_total(tmp_path):
    tiny = dict(train_samples=4, eval_samples=4, retrieval_samples=2, samples_per_shard=8, image_size=32, workers=1)
    a = write_synth_dataset(tmp_path / "a", seed=7, downstream_train_samples=12, downstream_test_samples=8, **tiny)
    b = write_synth_dataset(tmp_path / "b", seed=7, downstream_train_samples=12, downstream_test_samples=8, **tiny)
    c = write_synth_dataset(tmp_path / "c", seed=8, downstream_train_samples=12, downstream_test_samples=8, **tiny)
    d = write_synth_dataset(tmp_path / "d", seed=7, downstream_train_samples=20, downstream_test_samples=4, **tiny)
    contents = {x: {k: _members(p) for k, p in ((k, x.downstream_root / k) for k in ("train/0.tar", "test/0.tar"))}
                for x in (a, b, c, d)}
    assert contents[a] == contents[b]
    assert contents[a]["train/0.tar"] != contents[c]["train/0.tar"]
    assert contents[a]["train/0.tar"] == contents[d]["train/0.tar"]  # indices 0-7 either way
    assert all(contents[a]["test/0.tar"][name] == data for name, data in contents[d]["test/0.tar"].items())
    # the other splits do not depend on the downstream split
    for split in ("train", "eval", "retrieval"):
        assert _tree(a.root, split) == _tree(d.root, split)
    with pytest.raises(ValueError, match="downstream_test_samples"):
        write_synth_dataset(tmp_path / "e", seed=7, downstream_test_samples=0, **tiny)


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_ensure_adds_the_downstream_split_to_an_older_dataset(tmp_path, version):
    params = dict(train_samples=30, eval_samples=10, samples_per_shard=15, seed=5, image_size=32)
    sizes = dict(downstream_train_samples=20, downstream_test_samples=10)
    fresh = write_synth_dataset(tmp_path / "fresh", workers=1, **params, **sizes)
    old = write_synth_dataset(tmp_path / "old", workers=1, **params, **sizes)
    # what the writer made before: no downstream split (v2: no retrieval split either), nor their params
    removed = ["downstream"] + (["retrieval"] if version == "v2" else [])
    for split in removed:
        shutil.rmtree(old.root / split)
    manifest = json.loads((old.root / "manifest.json").read_text())
    manifest["format"] = f"clipkit-synth-{version}"
    v2 = version == "v2"
    for key in ("downstream", "num_downstream_classes") + (("retrieval", "captions_per_image") if v2 else ()):
        del manifest[key]
    for key in ("downstream_train_samples", "downstream_test_samples") + (("retrieval_samples",) if v2 else ()):
        del manifest["params"][key]
    (old.root / "manifest.json").write_text(json.dumps(manifest))
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in old.root.rglob("*") if p.is_file()
            and p.name != "manifest.json"}

    done = ensure_synth_dataset(old.root, workers=1, **params, **sizes)
    assert done == SynthDataset(old.root, old.train_spec, old.eval_root, 30, 10, old.root / "retrieval", 10,
                                old.root / "downstream", 20, 10)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept  # nothing else rewritten
    for split in removed:
        assert _tree(old.root, split) == _tree(fresh.root, split)
    manifests = [json.loads((x.root / "manifest.json").read_text()) for x in (old, fresh)]
    assert manifests[0] == manifests[1]

    # complete now: reused as it is (left-out sizes match any); other downstream sizes: written again
    stamps = {p: p.stat().st_mtime_ns for p in old.root.rglob("*.tar")}
    assert ensure_synth_dataset(old.root, **params) == done
    assert ensure_synth_dataset(old.root, **params, **sizes) == done
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = ensure_synth_dataset(old.root, workers=1, **params, downstream_train_samples=8, downstream_test_samples=4)
    assert (again.num_downstream_train, again.num_downstream_test) == (8, 4)
    assert len(_read_split(again.downstream_root, "train")) == 8


def test_ensure_adds_the_default_downstream_sizes_when_none_are_given(tmp_path, monkeypatch):
    """An upgrade without downstream sizes writes the writer's defaults (as small ones here, to stay fast)."""
    from clipkit.data import synth

    monkeypatch.setattr(synth, "DOWNSTREAM_TRAIN_SAMPLES", 6)
    monkeypatch.setattr(synth, "DOWNSTREAM_TEST_SAMPLES", 5)
    params = dict(train_samples=8, eval_samples=4, samples_per_shard=8, seed=1, image_size=32)
    old = write_synth_dataset(tmp_path, workers=1, downstream_train_samples=1, downstream_test_samples=1, **params)
    shutil.rmtree(old.root / "downstream")
    manifest = json.loads((old.root / "manifest.json").read_text())
    manifest["format"] = "clipkit-synth-v3"
    del manifest["downstream"], manifest["num_downstream_classes"]
    del manifest["params"]["downstream_train_samples"], manifest["params"]["downstream_test_samples"]
    (old.root / "manifest.json").write_text(json.dumps(manifest))
    done = ensure_synth_dataset(old.root, workers=1, **params)
    assert (done.num_downstream_train, done.num_downstream_test) == (6, 5)
    assert len(_read_split(done.downstream_root, "test")) == 5
