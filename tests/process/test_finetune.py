"""`clipkit finetune`: every method end to end on the built-in downstream split, against independent references
(zero-shot evaluation, hand-computed parameter counts and learning rates, open_clip + safetensors loading the
export, scikit-learn refitting the linear probe, the single-process run for DDP)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from clipkit.data import write_synth_dataset
from clipkit.errors import UserError
from clipkit.evaluation import build_classifier, load_zeroshot_set, predict_zeroshot
from clipkit.finetune.data import load_downstream
from clipkit.finetune.model import (
    ImageClassifier,
    add_lora,
    count_parameters,
    interpolate,
    merge_lora,
    optimizer_groups,
    set_trainable,
)
from clipkit.finetune.run import main as finetune_main
from clipkit.finetune.train import EarlyStopping, predict
from clipkit.models import create_model, create_transforms, get_tokenizer, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    ds = write_synth_dataset(tmp_path_factory.mktemp("ds"), train_samples=20, eval_samples=20, samples_per_shard=100,
                             image_size=32, seed=5, workers=1, downstream_train_samples=240,
                             downstream_test_samples=100)
    return ds.downstream_root


def _run(tmp_path, name, checkpoint, data, method, *overrides):
    out = tmp_path / name
    rc = finetune_main(["--checkpoint", str(checkpoint), "--data", str(data), "--method", method, "--out", str(out),
                        "run.progress=false", "data.workers=0", "finetune.global_batch_size=32",
                        "finetune.warmup_steps=2", "finetune.min_steps=0", "eval.batch_size=64", *overrides])
    assert rc == 0
    return out, json.loads((out / "result.json").read_text())


def _tar_images(split_dir: Path):
    """(PIL images, labels) of a CLIP_benchmark split, read with tarfile alone."""
    import io
    import tarfile

    from PIL import Image

    images, labels = [], []
    n = int((split_dir / "nshards.txt").read_text())
    for i in range(n):
        with tarfile.open(split_dir / f"{i}.tar") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".jpg"):
                    key = name[:-4]
                    images.append(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB"))
                    labels.append(int(tar.extractfile(members[key + ".cls"]).read()))
    return images, torch.tensor(labels)


def test_zeroshot_head_gives_zeroshot_predictions(trained_nano, downstream):
    checkpoint, _ = trained_nano
    loaded = load_model(checkpoint)
    tokenizer, (_, val_tf) = get_tokenizer(loaded.name), create_transforms(loaded.model)
    zs = load_zeroshot_set(downstream)
    reference = predict_zeroshot(loaded.model, tokenizer, val_tf, zs, batch_size=64, workers=0)
    data = load_downstream(downstream)
    model = ImageClassifier.from_zeroshot(loaded.model, build_classifier(loaded.model, tokenizer, data.classnames,
                                                                         data.templates))
    logits, labels, _ = predict(model, data.test, val_tf, batch_size=64, workers=0, device=torch.device("cpu"))
    assert torch.equal(labels, reference.labels)
    assert torch.equal(logits.argmax(1), reference.logits.argmax(1))
    torch.testing.assert_close(logits, reference.logits * loaded.model.logit_scale.exp().item(), rtol=1e-5, atol=1e-5)


def test_layer_decay_and_head_lr_by_hand():
    model = ImageClassifier(create_model("clipkit-nano"), 4)  # 2 blocks
    set_trainable(model)
    groups = optimizer_groups(model, lr=1.0, head_lr=7.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {"clip.visual.conv1.weight": (0.125, 0.1), "clip.visual.positional_embedding": (0.125, 0.0),
                "clip.visual.ln_pre.weight": (0.125, 0.0),
                "clip.visual.transformer.resblocks.0.mlp.c_fc.weight": (0.25, 0.1),
                "clip.visual.transformer.resblocks.0.mlp.c_fc.bias": (0.25, 0.0),
                "clip.visual.transformer.resblocks.1.attn.in_proj_weight": (0.5, 0.1),
                "clip.visual.ln_post.weight": (1.0, 0.0), "clip.visual.proj": (1.0, 0.1),
                "head.weight": (7.0, 0.1), "head.bias": (7.0, 0.0)}
    for name, want in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(want), name
    # the text tower and the temperature are frozen: in no group
    assert all(id(p) not in lr_of for n, p in named.items() if not n.startswith(("clip.visual.", "head.")))
    assert len(lr_of) == sum(1 for n, p in named.items() if n.startswith(("clip.visual.", "head.")))


def test_partial_freezing_counts_by_hand():
    model = ImageClassifier(create_model("clipkit-nano"), 4)
    set_trainable(model, trainable_blocks=1, freeze_head=True)
    w, mlp = 64, 256  # clipkit-nano's vision width, 4x MLP
    block = (2 * w) + (3 * w * w + 3 * w) + (w * w + w) + (2 * w) + (w * mlp + mlp) + (mlp * w + w)
    assert count_parameters(model)[0] == block + 2 * w + w * 32  # the last block, ln_post, proj (64 -> 32)
    with pytest.raises(UserError, match="trainable_blocks"):
        set_trainable(ImageClassifier(create_model("RN50"), 2), trainable_blocks=1)


def test_early_stopping_counts_patience_in_steps():
    stop = EarlyStopping(patience=20, earliest=0)
    seen = []
    for step, score in [(10, 0.5), (20, 0.6), (30, 0.6), (40, 0.55), (50, 0.9)]:
        seen.append((stop.update(score, step), stop.should_stop(step)))
        if stop.should_stop(step):
            break
    assert seen == [(True, False), (True, False), (False, False), (False, True)]
    late = EarlyStopping(patience=20, earliest=60)  # the same scores, but no stop before step 60
    assert [late.update(sc, st) or late.should_stop(st) for st, sc in [(10, 0.5), (20, 0.6), (40, 0.55), (60, 0.5)]] \
        == [True, True, False, True]
    assert EarlyStopping(0).update(0.1, 1) and not EarlyStopping(0).should_stop(1000)


def test_wise_interpolation_is_exact_at_the_ends():
    torch.manual_seed(0)
    a = {"w": torch.randn(5, 3), "n": torch.tensor(3)}
    b = {"w": torch.randn(5, 3), "n": torch.tensor(3)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    torch.testing.assert_close(interpolate(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    with pytest.raises(UserError, match="one architecture"):
        interpolate(a, {"w": torch.randn(5, 4), "n": torch.tensor(3)}, 0.5)


def test_merged_lora_equals_unmerged_and_counts_by_hand():
    torch.manual_seed(0)
    model = ImageClassifier(create_model("clipkit-nano"), 4)
    set_trainable(model)
    add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["attn", "c_fc", "c_proj"])
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    # per block: attention in_proj (64 -> 192) and out_proj (64 -> 64), c_fc (64 -> 256), c_proj (256 -> 64)
    assert sum(p.numel() for p in lora.values()) == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "head" not in n)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters do something
        for n, p in lora.items():
            p.normal_(0, 0.05)
    images = torch.randn(3, 3, 32, 32)
    model.eval()
    unmerged = model(images)
    merged = merge_lora(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    plain = create_model("clipkit-nano")
    plain.load_state_dict(merged.clip.state_dict())  # plain open_clip keys again
    torch.testing.assert_close(merged(images), unmerged, rtol=1e-5, atol=1e-5)


def test_full_finetune_end_to_end_and_export_loads_in_open_clip(trained_nano, downstream, tmp_path):
    checkpoint, _ = trained_nano
    out, result = _run(tmp_path, "full", checkpoint, downstream, "full", "finetune.epochs=3", "finetune.lr=1e-3",
                       "finetune.patience_steps=0", "finetune.val_every=6")
    assert result["method"] == "full" and result["epochs_run"] == 3
    for split in ("val", "test"):
        assert set(result[split]) >= {"acc1", "acc5", "mean_per_class_recall", "num_samples"}
        assert set(result["zeroshot"][split]) >= {"acc1", "acc5", "mean_per_class_recall"}
    assert result["splits"]["val_from_train"] and result["splits"]["test"] == 100
    vals = [h["val"]["acc1"] for h in result["history"]]
    assert [h["step"] for h in result["history"]] == [6, 12, 18]  # 216 images: 6 steps of 32 an epoch
    assert result["best_step"] == result["history"][vals.index(max(vals))]["step"]
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file() and (out / "tensorboard").is_dir()
    # the trainable count by hand: the whole image tower and the head
    visual = sum(p.numel() for p in load_model(checkpoint).model.visual.parameters())
    classes = result["splits"]["classes"]
    assert result["trainable_params"] == visual + classes * (32 + 1)
    # the export: open_clip builds the model, safetensors gives the head; they classify the test split as we do
    export = Path(result["export"]["weights"]).parent
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(export))
    model.eval()
    head = load_file(str(export / "head.safetensors"))
    with safe_open(str(export / "head.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["classnames"]) == load_downstream(downstream).classnames
    images, labels = _tar_images(Path(downstream) / "test")
    with torch.no_grad():
        feats = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
    pred = (feats @ head["weight"].T + head["bias"]).argmax(1)
    assert (pred == labels).float().mean().item() == pytest.approx(result["test"]["acc1"], abs=1e-9)
    # the best checkpoint is a verified clipkit checkpoint: zero-shot and the rest load it
    best = load_model(result["best_checkpoint"])
    for k, v in best.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_partial_finetune_leaves_frozen_parameters_bit_identical(trained_nano, downstream, tmp_path):
    checkpoint, _ = trained_nano
    _, result = _run(tmp_path, "partial", checkpoint, downstream, "full", "finetune.epochs=2", "finetune.lr=1e-3",
                     "finetune.trainable_blocks=1", "finetune.freeze_head=true")
    before = load_model(checkpoint).model.state_dict()
    after = load_model(result["best_checkpoint"]).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post", "visual.proj"))
                           for k in changed)
    # the frozen head is the zero-shot classifier, bit for bit
    loaded = load_model(checkpoint)
    data = load_downstream(downstream)
    zs = ImageClassifier.from_zeroshot(loaded.model, build_classifier(loaded.model, get_tokenizer(loaded.name),
                                                                      data.classnames, data.templates))
    head = load_file(str(Path(result["best_checkpoint"]) / "head.safetensors"))
    assert torch.equal(head["weight"], zs.head.weight) and torch.equal(head["bias"], zs.head.bias)


def test_early_stopping_stops_at_the_patience(trained_nano, downstream, tmp_path):
    checkpoint, _ = trained_nano
    # an LR far too small to change any prediction: val acc1 never improves after the first validation
    _, result = _run(tmp_path, "stop", checkpoint, downstream, "full", "finetune.epochs=10", "finetune.lr=1e-12",
                     "finetune.head_lr=1e-12", "finetune.val_every=6", "finetune.patience_steps=12",
                     "finetune.augment=false")
    assert result["epochs_run"] == 3 and result["stopped_early"] and result["best_epoch"] == 0
    assert result["best_step"] == 6 and result["steps"] == 18


def test_linear_probe_equals_scikit_learn_refit(trained_nano, downstream, tmp_path):
    from sklearn.linear_model import LogisticRegression

    checkpoint, _ = trained_nano
    out, result = _run(tmp_path, "lp", checkpoint, downstream, "linear_probe", "finetune.linear_probe.c_steps=5")
    feats = {}
    for split in ("train", "val", "test"):
        t = load_file(str(out / "features" / f"{split}.safetensors"))
        feats[split] = (t["features"].double().numpy(), t["labels"].numpy())
    x = np.concatenate([feats["train"][0], feats["val"][0]])
    y = np.concatenate([feats["train"][1], feats["val"][1]])
    ref = LogisticRegression(C=result["best_C"], max_iter=10000, tol=1e-10).fit(x, y)
    correct = int((ref.predict(feats["test"][0]) == feats["test"][1]).sum())
    n = result["test"]["num_samples"]
    assert round(result["test"]["acc1"] * n) == correct  # acc1 is a float32 mean: compare the count
    assert result["trainable_params"] == result["splits"]["classes"] * (32 + 1)
    # the exported head is the probe: open_clip features through it give the same accuracy
    head = load_file(str(out / "export" / "head.safetensors"))
    logits = torch.from_numpy(feats["test"][0]).float() @ head["weight"].T + head["bias"]
    assert int((logits.argmax(1).numpy() == feats["test"][1]).sum()) == correct


def test_wise_ends_reproduce_zeroshot_and_finetuned(trained_nano, downstream, tmp_path):
    checkpoint, _ = trained_nano
    _, result = _run(tmp_path, "wise", checkpoint, downstream, "wise", "finetune.epochs=2", "finetune.lr=1e-3",
                     "finetune.wise.alphas=0,0.5,1")
    curve = {c["alpha"]: c for c in result["alphas"]}
    assert curve[0.0]["val"] == result["zeroshot"]["val"] and curve[0.0]["test"] == result["zeroshot"]["test"]
    assert curve[1.0]["val"] == next(h["val"] for h in result["history"] if h["step"] == result["best_step"])
    best = max(result["alphas"], key=lambda c: c["val"]["acc1"])
    assert result["best_alpha"] == best["alpha"] and result["test"] == best["test"]


def test_wise_from_an_earlier_finetune_and_another_architecture(trained_nano, downstream, tmp_path):
    from clipkit.export import export_open_clip
    from clipkit.finetune.run import save_head

    checkpoint, _ = trained_nano
    _, full = _run(tmp_path, "full", checkpoint, downstream, "full", "finetune.epochs=1", "finetune.lr=1e-3")
    _, wise = _run(tmp_path, "wise", checkpoint, downstream, "wise", f"finetune.wise.finetuned={full['best_checkpoint']}",
                   "finetune.wise.alphas=0,1")
    assert {c["alpha"]: c for c in wise["alphas"]}[1.0]["test"] == full["test"]
    assert wise["trainable_params"] == full["trainable_params"]  # read from the earlier run's result
    # the side-by-side report reads both runs
    from clipkit.finetune.report import main as report_main

    assert report_main([str(tmp_path / "full"), str(tmp_path / "wise"), "--out", str(tmp_path / "r.json")]) == 0
    table = {row["method"]: row for row in json.loads((tmp_path / "r.json").read_text())}
    assert table["zero-shot"]["test_acc1"] == full["zeroshot"]["test"]["acc1"]
    assert table["full"]["test_acc1"] == full["test"]["acc1"] and table["wise"]["val_acc1"] == wise["val"]["acc1"]
    # a fine-tuned model of another architecture: one clear error
    other = ImageClassifier(create_model("clipkit-tiny"), full["splits"]["classes"])
    export_open_clip(other.clip, "clipkit-tiny", open_clip.get_model_config("clipkit-tiny"), tmp_path / "other")
    save_head(other, tmp_path / "other" / "head.safetensors", load_downstream(downstream).classnames, "clipkit-tiny")
    with pytest.raises(UserError, match="another architecture"):
        _run(tmp_path, "wise2", checkpoint, downstream, "wise", f"finetune.wise.finetuned={tmp_path / 'other'}")


def test_lora_end_to_end_exports_merged_weights(trained_nano, downstream, tmp_path):
    checkpoint, _ = trained_nano
    _, result = _run(tmp_path, "lora", checkpoint, downstream, "lora", "finetune.epochs=2", "finetune.lr=1e-2",
                     "finetune.lora.rank=4")
    classes = result["splits"]["classes"]
    assert result["trainable_params"] == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)) + classes * 33
    assert result["trainable_fraction"] == pytest.approx(result["trainable_params"] / result["total_params"])
    export = Path(result["export"]["weights"]).parent
    state = load_file(str(export / "open_clip_model.safetensors"))
    assert not any("lora" in k for k in state)
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(export))  # plain open_clip keys
    before = load_model(checkpoint).model.state_dict()
    assert not torch.equal(state["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                           before["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    assert torch.equal(state["visual.conv1.weight"], before["visual.conv1.weight"])


def test_cli_errors_are_one_line(trained_nano, downstream, tmp_path, capsys):
    from clipkit.cli import main

    checkpoint, _ = trained_nano
    assert main(["finetune", "--data", str(downstream), "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "y"), "run.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipkit: error:") and "nope" in err and "\n" not in err
    assert main(["finetune", "--method", "bogus", "--checkpoint", str(checkpoint), "--data", str(downstream),
                 "--out", str(tmp_path / "z")]) == 2
    assert "finetune.method" in capsys.readouterr().err


def test_ddp_finetune_equals_single_process(trained_nano, downstream, tmp_path):
    checkpoint, _ = trained_nano
    args = ["--checkpoint", str(checkpoint), "--data", str(downstream), "--method", "full", "run.progress=false",
            "data.workers=0", "finetune.global_batch_size=32", "finetune.epochs=2", "finetune.lr=1e-3",
            "finetune.warmup_steps=2", "finetune.min_steps=0", "finetune.val_every=6", "eval.batch_size=64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    for name, launcher in [("one", [sys.executable, "-m", "clipkit"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "clipkit"])]:
        proc = subprocess.run([*launcher, "finetune", *args, "--out", str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("one", "two"))
    assert one["steps"] == two["steps"] and one["best_epoch"] == two["best_epoch"]
    for a, b in zip(one["history"], two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4)
        assert a["val"]["acc1"] == b["val"]["acc1"]
    assert one["test"]["acc1"] == two["test"]["acc1"]
    wa = load_file(str(Path(one["best_checkpoint"]) / "model.safetensors"))
    wb = load_file(str(Path(two["best_checkpoint"]) / "model.safetensors"))
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-4, worst


def test_text_lora_head_is_the_zeroshot_classifier_through_the_adapted_text_tower():
    from clipkit.finetune.run import _plain

    torch.manual_seed(0)
    clip = create_model("clipkit-nano")
    tokenizer = get_tokenizer("clipkit-nano")
    classnames, templates = ["red thing", "blue thing", "green thing"], ["a {c}.", "the {c}"]
    zs = build_classifier(clip, tokenizer, classnames, templates)
    model = ImageClassifier.from_zeroshot(clip, zs)
    set_trainable(model)
    add_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=["attn", "c_fc", "c_proj"], text=True)
    tokens = tokenizer([t.replace("{c}", c) for c in classnames for t in templates]).reshape(3, 2, -1)
    model.use_text_head(tokens)
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():  # adapters at their initial zero: the head is zero-shot's classifier, as initialised
        torch.testing.assert_close(model.head_weight(), model.head.weight, rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
        adapted = model(images)
        # text-tower adapters train and change the head; the head's own weight does not train
        assert any("transformer" in n and "lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        assert not model.head.weight.requires_grad
        assert not torch.allclose(model.head_weight(), model.head.weight, atol=1e-4)
        plain = _plain(model)  # merged towers, the computed head written into head.weight
        assert plain.prompts is None and not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(images), adapted, rtol=1e-4, atol=1e-4)
