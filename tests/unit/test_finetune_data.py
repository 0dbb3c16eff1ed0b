"""clipkit.finetune.data: the downstream set's index (against torchvision's ImageFolder and plain tarfile
reading), the val split, the train loader's rank slicing and seeding, and every bad input."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.errors import UserError
from clipkit.evaluation import build_folder_loader, default_templates
from clipkit.finetune.data import (
    LabelledImages,
    Sample,
    eval_loader,
    load_downstream,
    split_train_val,
    train_loader,
)


@pytest.fixture(scope="module")
def transforms():
    from clipkit.models import create_model, create_transforms

    return create_transforms(create_model("clipkit-nano"))  # (RandomResizedCrop 32 train, Resize+CenterCrop eval)


def _image(seed: int, fmt: str = "PNG", size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _folder(root: Path, layout: dict[str, dict[str, int]], seed: int = 0, size: int = 40) -> Path:
    """ROOT/<split>/<class>/<i>.png|.jpg with n images per class; every third image a JPEG."""
    for split, classes in layout.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                fmt, ext = ("JPEG", "jpg") if i % 3 == 2 else ("PNG", "png")
                (root / split / name / f"{i:03d}.{ext}").write_bytes(_image(seed, fmt, size))
    return root


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _wds(root: Path, shards: dict[str, list[list[tuple[str, bytes]]]], classnames: list[str]) -> Path:
    for split, tars in shards.items():
        for i, members in enumerate(tars):
            _tar(root / split / f"{i}.tar", members)
        (root / split / "nshards.txt").write_text(f"{len(tars)}\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    return root


def _sample(key: str, label: int | str | None, seed: int, ext: str = "jpg") -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", _image(seed, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]))] if ext else []
    if label is not None:
        members.append((f"{key}.cls", f"{label}\n".encode()))
    return members


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# -- image folder ----------------------------------------------------------------------------------------------


def test_folder_matches_imagefolder_and_decodes_as_the_folder_evaluation_path(tmp_path, transforms):
    from torchvision.datasets import ImageFolder

    classes = {"cat": 4, "golden_retriever": 5, "zebra": 3}
    root = _folder(tmp_path / "pets", {"train": classes, "val": {"cat": 1, "zebra": 2}, "test": classes})
    (root / "train" / "cat" / "more").mkdir()
    (root / "train" / "cat" / "more" / "x.PNG").write_bytes(_image(99))  # nested, upper-case extension
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "zebra" / ".DS_Store").write_bytes(b"\0\1")
    (root / "test" / "zebra" / "README").write_text("nor this")

    ds = load_downstream(root)
    assert ds.name == "pets" and ds.root == root
    assert ds.classnames == ["cat", "golden retriever", "zebra"]
    assert ds.templates == default_templates()
    assert not ds.val_from_train
    assert ds.skipped == {"not_an_image": 3}
    for split in ("train", "test"):
        ref = ImageFolder(str(root / split))
        assert [(s.source, s.label) for s in getattr(ds, split)] == ref.samples
    for s in ds.train:
        assert s.offset == -1 and s.size == Path(s.source).stat().st_size
        assert s.key == Path(s.source).relative_to(root / "train").as_posix()
    # val holds a subset of the classes, labelled by train's class order (not val's own sorted folders)
    train_idx = ImageFolder(str(root / "train")).class_to_idx
    assert [(s.key, s.label) for s in ds.val] == [("cat/000.png", train_idx["cat"]), ("zebra/000.png", 2),
                                                   ("zebra/001.png", 2)]

    # pixels: the same as the folder evaluation path and as PIL + the transform
    batches = list(eval_loader(ds.test, transforms[1], batch_size=5, workers=0))
    images = torch.cat([b.images for b in batches])
    assert [k for b in batches for k in b.keys] == [s.key for s in ds.test]
    assert torch.cat([b.targets for b in batches]).tolist() == [s.label for s in ds.test]
    ref_batches = list(build_folder_loader(root / "test", [(s.key, s.label) for s in ds.test], transforms[1], 5, 0))
    assert torch.equal(images, torch.cat([b.images for b in ref_batches]))
    pil = torch.stack([transforms[1](Image.open(s.source).convert("RGB")) for s in ds.test])
    torch.testing.assert_close(images, pil, atol=1e-6, rtol=0)


def test_folder_classnames_and_templates_files(tmp_path):
    root = _folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    (root / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\n{c}!\n")
    ds = load_downstream(root)
    assert ds.templates == ["a photo of {c}.", "{c}!"]
    (root / "classnames.txt").write_text("apple\nbanana\n")
    assert load_downstream(root).classnames == ["apple", "banana"]
    (tmp_path / "names.txt").write_text("ant\nbee\n")
    (tmp_path / "tmpl.txt").write_text("itap of a {c}.\n")
    ds = load_downstream(root, classnames=str(tmp_path / "names.txt"), templates=str(tmp_path / "tmpl.txt"))
    assert ds.classnames == ["ant", "bee"] and ds.templates == ["itap of a {c}."]


# -- webdataset ------------------------------------------------------------------------------------------------


def _tarfile_reference(path: Path) -> list[tuple[str, int, bytes]]:
    """(KEY, label, image bytes) per sample with both an image and a .cls member, by plain tarfile reading."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        names = {m.name: m for m in members}
        out = []
        for m in members:
            stem, _, ext = m.name.rpartition(".")
            if ext in ("jpg", "png", "webp", "jpeg") and stem + ".cls" in names:
                label = int(tar.extractfile(names[stem + ".cls"]).read())
                out.append((stem, label, tar.extractfile(m).read()))
    return out


def test_wds_matches_plain_tarfile_reading(tmp_path, transforms):
    train = [
        _sample("s000", 0, 1) + [("s000.txt", b"a caption")] + _sample("s001", 2, 2, "png") + _sample("s002", 1, 3)
        + _sample("no_image", 1, 4, ext="") + _sample("no_label", None, 5) + _sample("sub/s003", 2, 6, "webp"),
        _sample("s100", 1, 7) + _sample("s101", 0, 8),
    ]
    test = [_sample("t000", 2, 9) + _sample("t001", 0, 10)]
    root = _wds(tmp_path / "wds_set", {"train": train, "test": test, "val": [_sample("v000", 1, 11)]},
                ["cat", "dog", "emu"])
    ds = load_downstream(root)
    assert ds.classnames == ["cat", "dog", "emu"] and ds.templates == default_templates()
    assert ds.skipped == {"missing_image": 1, "missing_label": 1}
    assert not ds.val_from_train and [s.key for s in ds.val] == ["0.tar/v000"]
    for split, n in (("train", 2), ("test", 1)):
        ref = [(f"{i}.tar/{key}", label, data) for i in range(n)
               for key, label, data in _tarfile_reference(root / split / f"{i}.tar")]
        got = getattr(ds, split)
        assert [(s.key, s.label) for s in got] == [(k, label) for k, label, _ in ref]
        assert [s.read() for s in got] == [data for _, _, data in ref]
        for s in got:  # (offset, size) address the member's bytes in the file itself
            with open(s.source, "rb") as f:
                f.seek(s.offset)
                assert f.read(s.size) == s.read()
    assert [s.key for s in ds.train] == ["0.tar/s000", "0.tar/s001", "0.tar/s002", "0.tar/sub/s003", "1.tar/s100",
                                         "1.tar/s101"]
    assert {Path(s.source) for s in ds.train} == {root / "train" / "0.tar", root / "train" / "1.tar"}

    batch = next(iter(eval_loader(ds.train, transforms[1], batch_size=8, workers=0)))
    pil = torch.stack([transforms[1](Image.open(io.BytesIO(s.read())).convert("RGB")) for s in ds.train])
    torch.testing.assert_close(batch.images, pil, atol=1e-6, rtol=0)
    assert batch.targets.tolist() == [0, 2, 1, 2, 1, 0]

    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    assert load_downstream(root).templates == ["a {c}."]


# -- val split -------------------------------------------------------------------------------------------------


def test_val_split_is_stratified_disjoint_and_seeded(tmp_path):
    from torchvision.datasets import ImageFolder

    sizes = {"a": 1, "b": 2, "c": 5, "d": 20, "e": 37}
    root = _folder(tmp_path / "noval", {"train": sizes, "test": {"a": 1}})
    original = ImageFolder(str(root / "train")).samples
    ds = load_downstream(root, val_fraction=0.1, seed=0)
    assert ds.val_from_train
    assert Counter(s.label for s in ds.val) == {1: 1, 2: 1, 3: 2, 4: 4}  # >= 1 when n >= 2, round(0.1 n)
    assert not {s.key for s in ds.val} & {s.key for s in ds.train}
    assert sorted((s.source, s.label) for s in ds.train + ds.val) == sorted(original)
    for split in (ds.train, ds.val):  # each keeps ImageFolder's order
        assert [(s.source, s.label) for s in split] == [x for x in original if x[0] in {s.source for s in split}]
    again = load_downstream(root, val_fraction=0.1, seed=0)
    assert again.val == ds.val and again.train == ds.train
    other = load_downstream(root, val_fraction=0.1, seed=1)
    assert {s.key for s in other.val} != {s.key for s in ds.val}
    assert Counter(s.label for s in other.val) == Counter(s.label for s in ds.val)
    half = load_downstream(root, val_fraction=0.5, seed=0)
    assert Counter(s.label for s in half.val) == {1: 1, 2: 3, 3: 10, 4: 19}
    # the split depends on the samples and the seed alone
    assert split_train_val(ds.train + ds.val, 0.3, 7) == split_train_val(ds.train + ds.val, 0.3, 7)


# -- loaders ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_set(tmp_path_factory):
    root = _folder(tmp_path_factory.mktemp("ddp"), {"train": {"a": 9, "b": 7, "c": 6}, "val": {"a": 1},
                                                    "test": {"a": 1}}, size=96)
    return load_downstream(root).train  # 22 samples


def _epoch(samples, tf, *, world_size: int, rank: int, epoch: int, workers: int = 0, seed: int = 5, g: int = 8):
    loader = train_loader(samples, tf, global_batch_size=g, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
                          workers=workers)
    assert len(loader) == len(samples) // g
    return list(loader)


def test_train_loader_ranks_concatenate_to_the_single_process_batch(ddp_set, transforms):
    train_tf = transforms[0]
    single = _epoch(ddp_set, train_tf, world_size=1, rank=0, epoch=0)
    ranks = [_epoch(ddp_set, train_tf, world_size=2, rank=r, epoch=0) for r in range(2)]
    four = [_epoch(ddp_set, train_tf, world_size=4, rank=r, epoch=0) for r in range(4)]
    assert len(single) == 2
    for step, batch in enumerate(single):
        assert batch.images.shape == (8, 3, 32, 32) and batch.targets.dtype == torch.long
        for world in (ranks, four):
            parts = [w[step] for w in world]
            assert batch.keys == [k for p in parts for k in p.keys]
            assert torch.equal(batch.images, torch.cat([p.images for p in parts]))
            assert torch.equal(batch.targets, torch.cat([p.targets for p in parts]))
    label_of = {s.key: s.label for s in ddp_set}
    keys = [k for b in single for k in b.keys]
    assert len(set(keys)) == 16 and [label_of[k] for k in keys] == torch.cat([b.targets for b in single]).tolist()


def test_train_loader_epochs_differ_and_repeat_exactly_across_worker_counts(ddp_set, transforms):
    train_tf = transforms[0]
    e0 = _epoch(ddp_set, train_tf, world_size=1, rank=0, epoch=0)
    e1 = _epoch(ddp_set, train_tf, world_size=1, rank=0, epoch=1)
    keys0, keys1 = [k for b in e0 for k in b.keys], [k for b in e1 for k in b.keys]
    assert keys0 != keys1  # another order
    img0 = {k: im for b in e0 for k, im in zip(b.keys, b.images)}
    img1 = {k: im for b in e1 for k, im in zip(b.keys, b.images)}
    common = set(img0) & set(img1)
    differ = [not torch.equal(img0[k], img1[k]) for k in common]  # other crops (two may coincide by chance)
    assert len(common) >= 8 and sum(differ) >= len(common) - 1
    again = _epoch(ddp_set, train_tf, world_size=1, rank=0, epoch=1, workers=2)
    assert [b.keys for b in again] == [b.keys for b in e1]
    assert all(torch.equal(a.images, b.images) for a, b in zip(again, e1))
    other_seed = _epoch(ddp_set, train_tf, world_size=1, rank=0, epoch=0, seed=6)
    assert [k for b in other_seed for k in b.keys] != keys0
    # the dataset alone: augmentation follows (seed, epoch, index), whatever reads it in whatever order
    ds = LabelledImages(ddp_set, train_tf, seed=5)
    ds.set_epoch(1)
    index = {s.key: i for i, s in enumerate(ddp_set)}
    k = keys1[0]
    assert torch.equal(ds.images.collate([ds[index[k]][0]], False)[0], img1[k])


def test_train_loader_batch_layout_errors(ddp_set, transforms):
    kw = dict(rank=0, seed=0, epoch=0, workers=0)
    _one_line_error("global batch size 9 is not divisible by the 2 ranks", train_loader, ddp_set, transforms[0],
                    global_batch_size=9, world_size=2, **kw)
    _one_line_error("22 samples, fewer than one global batch of 32", train_loader, ddp_set, transforms[0],
                    global_batch_size=32, world_size=1, **kw)


def test_undecodable_image_is_counted_by_the_collate(tmp_path, transforms):
    root = _folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "test": {"a": 2}})
    (root / "test" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    ds = load_downstream(root)
    assert [s.key for s in ds.test] == ["a/000.png", "a/001.png", "a/broken.jpg"]
    batches = list(eval_loader(ds.test, transforms[1], batch_size=2, workers=0))
    assert [b.keys for b in batches] == [["a/000.png", "a/001.png"], []]
    assert [b.skipped for b in batches] == [{}, {"image_decode_error": 1}]
    truncated = Sample(ds.test[0].source, 0, ds.test[0].size + 10, 0, "x")  # a tar member cut short
    batch = next(iter(eval_loader([truncated, ds.test[1]], transforms[1], batch_size=2, workers=0)))
    assert batch.keys == ["a/001.png"] and batch.skipped == {"image_decode_error": 1}


# -- bad input -------------------------------------------------------------------------------------------------


def test_folder_bad_inputs(tmp_path):
    ok = {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}
    _one_line_error(f"not found: {tmp_path / 'nope'}", load_downstream, tmp_path / "nope")
    flat = _folder(tmp_path / "flat", {"": {"a": 1, "b": 1}})  # class folders, but no train/ and test/
    _one_line_error(f"{flat} is neither an image folder nor a CLIP_benchmark", load_downstream, flat)

    root = _folder(tmp_path / "empty_class", ok)
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("x")
    _one_line_error(f"class folder {root / 'train' / 'c'} has no images", load_downstream, root)

    root = _folder(tmp_path / "extra_class", ok)
    _folder(root, {"test": {"zz": 1}})
    _one_line_error(f"class folder {root / 'test' / 'zz'} is not a class of {root / 'train'}", load_downstream, root)
    root = _folder(tmp_path / "extra_val_class", dict(ok, val={"a": 1, "q": 1}))
    _one_line_error(f"class folder {root / 'val' / 'q'} is not a class of", load_downstream, root)

    root = _folder(tmp_path / "no_test", {"train": {"a": 2}})
    _one_line_error(f"{root} has train/ but no test/ split", load_downstream, root)
    root = _folder(tmp_path / "no_classes", {"train": {}, "test": {"a": 1}})
    (root / "train").mkdir(parents=True)
    _one_line_error(f"{root / 'train'} has no class folders", load_downstream, root)

    root = _folder(tmp_path / "empty_test", {"train": {"a": 2, "b": 2}, "test": {"a": 0}})
    (root / "test" / "a" / "x.txt").write_text("x")
    _one_line_error(f"the test split of {root} has no samples", load_downstream, root)
    root = _folder(tmp_path / "empty_val", {"train": {"a": 2}, "val": {"a": 0}, "test": {"a": 1}})
    _one_line_error("the val split of .* has no samples", load_downstream, root)
    root = _folder(tmp_path / "singletons", {"train": {"a": 1, "b": 1}, "test": {"a": 1}})
    _one_line_error("no val/ split and its train split is too small", load_downstream, root)

    root = _folder(tmp_path / "names", ok)
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    _one_line_error(f"{tmp_path / 'three.txt'} names 3 classes but {root / 'train'} has 2 class folders",
                    load_downstream, root, classnames=str(tmp_path / "three.txt"))
    _one_line_error("classnames file not found", load_downstream, root, classnames=str(tmp_path / "none.txt"))
    (tmp_path / "bad_tmpl.txt").write_text("a photo\n")
    _one_line_error("has no {c} placeholder", load_downstream, root, templates=str(tmp_path / "bad_tmpl.txt"))
    _one_line_error("val_fraction must be between 0 and 1", load_downstream, root, val_fraction=1.0)

    root = _folder(tmp_path / "counted", ok)
    for name in ("a/x.txt", "a/.DS_Store", "b/deep/y.csv"):
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / name).write_text("x")
    (root / "test" / "stray.jpg").write_bytes(_image(1))  # an image outside any class folder
    assert load_downstream(root).skipped == {"not_an_image": 3, "outside_class_folder": 1}


def test_wds_bad_inputs(tmp_path):
    good = {"train": [_sample("k0", 0, 1) + _sample("k1", 1, 2)], "test": [_sample("t0", 1, 3)]}

    root = _wds(tmp_path / "range", dict(good, test=[_sample("t0", 1, 3) + _sample("t1", 2, 4)]), ["a", "b"])
    msg = _one_line_error("has label 2, outside", load_downstream, root)
    assert str(root / "test" / "0.tar") in msg and "'t1'" in msg and "[0, 2)" in msg
    root = _wds(tmp_path / "negative", good, ["a", "b"])
    _tar(root / "train" / "0.tar", _sample("k0", -1, 1))
    _one_line_error("sample 'k0' has label -1, outside", load_downstream, root)

    root = _wds(tmp_path / "nonint", good, ["a", "b"])
    _tar(root / "train" / "0.tar", _sample("k0", 0, 1) + _sample("k9", "dog", 2))
    msg = _one_line_error("has label 'dog' in k9.cls, not an integer", load_downstream, root)
    assert str(root / "train" / "0.tar") in msg

    root = _wds(tmp_path / "no_train", {"test": good["test"]}, ["a", "b"])
    _one_line_error(f"{root} has no train/ split", load_downstream, root)
    root = _wds(tmp_path / "no_test", {"train": good["train"]}, ["a", "b"])
    _one_line_error(f"{root} has no test/ split", load_downstream, root)

    root = _wds(tmp_path / "nshards", good, ["a", "b"])
    (root / "train" / "nshards.txt").write_text("two")
    _one_line_error(f"{root / 'train' / 'nshards.txt'} should hold a positive shard count, not 'two'",
                    load_downstream, root)
    (root / "train" / "nshards.txt").write_text("3")
    _one_line_error(f"says 3 shards but {root / 'train' / '1.tar'} is missing \\(and 1 more\\)", load_downstream, root)
    (root / "train" / "nshards.txt").unlink()
    _one_line_error(f"{root / 'train' / 'nshards.txt'} not found", load_downstream, root)

    root = _wds(tmp_path / "gz", good, ["a", "b"])
    with tarfile.open(root / "train" / "0.tar", "w:gz") as tar:
        info = tarfile.TarInfo("k0.cls")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"0\n"))
    _one_line_error(f"cannot read {root / 'train' / '0.tar'} as an uncompressed tar", load_downstream, root)

    root = _wds(tmp_path / "names", good, ["a", "b"])
    (root / "classnames.txt").unlink()
    _one_line_error(f"classnames file not found: {root / 'classnames.txt'}", load_downstream, root)
    (root / "classnames.txt").write_text("a\nb\n")
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    _one_line_error("three.txt names 3 classes but .*classnames.txt names 2", load_downstream, root,
                    classnames=str(tmp_path / "three.txt"))

    root = _wds(tmp_path / "duplicate", dict(good, val=[_sample("v0", 0, 4)]), ["a", "b"])
    _tar(root / "train" / "0.tar", _sample("k0", 0, 1) + [("k0.jpg", _image(2, "JPEG"))] + _sample("k1", 1, 3))
    ds = load_downstream(root)
    assert ds.skipped == {"duplicate_member": 1}
    assert [s.key for s in ds.train] == ["0.tar/k0", "0.tar/k1"] and ds.train[0].read() == _image(1, "JPEG")

    root = _wds(tmp_path / "all_skipped", dict(good, test=[_sample("t0", None, 3)]), ["a", "b"])
    _one_line_error("the test split of .* has no samples", load_downstream, root)
    root = _wds(tmp_path / "retrieval", good, ["a", "b"])
    (root / "dataset_type.txt").write_text("retrieval\n")
    _one_line_error("is a retrieval set", load_downstream, root)
