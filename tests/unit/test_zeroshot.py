"""Zero-shot classification: metrics by hand, the classifier by its definition, the command on every data
layout against CLIP_benchmark's own command run on the open_clip export of the same checkpoint, and image
folders against the same images as shards and against torchvision's ImageFolder."""
import csv
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipkit import cli
from clipkit.evaluation import (PREDICTION_COLUMNS, ZeroShotDataError, build_classifier, classification_metrics,
                                default_templates, find_classes, folder_samples, load_zeroshot_set)
from clipkit.models import create_model, get_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(trained_nano):
    return trained_nano


def _clip_benchmark(monkeypatch, args: list[str]) -> dict:
    """CLIP_benchmark's command line, run in this process (its start-up costs seconds per run here)."""
    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification

    def accuracy(output, target, topk=(1,)):
        # clip-benchmark 1.6.2's accuracy() turns a 1-element array into a float, which numpy >= 2.4
        # refuses (LAION-AI/CLIP_benchmark#147); the same counts, read with .item().
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy)
    out = Path(args[args.index("--output") + 1])
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", "--pretrained", "", "--no_amp", "--num_workers", "0",
                                      "--batch_size", "64", *args])
    cb_cli.main()
    return json.loads(out.read_text())


def _clipkit(*args) -> int:
    return cli.main([str(a) for a in args])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_against_hand_counts():
    # 3 classes, 6 samples
    logits = torch.tensor([
        [0.9, 0.05, 0.05],  # label 0, right
        [0.2, 0.7, 0.1],    # label 0, wrong (second choice)
        [0.1, 0.8, 0.1],    # label 1, right
        [0.1, 0.2, 0.7],    # label 1, wrong
        [0.1, 0.2, 0.7],    # label 2, right
        [0.5, 0.4, 0.1],    # label 2, wrong (last choice)
    ])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    m = classification_metrics(logits, labels, 3)
    assert m["acc1"] == pytest.approx(3 / 6)
    assert m["acc5"] == pytest.approx(1.0)  # top-k is capped at the class count
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    unbalanced = classification_metrics(logits[:5], labels[:5], 3)
    assert unbalanced["acc1"] == pytest.approx(3 / 5)
    assert unbalanced["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_classifier_is_renormalised_mean_of_template_embeddings():
    torch.manual_seed(0)
    model = create_model("clipkit-nano").eval()
    tok = get_tokenizer("clipkit-nano")
    classes, templates = ["red circle", "blue star"], ["a photo of a {c}.", "a {c}.", "an image of a {c}"]
    for text_batch in (512, 2):  # prompts of several classes in one batch, and batches cutting across classes
        W = build_classifier(model, tok, classes, templates, text_batch=text_batch)
        assert W.shape == (32, 2)
        for j, c in enumerate(classes):
            with torch.no_grad():
                rows = [F.normalize(model.encode_text(tok([t.format(c=c)])), dim=-1)[0] for t in templates]
            expected = torch.stack(rows).mean(0)
            expected = expected / expected.norm()
            torch.testing.assert_close(W[:, j], expected, atol=1e-6, rtol=1e-5)


def test_default_templates_are_the_openai_imagenet_set():
    """open_clip ships them as callables; they come out as the "{c}" strings CLIP_benchmark packages."""
    import clip_benchmark

    packaged = Path(clip_benchmark.__file__).parent / "datasets" / "en_zeroshot_classification_templates.json"
    templates = default_templates()
    assert len(templates) == 80 and all(t.count("{c}") == 1 for t in templates)
    assert templates == json.loads(packaged.read_text())["imagenet1k"]


def test_load_set_errors(tmp_path, synth_small):
    zs = load_zeroshot_set(synth_small.eval_root)
    assert len(zs.classnames) == 30 and zs.shards.endswith("0.tar") and len(zs.templates) == 5
    with pytest.raises(ZeroShotDataError, match="nshards.txt"):
        load_zeroshot_set(tmp_path)  # an empty folder: neither layout
    with pytest.raises(ZeroShotDataError, match="not found"):
        load_zeroshot_set(str(tmp_path / "x.tar"))
    shard = synth_small.eval_root / "test" / "0.tar"
    with pytest.raises(ZeroShotDataError, match="--classnames"):
        load_zeroshot_set(str(shard))
    assert load_zeroshot_set(str(shard), synth_small.eval_root / "classnames.txt").templates == default_templates()
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a thing\n")
    with pytest.raises(ZeroShotDataError, match="placeholder"):
        load_zeroshot_set(synth_small.eval_root, templates=bad)
    with pytest.raises(ZeroShotDataError, match="retrieval"):
        load_zeroshot_set(synth_small.retrieval_root)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(ZeroShotDataError, match="no images"):
        load_zeroshot_set(tmp_path)


def _open_clip_predictions(export: Path, shard: Path, classifier: torch.Tensor) -> dict[str, int]:
    """Each image's class by open_clip alone (the export, its preprocessing, webdataset's reader)."""
    import open_clip
    import webdataset as wds

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    keys, images = [], []
    for key, image in wds.WebDataset(str(shard), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg"):
        keys.append(key)
        images.append(preprocess(image))
    with torch.no_grad():
        feats = F.normalize(model.encode_image(torch.stack(images)), dim=-1)
    return dict(zip(keys, (feats @ classifier).argmax(dim=1).tolist()))


def test_command_matches_clip_benchmark(trained, synth_small, tmp_path, monkeypatch):
    """Shard spec + class names with the default templates (OpenAI's 80), and the wds root with its own:
    the metrics of CLIP_benchmark's command on the open_clip export within one image, its classifier, and
    per image the class open_clip's embeddings give against that classifier."""
    from clipkit.models import load_model

    checkpoint, export = trained
    root = synth_small.eval_root
    import clip_benchmark

    packaged = Path(clip_benchmark.__file__).parent / "datasets" / "en_zeroshot_classification_templates.json"
    cases = [(["--data", root / "test" / "0.tar", "--classnames", root / "classnames.txt"],
              ["--custom_template_file", str(packaged)], default_templates()),  # no entry for this set: imagenet1k
             (["--data", root], [], load_zeroshot_set(root).templates)]
    loaded = load_model(checkpoint)
    for i, (ours_args, ref_args, templates) in enumerate(cases):
        ours_json, preds, clf = tmp_path / f"ours{i}.json", tmp_path / f"preds{i}.csv", tmp_path / f"clf{i}.pt"
        assert _clipkit("zeroshot", "--checkpoint", checkpoint, *ours_args, "--out", ours_json,
                        "--dump-predictions", preds, "--batch-size", 64, "--workers", 0) == 0
        ref = _clip_benchmark(monkeypatch, ["--model", f"local-dir:{export}", "--dataset", "wds/eval", "--dataset_root",
                                            str(root), "--task", "zeroshot_classification", "--save_clf", str(clf),
                                            "--output", str(tmp_path / f"ref{i}.json"), *ref_args])
        ours = json.loads(ours_json.read_text())
        assert ours["task"] == ref["task"] == "zeroshot_classification"
        for name in ("acc1", "acc5", "mean_per_class_recall"):
            assert abs(ours["metrics"][name] - ref["metrics"][name]) <= 1 / 120 + 1e-6, (i, name, ours, ref)
        ref_classifier = torch.load(clf, weights_only=True)  # a plain tensor
        names = (root / "classnames.txt").read_text().splitlines()
        ours_classifier = build_classifier(loaded.model.eval(), get_tokenizer(loaded.name), names, templates)
        torch.testing.assert_close(ours_classifier, ref_classifier, atol=1e-5, rtol=0)
        # per image, and the per-image file agrees with the metrics computed with it
        rows = _rows(preds)
        assert list(rows[0]) == PREDICTION_COLUMNS and len(rows) == 120
        reference = _open_clip_predictions(export, root / "test" / "0.tar", ref_classifier)
        assert sum(int(r["predicted_index"]) == reference[r["key"]] for r in rows) >= 119
        assert len({r["predicted_index"] for r in rows}) > 3  # not a degenerate model predicting one class
        right = sum(r["true_index"] == r["predicted_index"] for r in rows)
        in_top5 = sum(r["true_index"] in r["top5_indices"].split("|") for r in rows)
        assert (right / 120, in_top5 / 120) == pytest.approx((ours["metrics"]["acc1"], ours["metrics"]["acc5"]))


def _copy_into_folders(shard: Path, out: Path, folder_of: dict[int, str]) -> None:
    """The shard's images as OUT/<folder of its label>/<key>.jpg; every class gets its folder."""
    for name in folder_of.values():
        (out / name).mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in members.items():
        if name.endswith(".jpg"):
            key = name[:-4]
            (out / folder_of[int(members[key + ".cls"])] / name).write_bytes(data)


def test_image_folder_matches_the_same_images_as_shards(trained, synth_small, tmp_path):
    """Folders named after the classes (sorted order is not label order), and folders named 00..29 with
    --classnames: the same per-image predictions as the wds set, the class order of torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    checkpoint, _ = trained
    root = synth_small.eval_root
    names = (root / "classnames.txt").read_text().splitlines()
    templates = root / "zeroshot_classification_templates.txt"
    shard = root / "test" / "0.tar"
    _copy_into_folders(shard, tmp_path / "named", dict(enumerate(names)))
    _copy_into_folders(shard, tmp_path / "numbered", {i: f"{i:02d}" for i in range(len(names))})
    (tmp_path / "named" / "red circle" / "nested").mkdir()  # ImageFolder walks sub-folders too
    moved = next(p for p in sorted((tmp_path / "named").rglob("*.jpg")) if p.parent.name != "red circle")
    shutil.move(moved, tmp_path / "named" / "red circle" / "nested")
    (tmp_path / "named" / "red circle" / "README.md").write_text("not an image")  # ignored, as ImageFolder does

    reference = ImageFolder(str(tmp_path / "named"), allow_empty=True)
    assert find_classes(tmp_path / "named") == reference.classes == sorted(names)
    assert [(str(tmp_path / "named" / p), y) for p, y in folder_samples(tmp_path / "named", reference.classes)] \
        == reference.samples

    runs = {"wds": ["--data", root], "named": ["--data", tmp_path / "named"],
            "numbered": ["--data", tmp_path / "numbered", "--classnames", root / "classnames.txt"]}
    preds = {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.csv"
        assert _clipkit("zeroshot", "--checkpoint", checkpoint, *args, "--templates", templates, "--out",
                        tmp_path / f"{name}.json", "--dump-predictions", out, "--workers", 0) == 0
        preds[name] = {Path(r["key"]).stem: r for r in _rows(out)}
    assert len(preds["wds"]) == len(preds["named"]) == len(preds["numbered"]) == 120
    for key, row in preds["wds"].items():
        assert preds["numbered"][key]["predicted_label"] == row["predicted_label"]
        assert preds["numbered"][key]["true_label"] == row["true_label"]
        if key != moved.stem:  # the moved image is now labelled red circle
            assert preds["named"][key]["predicted_label"] == row["predicted_label"]
            assert preds["named"][key]["true_label"] == row["true_label"]
            assert preds["named"][key]["key"] == f"{row['true_label']}/{key}.jpg"
    wds, numbered = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("wds", "numbered"))
    assert numbered == wds


def test_bad_inputs_give_one_line(trained, synth_small, tmp_path, capsys):
    checkpoint, _ = trained
    with tarfile.open(synth_small.eval_root / "test" / "0.tar") as tar:
        jpeg = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".jpg"))).read()
    for name in ("a", "b"):  # two classes, one image each
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(jpeg)
    cases = [(["--data", tmp_path / "missing"], "not found"),
             (["--data", tmp_path, "--classnames", synth_small.eval_root / "classnames.txt"], "30 classes but"),
             (["--data", synth_small.eval_root, "--templates", tmp_path / "none.txt"], "templates file not found")]
    for args, message in cases:
        assert _clipkit("zeroshot", "--checkpoint", checkpoint, *args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err


def test_unreadable_image_in_a_folder_is_skipped_and_logged(trained, synth_small, tmp_path, caplog):
    from clipkit.evaluation import evaluate_zeroshot
    from clipkit.models import create_transforms, load_model

    _copy_into_folders(synth_small.eval_root / "test" / "0.tar", tmp_path / "d",
                       dict(enumerate(load_zeroshot_set(synth_small.eval_root).classnames)))
    next((tmp_path / "d").rglob("*.jpg")).write_bytes(b"not a jpeg")
    loaded = load_model(trained[0])
    zs = load_zeroshot_set(tmp_path / "d", templates=synth_small.eval_root / "zeroshot_classification_templates.txt")
    metrics = evaluate_zeroshot(loaded.model, get_tokenizer(loaded.name), create_transforms(loaded.model)[1], zs,
                                batch_size=50, workers=0)
    assert metrics["num_samples"] == 119
    assert "image_decode_error=1" in caplog.text
