import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from clipkit.data import SynthDataset, ensure_synth_dataset, expand_shards, write_synth_dataset
from clipkit.data.synth import CAPTIONS_PER_IMAGE, COLOURS, MAX_RETRIEVAL, SHAPES, class_names, is_held_out


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_train_shards_use_img2dataset_layout(synth_small):
    shards = expand_shards(synth_small.train_spec)
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    members = _members(shards[0])
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 150
    for key in keys[:10]:
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(members)
        img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert img.format == "JPEG" and img.size == (32, 32)
        meta = json.loads(members[f"{key}.json"])
        caption = members[f"{key}.txt"].decode()
        assert meta["key"] == key and meta["caption"] == caption
        # the caption describes the drawn attributes
        assert meta["colour"] in caption and meta["shape"][:4] in caption
    assert json.loads(Path(shards[0]).with_name("00000_stats.json").read_text())["successes"] == 150


def test_shards_read_with_webdataset(synth_small):
    ds = wds.WebDataset(expand_shards(synth_small.train_spec), shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    n = 0
    for img, txt, meta in ds:
        assert img.size == (32, 32) and isinstance(txt, str) and txt
        n += 1
    assert n == 600


def test_eval_split_uses_clip_benchmark_layout(synth_small):
    root = synth_small.eval_root
    assert (root / "test" / "nshards.txt").read_text().strip() == "1"
    names = (root / "classnames.txt").read_text().splitlines()
    assert names == class_names() and len(names) == len(COLOURS) * len(SHAPES)
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    members = _members(root / "test" / "0.tar")
    labels = [int(v) for k, v in members.items() if k.endswith(".cls")]
    assert len(labels) == 120 and all(0 <= x < len(names) for x in labels)


def test_eval_combinations_are_held_out_of_training(synth_small):
    train_combos, classes = set(), set()
    for shard in expand_shards(synth_small.train_spec):
        for name, data in _members(shard).items():
            if name.endswith(".json"):
                m = json.loads(data)
                train_combos.add((m["background"], m["position"]))
                classes.add((m["colour"], m["shape"]))
    assert len(classes) == len(COLOURS) * len(SHAPES)  # every class is trained on
    eval_members = _members(synth_small.eval_root / "test" / "0.tar")
    eval_metas = [json.loads(v) for k, v in eval_members.items() if k.endswith(".json")]
    eval_combos = {(m["background"], m["position"]) for m in eval_metas}
    assert len(eval_metas) == 120 and not (eval_combos & train_combos)
    labels = {k.split(".")[0]: int(v) for k, v in eval_members.items() if k.endswith(".cls")}
    assert all(class_names()[labels[m["key"]]] == f"{m['colour']} {m['shape']}" for m in eval_metas)
    # the held-out combinations do not depend on the class: every (background, position) is either
    # held out for all classes or for none
    assert all(is_held_out(b, p) for b, p in eval_combos)
    assert not any(is_held_out(b, p) for b, p in train_combos)


def test_writer_is_deterministic_for_a_seed(tmp_path):
    tiny = dict(train_samples=40, eval_samples=20, samples_per_shard=40, workers=1, downstream_train_samples=4,
                downstream_test_samples=4)
    a = write_synth_dataset(tmp_path / "a", seed=7, **tiny)
    b = write_synth_dataset(tmp_path / "b", seed=7, **tiny)
    c = write_synth_dataset(tmp_path / "c", seed=8, **tiny)
    pa, pb, pc = (_members(expand_shards(d.train_spec)[0]) for d in (a, b, c))
    assert pa == pb
    assert pa != pc


def test_retrieval_split_uses_clip_benchmark_retrieval_layout(synth_small):
    """Several captions per image, one per line, readable by CLIP_benchmark's own wds reader."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    root = synth_small.retrieval_root
    assert root == synth_small.root / "retrieval" and synth_small.num_retrieval == 120  # default: as many as eval
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    assert (root / "test" / "nshards.txt").read_text().strip() == "1"
    members = _members(root / "test" / "0.tar")
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 120 and not any(name.endswith(".cls") for name in members)
    every_caption = []
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        captions = members[f"{key}.txt"].decode().split("\n")
        assert len(captions) == CAPTIONS_PER_IMAGE and captions[0] == meta["caption"]
        for attribute in ("colour", "size", "background", "position"):
            assert all(meta[attribute] in c for c in captions), (attribute, captions)
        assert all(meta["shape"][:4] in c for c in captions)
        assert is_held_out(meta["background"], meta["position"])
        every_caption += captions
    # no caption is shared, within an image or across images: identical captions would tie exactly
    assert len(set(every_caption)) == len(every_caption) == 600
    ds = build_wds_dataset("retrieval", transform=lambda img: img.size, data_dir=str(root))
    read = list(ds)
    assert len(read) == 120 and all(size == (32, 32) and len(texts) == CAPTIONS_PER_IMAGE for size, texts in read)


def _contents(root: Path, split: str) -> dict:
    return {p.relative_to(root).as_posix(): _members(p) for p in sorted((root / split).rglob("*.tar"))}


def test_retrieval_split_leaves_the_other_splits_unchanged(tmp_path):
    small = dict(train_samples=30, eval_samples=10, samples_per_shard=15, seed=5, workers=1, downstream_train_samples=4,
                 downstream_test_samples=4)
    a = write_synth_dataset(tmp_path / "a", retrieval_samples=4, **small)
    b = write_synth_dataset(tmp_path / "b", retrieval_samples=20, **small)
    for split in ("train", "eval"):
        assert _contents(a.root, split) == _contents(b.root, split)
    assert a.num_retrieval == 4 and b.num_retrieval == 20
    assert (b.root / "retrieval" / "test" / "nshards.txt").read_text().strip() == "2"
    first_a, first_b = (_contents(d.root, "retrieval")["retrieval/test/0.tar"] for d in (a, b))
    assert all(first_b[name] == data for name, data in first_a.items())  # a sample does not depend on the total
    with pytest.raises(ValueError, match=f"at most {MAX_RETRIEVAL} distinct scenes"):
        write_synth_dataset(tmp_path / "c", retrieval_samples=MAX_RETRIEVAL + 1, **small)


def test_ensure_completes_a_dataset_written_before_the_retrieval_split(tmp_path):
    params = dict(train_samples=30, eval_samples=10, samples_per_shard=15, seed=5, image_size=32,
                  downstream_train_samples=8, downstream_test_samples=4)
    fresh = write_synth_dataset(tmp_path / "fresh", workers=1, **params)
    old = write_synth_dataset(tmp_path / "old", workers=1, **params)
    # what the writer made before: no retrieval split, a v2 manifest without its param
    shutil.rmtree(old.root / "retrieval")
    manifest = json.loads((old.root / "manifest.json").read_text())
    manifest["format"] = "clipkit-synth-v2"
    for key in ("retrieval", "captions_per_image"):
        del manifest[key]
    del manifest["params"]["retrieval_samples"]
    (old.root / "manifest.json").write_text(json.dumps(manifest))
    stamps = {p: p.stat().st_mtime_ns for p in old.root.rglob("*.tar")}

    done = ensure_synth_dataset(old.root, workers=1, **params)
    assert done == SynthDataset(old.root, old.train_spec, old.eval_root, 30, 10, old.root / "retrieval", 10,
                                old.root / "downstream", 8, 4)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the existing shards were not rewritten
    assert _contents(old.root, "retrieval") == _contents(fresh.root, "retrieval")
    manifests = [json.loads((d.root / "manifest.json").read_text()) for d in (old, fresh)]
    assert manifests[0] == manifests[1]

    # complete now: reused as it is; other params: written again
    stamps = {p: p.stat().st_mtime_ns for p in old.root.rglob("*.tar")}
    assert ensure_synth_dataset(old.root, **params) == done
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert ensure_synth_dataset(old.root, workers=1, retrieval_samples=3, **params).num_retrieval == 3
