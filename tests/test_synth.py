import io
import json
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image

from clipkit.data import expand_shards, write_synth_dataset
from clipkit.data.synth import COLOURS, SHAPES, class_names, is_held_out


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
    a = write_synth_dataset(tmp_path / "a", train_samples=40, eval_samples=20, samples_per_shard=40, seed=7, workers=1)
    b = write_synth_dataset(tmp_path / "b", train_samples=40, eval_samples=20, samples_per_shard=40, seed=7, workers=1)
    c = write_synth_dataset(tmp_path / "c", train_samples=40, eval_samples=20, samples_per_shard=40, seed=8, workers=1)
    pa, pb, pc = (_members(expand_shards(d.train_spec)[0]) for d in (a, b, c))
    assert pa == pb
    assert pa != pc
