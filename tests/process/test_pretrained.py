"""Pretrained models from elsewhere: transformers CLIPModel directories, open_clip hub directories, OpenCLIP
trainer checkpoints and bare state dicts, each checked against the library that wrote it (transformers,
open_clip), all built here with tiny random shapes (nothing is downloaded)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clipkit.checkpoint import CheckpointError
from clipkit.models import load_model

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (patch, image, activation, vision width, vision layers, text width, text layers, projection, context,
#  LayerNorm eps, text eos id): patch 14/16/32, both activations, several widths, depths and contexts
SHAPES = [
    (14, 28, "quick_gelu", 32, 2, 32, 2, 16, 77, 1e-5, 49407),
    (16, 32, "gelu", 48, 1, 64, 3, 24, 32, 1e-6, 49407),
    (32, 64, "quick_gelu", 64, 2, 48, 1, 32, 20, 1e-5, 2),  # eos id 2: transformers pools at argmax(ids)
    (16, 48, "gelu", 32, 3, 32, 2, 8, 40, 1e-5, 49407),
]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "clipkit", *map(str, args)], capture_output=True, text=True)


class Payload:
    """Unpickling this runs a shell command that leaves a marker file: what a malicious .bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """The CLIP BPE tokenizer files, as a transformers CLIP directory holds them (pad = end-of-text)."""
    from clipkit.export.hf_format import write_bpe_files

    out = tmp_path_factory.mktemp("tokenizer")
    vocab, merges = write_bpe_files(out)
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), pad_token="<|endoftext|>", model_max_length=77)
    assert len(tokenizer) == 49408
    tokenizer.save_pretrained(out)
    return out


def _randomize(model: torch.nn.Module, logit_scale: float) -> None:
    """Weights far from any initialisation (LayerNorms included), so a misplaced tensor shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(logit_scale)
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def hf_directory(path: Path, tokenizer_files: Path, shape, *, weights: str = "safetensors") -> CLIPModel:
    patch, image, act, vw, vl, tw, tl, proj, ctx, eps, eos = shape
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=tw, intermediate_size=3 * tw, num_hidden_layers=tl,
                         num_attention_heads=4, max_position_embeddings=ctx, hidden_act=act, layer_norm_eps=eps,
                         bos_token_id=49406, eos_token_id=eos, pad_token_id=49407),
        vision_config=dict(image_size=image, patch_size=patch, hidden_size=vw, intermediate_size=2 * vw + 8,
                           num_hidden_layers=vl, num_attention_heads=2, hidden_act=act, layer_norm_eps=eps),
        projection_dim=proj)
    hf = CLIPModel(config).eval()
    _randomize(hf, logit_scale=2.9)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    if weights == "bin":  # the older layout: a pickled state dict (transformers 5 writes only safetensors)
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    for f in tokenizer_files.iterdir():
        shutil.copy(f, path / f.name)
    CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image},
                       image_mean=MEAN, image_std=STD).save_pretrained(path)
    return hf


def _images(side: int) -> list:
    rng = np.random.default_rng(0)
    # odd and even margins around the crop, upscaling and downscaling, a square
    sizes = [(70, 90), (side, side), (101, 77), (2 * side + 1, side + 3)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


TEXTS = ["a photo of a cat", "wow!! a dog, on the grass", "x " * 100]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"p{s[0]}-{s[2]}-w{s[3]}-ctx{s[8]}" for s in SHAPES])
def test_transformers_clip_directory_gives_transformers_features_tokens_and_pixels(tmp_path, tokenizer_files, shape):
    hf = hf_directory(tmp_path / "hf", tokenizer_files, shape)
    loaded = load_model(tmp_path / "hf")
    assert loaded.format == "transformers" and loaded.context_length == shape[8]
    assert loaded.model.visual.preprocess_cfg["mean"] == tuple(MEAN)

    processor = CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    images = _images(shape[1])
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([loaded.eval_transform(im) for im in images])
    # the processor resizes to uint8 and so does PIL under torchvision: at most one grey level apart
    grey_level = torch.tensor([1 / 255 / s for s in STD]).view(1, 3, 1, 1)
    assert ours.shape == pixels.shape and bool(((ours - pixels).abs() <= grey_level + 1e-6).all())

    tokens = CLIPTokenizer.from_pretrained(tmp_path / "hf")(TEXTS, padding="max_length", truncation=True,
                                                            max_length=shape[8], return_tensors="pt").input_ids
    assert torch.equal(loaded.tokenizer(TEXTS), tokens)
    # the same BPE as open_clip's own tokenizer up to the end-of-text token; padded with it after
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=shape[8])(TEXTS)
    for ours_row, ref_row in zip(tokens, reference):
        end = int((ref_row == 49407).nonzero()[0]) + 1
        assert torch.equal(ours_row[:end], ref_row[:end]) and bool((ours_row[end:] == 49407).all())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(pixels), _features(hf.get_image_features(pixel_values=pixels)),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(loaded.model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)),
                                   atol=1e-4, rtol=0)
    assert loaded.model.logit_scale.item() == pytest.approx(2.9)


def test_transformers_directory_round_trips_through_the_hf_export_bit_for_bit(tmp_path, tokenizer_files):
    from clipkit.export import export_hf

    hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[0])
    loaded = load_model(tmp_path / "hf")
    export_hf(loaded.model, loaded.model_name, loaded.model_cfg, tmp_path / "out")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["image_mean"] == MEAN


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path, tokenizer_files):
    hf = hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[1], weights="bin")
    assert (tmp_path / "hf" / "pytorch_model.bin").is_file() and not (tmp_path / "hf" / "model.safetensors").exists()
    loaded = load_model(tmp_path / "hf")
    tokens = loaded.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)),
                                   atol=1e-4, rtol=0)


def test_first_training_step_loss_from_a_transformers_directory_equals_transformers_loss(tmp_path, tokenizer_files):
    from clipkit.config import load_config
    from clipkit.losses import create_loss
    from clipkit.training.trainer import build_model, load_pretrained

    hf = hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[0])
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'hf'}", f"run.dir={tmp_path / 'run'}"])
    pretrained = load_pretrained(cfg)
    model = build_model(cfg, torch.device("cpu"), pretrained).train()
    images = torch.stack([pretrained.eval_transform(im) for im in _images(28) * 2])
    captions = [f"a picture number {i} of something" for i in range(len(images))]
    tokens = pretrained.tokenizer(captions)
    out = model(images, tokens)
    loss = create_loss(cfg.train.loss)(out["image_features"], out["text_features"], out["logit_scale"])
    with torch.no_grad():
        expected = hf(input_ids=tokens, pixel_values=images, return_loss=True).loss
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_training_from_a_transformers_directory_with_a_locked_image_tower(tmp_path, tokenizer_files, synth_small):
    from clipkit.config import ConfigError, load_config
    from clipkit.run import run

    hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[1])
    source = load_model(tmp_path / "hf")
    overrides = [f"model.pretrained={tmp_path / 'hf'}", "model.lock_image=true", f"run.dir={tmp_path / 'run'}",
                 f"data.train={synth_small.train_spec}", "train.global_batch_size=8", "train.steps=3",
                 "train.warmup_steps=1", "train.lr=1e-3", "run.progress=false", "data.workers=0",
                 "data.shuffle_buffer=20", "eval.zeroshot_at_end=false", "eval.retrieval_at_end=false",
                 "export.at_end=false", "run.report=false"]
    summary = run(load_config(None, overrides))
    assert summary["pretrained"]["format"] == "transformers" and summary["pretrained"]["path"] == str(tmp_path / "hf")
    assert "pretrained: " + str(tmp_path / "hf") in (tmp_path / "run" / "config.yaml").read_text()
    trained = load_model(summary["checkpoint"])
    before, after = source.model.state_dict(), trained.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))
    # the run's checkpoints keep the source's preprocessing
    assert trained.model.visual.preprocess_cfg["mean"] == tuple(MEAN)
    # and the run resumes as any run does, the tower still locked
    resumed = run(load_config(None, [o for o in overrides if o != "train.steps=3"] + ["train.steps=5",
                                                                                      "train.resume=latest"]))
    assert resumed["start_step"] == 3 and resumed["steps"] == 5
    after = load_model(resumed["checkpoint"]).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))

    with pytest.raises(ConfigError, match="model.name.*clipkit-nano is not the architecture"):
        run(load_config(None, overrides + ["model.name=clipkit-nano", f"run.dir={tmp_path / 'other'}"]))
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, [f"model.pretrained={tmp_path / 'nowhere'}"])


def test_finetune_from_a_transformers_directory_keeps_its_preprocessing(tmp_path, tokenizer_files, synth_small):
    from clipkit.finetune.run import main as finetune_main

    hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[1])
    out = tmp_path / "ft"
    assert finetune_main(["--checkpoint", str(tmp_path / "hf"), "--data", str(synth_small.downstream_root),
                          "--method", "full", "--out", str(out), "run.progress=false", "data.workers=0",
                          "finetune.global_batch_size=16", "finetune.epochs=1", "finetune.warmup_steps=1",
                          "eval.batch_size=32"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "full" and "acc1" in result["zeroshot"]["test"]
    best = load_model(result["best_checkpoint"])
    assert best.format == "clipkit" and best.model.visual.preprocess_cfg["mean"] == tuple(MEAN)
    exported = json.loads((Path(result["export"]["weights"]).parent / "open_clip_config.json").read_text())
    assert exported["preprocess_cfg"]["std"] == STD


@pytest.mark.parametrize("method", ["linear_probe", "lora", "wise", "flyp"])
def test_every_other_finetune_method_runs_from_a_transformers_directory(tmp_path, tokenizer_files, synth_small,
                                                                         method):
    from clipkit.finetune.run import main as finetune_main

    # three image blocks: LoRA's default targets cover most of the tower (one tiny block would leave the patch
    # embedding the larger share, under finetune.lora.min_coverage)
    hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[3])
    out = tmp_path / "ft"
    # a few steps: the run, its evaluation and its result are what is checked, not the accuracy reached
    assert finetune_main(["--checkpoint", str(tmp_path / "hf"), "--data", str(synth_small.downstream_root),
                          "--method", method, "--out", str(out), "run.progress=false", "data.workers=0",
                          "finetune.global_batch_size=16", "finetune.epochs=1", "finetune.min_steps=2",
                          "finetune.warmup_steps=1", "finetune.lr=1e-3", "finetune.val_every=2",
                          "finetune.linear_probe.c_steps=3", "eval.batch_size=32"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == method
    test_acc = result["test"]["acc1"]
    assert 0.0 <= test_acc <= 1.0 and "acc1" in result["zeroshot"]["test"]
    if method == "lora":  # adapters on the imported tower's layers, trained for real steps
        assert 0 < result["trainable_params"] < result["total_params"] and result["steps"] >= 2


def test_zeroshot_of_a_transformers_directory_matches_clip_benchmark_on_its_open_clip_weights(
        tmp_path, tokenizer_files, synth_small, monkeypatch):
    """clipkit zeroshot on the transformers directory, CLIP_benchmark on the same weights as open_clip loads
    them (clipkit's open_clip export of the import): the same classifier and metrics."""
    import clip_benchmark.cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification

    from clipkit import cli
    from clipkit.evaluation import build_classifier, load_zeroshot_set
    from clipkit.export import export_open_clip

    hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[1])  # 32px, as the set's images
    loaded = load_model(tmp_path / "hf")
    export_open_clip(loaded.model, loaded.model_name, loaded.model_cfg, tmp_path / "oc")
    root = synth_small.eval_root
    assert cli.main(["zeroshot", "--checkpoint", str(tmp_path / "hf"), "--data", str(root), "--out",
                     str(tmp_path / "ours.json"), "--batch-size", "64", "--workers", "0"]) == 0

    def accuracy(output, target, topk=(1,)):  # clip-benchmark 1.6.2's, read with .item() (CLIP_benchmark#147)
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy)
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", "--pretrained", "", "--no_amp", "--num_workers", "0",
                                      "--batch_size", "64", "--model", f"local-dir:{tmp_path / 'oc'}", "--dataset",
                                      "wds/eval", "--dataset_root", str(root), "--task", "zeroshot_classification",
                                      "--save_clf", str(tmp_path / "clf.pt"), "--output", str(tmp_path / "ref.json")])
    cb_cli.main()
    ours, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ours", "ref"))
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours["metrics"][name] - ref["metrics"][name]) <= 1 / 120 + 1e-6, (name, ours, ref)
    names = (root / "classnames.txt").read_text().splitlines()
    classifier = build_classifier(loaded.model.eval(), loaded.tokenizer, names, load_zeroshot_set(root).templates)
    torch.testing.assert_close(classifier, torch.load(tmp_path / "clf.pt", weights_only=True), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ open_clip

def _open_clip_model() -> torch.nn.Module:
    model = open_clip.create_model("clipkit-nano")
    _randomize(model, logit_scale=3.1)
    return model.eval()


def _same_model(ours, theirs, their_transform, their_tokenizer, ours_loaded) -> None:
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    images = _images(32)
    pixels = torch.stack([their_transform(im) for im in images])
    assert torch.equal(torch.stack([ours_loaded.eval_transform(im) for im in images]), pixels)
    tokens = their_tokenizer(TEXTS)
    assert torch.equal(ours_loaded.tokenizer(TEXTS), tokens)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), theirs.encode_image(pixels), atol=0, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), atol=1e-6, rtol=0)


def test_open_clip_hub_directory_with_a_bin_equals_open_clip(tmp_path):
    model = _open_clip_model()
    hub = tmp_path / "hub"
    hub.mkdir()
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                  "resize_mode": "squash"}
    (hub / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": open_clip.get_model_config("clipkit-nano"), "preprocess_cfg": preprocess}))
    torch.save(model.state_dict(), hub / "open_clip_pytorch_model.bin")

    loaded = load_model(hub)
    theirs, _, transform = open_clip.create_model_and_transforms(f"local-dir:{hub}")
    assert loaded.format == "open_clip"
    _same_model(loaded.model.eval(), theirs.eval(), transform, open_clip.get_tokenizer(f"local-dir:{hub}"), loaded)
    # round trip: clipkit's open_clip export of it holds the same weights bit for bit, and its preprocessing
    from clipkit.export import export_open_clip

    export_open_clip(loaded.model, loaded.model_name, loaded.model_cfg, tmp_path / "out")
    again = load_file(tmp_path / "out" / "open_clip_model.safetensors")
    assert sorted(again) == sorted(model.state_dict())
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    written = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert {k: written[k] for k in preprocess} == preprocess


def test_openclip_trainer_checkpoint_equals_open_clip(tmp_path):
    model = _open_clip_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16)))
    (out[0] @ out[1].t()).sum().backward()
    optimizer.step()
    # what open_clip_train's main() writes at the end of an epoch (a DDP-wrapped model: module. prefixes)
    ckpt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "my-run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, ckpt)

    loaded = load_model(ckpt, model_name="clipkit-nano")
    theirs, _, transform = open_clip.create_model_and_transforms("clipkit-nano", pretrained=str(ckpt))
    assert loaded.format == "open_clip-trainer" and loaded.extra["epoch"] == 3
    _same_model(loaded.model.eval(), theirs.eval(), transform, open_clip.get_tokenizer("clipkit-nano"), loaded)

    # a bare state dict file (no trainer wrapping, no prefix) reads the same
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    bare = load_model(tmp_path / "weights.bin", model_name="clipkit-nano")
    assert bare.format == "state-dict" and all(torch.equal(bare.model.state_dict()[k], v)
                                               for k, v in loaded.model.state_dict().items())
    # without the architecture: one line saying to name it; through the command line, --model names it
    with pytest.raises(CheckpointError, match="without its architecture: name it with --model"):
        load_model(ckpt)
    from clipkit import cli

    assert cli.main(["export", "--checkpoint", str(ckpt), "--model", "clipkit-nano", "--out", str(tmp_path / "e")]) == 0
    exported = load_model(tmp_path / "e")
    assert all(torch.equal(exported.model.state_dict()[k], v) for k, v in loaded.model.state_dict().items())


def _openclip_train_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """The AdamW open_clip_train/main.py builds: gain-or-bias parameters (no weight decay) first, then the rest."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    return torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}],
                             lr=5e-4, betas=(0.9, 0.98), eps=1e-6)


def _openclip_trainer_checkpoint(tmp_path, epochs: int):
    """(model, its AdamW, epoch_N.pt): open_clip_train's optimizer after `epochs` steps (one per epoch here), saved
    as its main() saves an epoch (a DDP-wrapped model: module. prefixes)."""
    model = _open_clip_model().train()
    optimizer = _openclip_train_optimizer(model)
    for _ in range(epochs):
        out = model(torch.randn(4, 3, 32, 32), torch.randint(0, 49408, (4, 16)))
        (out[0] @ out[1].t()).logsumexp(0).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    ckpt = tmp_path / f"epoch_{epochs}.pt"
    torch.save({"epoch": epochs, "name": "r", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, ckpt)
    return model, optimizer, ckpt


def test_training_from_an_openclip_checkpoint_continues_its_optimizer_moments(tmp_path, synth_small):
    from clipkit.config import load_config
    from clipkit.training import Trainer
    from clipkit.training.openclip_optimizer import load_openclip_moments

    model, optimizer, ckpt = _openclip_trainer_checkpoint(tmp_path, epochs=2)
    expected = {n: optimizer.state[p] for n, p in model.named_parameters()}

    overrides = [f"model.pretrained={ckpt}", "model.name=clipkit-nano", f"run.dir={tmp_path / 'run'}",
                 f"data.train={synth_small.train_spec}", "train.global_batch_size=8", "run.progress=false",
                 "data.workers=0"]
    trainer = Trainer(load_config(None, overrides))
    assert trainer.optimizer_from_pretrained and trainer.pretrained["format"] == "open_clip-trainer"
    params = dict(trainer.module.named_parameters())
    assert all(torch.equal(params[n].detach(), p.detach()) for n, p in model.named_parameters())
    assert sum(1 for n in expected if expected[n]) == len(expected) - 1  # logit_scale had no gradient above
    for name, p in params.items():
        state = trainer.engine.optimizer.state[p]
        if not expected[name]:  # no moments saved for it: none made up
            assert not state, name
            continue
        assert float(state["step"]) == float(expected[name]["step"]) == 2.0
        assert torch.equal(state["exp_avg"], expected[name]["exp_avg"]), name
        assert torch.equal(state["exp_avg_sq"], expected[name]["exp_avg_sq"]), name
    trainer.fit(until=1)  # the run's first step takes AdamW on from the third
    assert float(trainer.engine.optimizer.state[params["visual.conv1.weight"]]["step"]) == 3.0

    # an optimizer that does not fit (SGD with momentum): the weights come over, the optimizer starts fresh
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16)))
    (out[0] @ out[1].t()).sum().backward()
    sgd.step()
    fresh = torch.optim.AdamW(model.parameters())
    assert load_openclip_moments(fresh, model, sgd.state_dict()) == "its optimizer is not Adam/AdamW"
    assert not fresh.state
    # the same AdamW state for a model that trains one tensor less (a locked temperature) does not fit either
    model.logit_scale.requires_grad_(False)
    assert load_openclip_moments(fresh, model, optimizer.state_dict()).startswith("its optimizer holds")


def test_an_openclip_checkpoints_moments_continue_under_fsdp2(tmp_path, synth_small):
    """The same import under the FSDP2 engine (one process, a one-member group): each moment lands sharded as its
    parameter is, and the whole of it (gathered back) is open_clip_train's moment exactly."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from clipkit.config import load_config
    from clipkit.training import Trainer

    model, optimizer, ckpt = _openclip_trainer_checkpoint(tmp_path, epochs=1)
    expected = {n: optimizer.state[p] for n, p in model.named_parameters()}
    overrides = [f"model.pretrained={ckpt}", "model.name=clipkit-nano", f"run.dir={tmp_path / 'run'}",
                 f"data.train={synth_small.train_spec}", "train.global_batch_size=8", "run.progress=false",
                 "data.workers=0", "fsdp.enabled=true"]
    try:
        trainer = Trainer(load_config(None, overrides))
        assert trainer.optimizer_from_pretrained
        params = dict(trainer.module.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        for name, p in params.items():
            state = trainer.engine.optimizer.state[p]
            if not expected[name]:
                assert not state, name
                continue
            assert float(state["step"]) == float(expected[name]["step"]) == 1.0
            for key in ("exp_avg", "exp_avg_sq"):
                assert isinstance(state[key], DTensor) and state[key].placements == p.placements, (name, key)
                assert torch.equal(state[key].full_tensor(), expected[name][key]), (name, key)
        trainer.fit(until=1)  # AdamW takes the sharded moments on: its second step
        assert float(trainer.engine.optimizer.state[params["visual.conv1.weight"]]["step"]) == 2.0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_search_of_an_index_embedded_from_a_trainer_checkpoint_uses_the_recorded_model_name(
        tmp_path, synth_small, capsys):
    import tarfile

    from clipkit import cli

    model = _open_clip_model()
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "r", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               ckpt)
    from braceexpand import braceexpand

    shard = next(iter(braceexpand(synth_small.train_spec)))  # 150 images with captions
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert cli.main(["embed", "--checkpoint", str(ckpt), "--model", "clipkit-nano", "--data", str(shard),
                     "--out", str(emb), "--workers", "0", "--no-progress"]) == 0
    assert json.loads((emb / "clipkit_embed.json").read_text())["model_name"] == "clipkit-nano"
    assert cli.main(["index", "--embeddings", str(emb), "--out", str(idx), "--kind", "image"]) == 0
    capsys.readouterr()

    # the reference: open_clip's own model from the same file, cosine over every image of the shard
    theirs, _, transform = open_clip.create_model_and_transforms("clipkit-nano", pretrained=str(ckpt))
    with tarfile.open(shard) as tar:
        jpgs = {Path(m.name).stem: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    keys = sorted(jpgs)
    import io

    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(io.BytesIO(jpgs[k])).convert("RGB")) for k in keys])
        images = torch.nn.functional.normalize(theirs.eval().encode_image(pixels), dim=-1)
        query = torch.nn.functional.normalize(
            theirs.encode_text(open_clip.get_tokenizer("clipkit-nano")(["a red circle"])), dim=-1)[0]
    scores = (images @ query).numpy()
    want = np.argsort(-scores, kind="stable")[:5]

    assert cli.main(["search", "--index", str(idx), "--text", "a red circle", "-k", "5"]) == 0
    results = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose([r["score"] for r in results], scores[want], atol=1e-4)
    for r, w in zip(results, want):
        assert r["key"] == keys[w] or abs(r["score"] - scores[w]) < 1e-6, (r["key"], keys[w])

    # another architecture named for the same file: refused in one line
    assert cli.main(["search", "--index", str(idx), "--text", "a red circle", "--model", "clipkit-nano-timm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clipkit: error: ") and "do not fit architecture" in err
    # serve loads the model before it binds: the same refusal, at start-up
    assert cli.main(["serve", "--index", str(idx), "--port", "0", "--model", "clipkit-nano-timm"]) == 2
    assert capsys.readouterr().err.strip() == err
    # the right one named explicitly gives the same results, and other weights still fail the digest check
    assert cli.main(["search", "--index", str(idx), "--text", "a red circle", "-k", "5", "--model",
                     "clipkit-nano"]) == 0
    assert json.loads(capsys.readouterr().out) == results
    other = model.state_dict()
    other["logit_scale"] = other["logit_scale"] + 1  # one tensor changed: another digest
    torch.save(other, tmp_path / "other.bin")
    assert cli.main(["search", "--index", str(idx), "--text", "a red circle", "--checkpoint",
                     str(tmp_path / "other.bin")]) == 2
    assert "holds other weights" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- refusals

def test_malicious_bin_is_refused_through_every_source_and_never_runs(tmp_path, tokenizer_files):
    marker = tmp_path / "code-ran"
    evil = {"transformers": tmp_path / "hf" / "pytorch_model.bin", "open_clip": tmp_path / "oc" / "open_clip_pytorch_model.bin",
            "trainer": tmp_path / "epoch_1.pt", "bare": tmp_path / "weights.bin"}
    hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[0])
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("clipkit-nano")}))
    torch.save({"state_dict": {"w": Payload(marker)}, "epoch": 1}, evil["trainer"])
    for key in ("transformers", "open_clip", "bare"):
        torch.save({"logit_scale": Payload(marker)}, evil[key])
    for key, path in evil.items():
        target = path.parent if key in ("transformers", "open_clip") else path
        with pytest.raises(CheckpointError) as info:
            load_model(target, model_name="clipkit-nano" if key in ("trainer", "bare") else None)
        message = str(info.value)
        assert str(path) in message and "weights_only" in message and "\n" not in message, message
    proc = _cli("export", "--checkpoint", evil["trainer"], "--model", "clipkit-nano", "--out", tmp_path / "e")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and str(evil["trainer"]) in proc.stderr
    assert not marker.exists()


def test_torchscript_archive_of_another_model_is_refused_in_one_line(tmp_path):
    # OpenAI's CLIP archives are read (tests/test_openai_torchscript.py); any other TorchScript is refused
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(CheckpointError, match="TorchScript archive without OpenAI CLIP's tensors") as info:
        load_model(tmp_path / "ViT-B-32.pt", model_name="ViT-B-32-quickgelu")
    assert "\n" not in str(info.value)


def test_bad_transformers_directories_are_refused_in_one_line(tmp_path, tokenizer_files, capsys):
    def refused(path, pattern):
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_model(path)
        assert "\n" not in str(info.value)

    hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[0])
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tmp_path / "hf", no_tokenizer)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink()
    refused(no_tokenizer, "holds weights but no tokenizer")

    wrong_shape = tmp_path / "wrong-shape"
    shutil.copytree(tmp_path / "hf", wrong_shape)
    state = load_file(wrong_shape / "model.safetensors")
    state["text_projection.weight"] = torch.zeros(7, 32)
    save_file(state, wrong_shape / "model.safetensors")
    refused(wrong_shape, r"tensor 'text_projection.weight' has shape \(7, 32\), the config says \(16, 32\)")

    for model_type, pattern in (("bert", "unknown model_type 'bert'"), ("siglip2", "SigLIP 2.*no exact open_clip")):
        other = tmp_path / model_type
        shutil.copytree(tmp_path / "hf", other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps(config | {"model_type": model_type}))
        refused(other, pattern)

    eos = tmp_path / "eos"
    shutil.copytree(tmp_path / "hf", eos)
    config = json.loads((eos / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 49406
    (eos / "config.json").write_text(json.dumps(config))
    refused(eos, "the tokenizer ends texts with id 49407, the config's eos_token_id is 49406")

    tanh = tmp_path / "tanh"
    shutil.copytree(tmp_path / "hf", tanh)
    config = json.loads((tanh / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["hidden_act"] = "gelu_pytorch_tanh"
    (tanh / "config.json").write_text(json.dumps(config))
    refused(tanh, "hidden_act 'gelu_pytorch_tanh'")

    crop = tmp_path / "crop"
    shutil.copytree(tmp_path / "hf", crop)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(crop)
    refused(crop, "resizes to 32 then crops 28")

    from clipkit import cli

    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(no_tokenizer), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clipkit: error: ") and "no tokenizer" in err


# --------------------------------------------------------------------------------------------------- inspect

def test_inspect_describes_a_transformers_directory_and_a_trainer_checkpoint(tmp_path, tokenizer_files, capsys):
    from clipkit.inspect import main

    hf = hf_directory(tmp_path / "hf", tokenizer_files, SHAPES[2])
    capsys.readouterr()  # what building the directory printed
    assert main([str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    count = lambda *prefixes: sum(p.numel() for n, p in hf.named_parameters() if n.startswith(prefixes))  # noqa: E731
    assert info["format"] == "transformers" and info["context_length"] == 20
    assert info["parameters"] == {"image": count("vision_model.", "visual_projection"),
                                  "text": count("text_model.", "text_projection"), "other": 1,
                                  "total": sum(p.numel() for p in hf.parameters())}
    assert info["tokenizer"].startswith("CLIPTokenizer") and "vocabulary 49408" in info["tokenizer"]
    assert info["preprocessing"]["mean"] == MEAN and info["preprocessing"]["size"] == 64
    assert all(v.startswith("yes") for k, v in info["commands"].items() if k != "export --format onnx")

    model = _open_clip_model()
    torch.save({"epoch": 2, "name": "r", "state_dict": model.state_dict(), "optimizer": {}}, tmp_path / "epoch_2.pt")
    assert main([str(tmp_path / "epoch_2.pt"), "--model", "clipkit-nano"]) == 0
    text = capsys.readouterr().out
    assert "format        : open_clip-trainer" in text and "'epoch': 2" in text
    assert "zeroshot                  yes, with --model clipkit-nano" in text
