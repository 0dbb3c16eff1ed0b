"""transformers SiglipModel directories read as open_clip's SigLIP, checked against transformers itself:
features, tokens, pixels and the sigmoid loss, on tiny random models and a SentencePiece tokenizer trained
here (nothing is downloaded)."""
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipkit.checkpoint import CheckpointError
from clipkit.models import load_model

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (patch, image, vision width, layers, heads, MLP, text width, layers, heads, MLP, context, LayerNorm eps,
#  activation): two patch sizes, widths, depths, head counts, both GELUs, a text tower of another width
SHAPES = [
    (16, 32, 32, 2, 2, 80, 48, 2, 4, 96, 16, 1e-6, "gelu_pytorch_tanh"),
    (8, 28, 48, 1, 4, 100, 32, 3, 2, 72, 12, 1e-5, "gelu"),  # 28px / patch 8: the edge pixels unused, as
]                                                          # in SO400M/14 at 384px
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
LOGIT_SCALE, LOGIT_BIAS = 2.3, -4.5
TEXTS = ["a photo of a cat", "Wow!! A dog, on the GRASS.", "x " * 100]


def _sentences() -> list[str]:
    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "the", "cat", "dog", "grass", "on", "red", "car", "picture", "number", "wow", "x"]
    words += ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 8))) for _ in range(200)]
    return [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(400)]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    """A SentencePiece model trained here on generated lines (SigLIP's special tokens: <unk>, </s>)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_sentences()), model_writer=model, vocab_size=200,
                                   model_type="unigram", unk_id=2, bos_id=-1, eos_id=1, pad_id=0,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def _randomize(model: torch.nn.Module, logit_scale: float) -> None:
    """Weights far from any initialisation (LayerNorms included), so a misplaced tensor shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(logit_scale)
            elif name == "logit_bias":
                p.fill_(LOGIT_BIAS)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def siglip_directory(path: Path, spiece: Path, shape, *, weights: str = "safetensors",
                     logit_scale: float = LOGIT_SCALE) -> SiglipModel:
    patch, image, vw, vl, vh, vm, tw, tl, th, tm, ctx, eps, act = shape
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_max_length=ctx)
    tokenizer.save_pretrained(path)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=tw, intermediate_size=tm, num_hidden_layers=tl,
                         num_attention_heads=th, max_position_embeddings=ctx, hidden_act=act, layer_norm_eps=eps,
                         projection_size=vw, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        vision_config=dict(image_size=image, patch_size=patch, hidden_size=vw, intermediate_size=vm,
                           num_hidden_layers=vl, num_attention_heads=vh, hidden_act=act, layer_norm_eps=eps))
    hf = SiglipModel(config).eval()
    _randomize(hf, logit_scale)
    hf.save_pretrained(path)
    if weights == "bin":  # the older layout: a pickled state dict (transformers 5 writes only safetensors)
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    SiglipImageProcessor(size={"height": image, "width": image}, image_mean=MEAN, image_std=STD).save_pretrained(path)
    return hf


def _images(side: int) -> list:
    rng = np.random.default_rng(0)
    sizes = [(70, 90), (side, side), (101, 77), (2 * side + 1, side + 3)]  # up and down, squashed, square
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


def _hf_tokens(path: Path, texts, ctx: int) -> torch.Tensor:
    return SiglipTokenizer.from_pretrained(path)(texts, padding="max_length", truncation=True, max_length=ctx,
                                                 return_tensors="pt").input_ids


@pytest.mark.parametrize("shape", SHAPES, ids=[f"p{s[0]}-w{s[2]}-{s[12]}" for s in SHAPES])
def test_siglip_directory_gives_transformers_features_tokens_pixels_and_loss(tmp_path, spiece, shape):
    from clipkit.losses import create_loss

    hf = siglip_directory(tmp_path / "hf", spiece, shape)
    loaded = load_model(tmp_path / "hf")
    assert loaded.format == "transformers" and loaded.context_length == shape[10]
    assert loaded.model.visual.preprocess_cfg["mean"] == tuple(MEAN)

    images = _images(shape[1])
    ours = torch.stack([loaded.eval_transform(im) for im in images])
    # the processor's PIL backend resizes as open_clip's transforms do (PIL bicubic to uint8): the same pixels
    pil = SiglipImageProcessorPil.from_pretrained(tmp_path / "hf")(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, pil, atol=1e-6, rtol=0)
    # its default (torchvision) backend resamples tensors: within the tolerance transformers holds the two
    # backends to (in [0, 1] pixel units: at most 0.1 apart, 5e-3 on average)
    pixels = SiglipImageProcessor.from_pretrained(tmp_path / "hf")(images=images, return_tensors="pt")["pixel_values"]
    apart = (ours - pixels).abs() * torch.tensor(STD).view(1, 3, 1, 1)
    assert ours.shape == pixels.shape and apart.max() <= 0.1 and apart.mean() <= 5e-3

    tokens = _hf_tokens(tmp_path / "hf", TEXTS, shape[10])
    assert torch.equal(loaded.tokenizer(TEXTS), tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(pixels),
                                   _features(hf.get_image_features(pixel_values=pixels)), atol=1e-4, rtol=0)
        torch.testing.assert_close(loaded.model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)),
                                   atol=1e-4, rtol=0)
        batch = torch.cat([pixels, pixels[:2]])
        captions = _hf_tokens(tmp_path / "hf", TEXTS + ["a red car", "the small dog on a tree", "number x"], shape[10])
        out = loaded.model(batch, captions)
        loss = create_loss("siglip")(out["image_features"], out["text_features"], out["logit_scale"],
                                     out["logit_bias"])
        expected = hf(input_ids=captions, pixel_values=batch, return_loss=True).loss
    assert loaded.model.logit_scale.item() == pytest.approx(LOGIT_SCALE)
    assert loaded.model.logit_bias.item() == pytest.approx(LOGIT_BIAS)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_first_training_step_from_a_siglip_directory_uses_its_sigmoid_loss(tmp_path, spiece, synth_small):
    from clipkit.config import load_config
    from clipkit.training import Trainer

    hf = siglip_directory(tmp_path / "hf", spiece, SHAPES[1], weights="bin")
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'hf'}", f"run.dir={tmp_path / 'run'}",
                             f"data.train={synth_small.train_spec}", "train.global_batch_size=6",
                             "train.warmup_steps=1", "run.progress=false", "data.workers=0"])
    trainer = Trainer(cfg)
    assert cfg.train.loss == "siglip" and "loss: siglip" in (tmp_path / "run" / "config.yaml").read_text()
    images = torch.stack([trainer.val_transform(im) for im in _images(28)[:3]] * 2)
    tokens = trainer.tokenizer([f"a picture number {i} of something" for i in range(len(images))])
    with torch.no_grad():
        expected = hf(input_ids=tokens, pixel_values=images, return_loss=True).loss
    assert trainer.train_on(images, tokens) == pytest.approx(expected.item(), abs=1e-5)


# -------------------------------------------------------------------------------------------------- refusals

class Payload:
    """Unpickling this runs a shell command that leaves a marker file: what a malicious .bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _refused(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def _edited(source: Path, to: Path, **changes) -> Path:
    shutil.copytree(source, to)
    config = json.loads((to / "config.json").read_text())
    for key, value in changes.items():
        tower, _, field = key.partition("__")
        (config[tower] if field else config).update({field or tower: value})
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_malicious_bin_in_a_siglip_directory_is_refused_and_never_runs(tmp_path, spiece):
    marker = tmp_path / "code-ran"
    siglip_directory(tmp_path / "hf", spiece, SHAPES[0], weights="bin")
    torch.save({"logit_bias": Payload(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    _refused(tmp_path / "hf", r"pytorch_model.bin: refused, not a weights-only file")
    proc = subprocess.run([sys.executable, "-m", "clipkit", "inspect", str(tmp_path / "hf")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "weights_only" in proc.stderr
    assert not marker.exists()


def test_siglip_variants_without_an_exact_mapping_are_refused_in_one_line(tmp_path, spiece):
    hf = tmp_path / "hf"
    siglip_directory(hf, spiece, SHAPES[0])
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hf, no_tokenizer)
    (no_tokenizer / "spiece.model").unlink()
    _refused(no_tokenizer, r"holds weights but no tokenizer \(spiece.model, or tokenizer.json\)")

    _refused(_edited(hf, tmp_path / "siglip2", model_type="siglip2"), "SigLIP 2.*no exact open_clip equivalent")
    _refused(_edited(hf, tmp_path / "relu", vision_config__hidden_act="relu"), "vision_config.hidden_act 'relu'")
    _refused(_edited(hf, tmp_path / "proj", text_config__projection_size=40),
             "the text head projects to 40 but the image features have 32")
    _refused(_edited(hf, tmp_path / "nohead", vision_config__vision_use_head=False), "vision_use_head is false")
    _refused(_edited(hf, tmp_path / "dropout", text_config__attention_dropout=0.1),
             "text_config.attention_dropout is 0.1")

    shape = tmp_path / "shape"
    shutil.copytree(hf, shape)
    state = load_file(shape / "model.safetensors")
    state["vision_model.head.attention.in_proj_weight"] = torch.zeros(90, 32)
    from safetensors.torch import save_file

    save_file(state, shape / "model.safetensors")
    _refused(shape, r"tensor 'vision_model.head.attention.in_proj_weight' has shape \(90, 32\), the config says "
                    r"\(96, 32\)")


def test_inspect_and_hf_export_of_a_siglip_directory(tmp_path, spiece, capsys):
    from clipkit import cli
    from clipkit.inspect import main

    hf = siglip_directory(tmp_path / "hf", spiece, SHAPES[0])
    capsys.readouterr()
    assert main([str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    count = lambda prefix: sum(p.numel() for n, p in hf.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert info["format"] == "transformers" and info["context_length"] == SHAPES[0][10]
    assert info["parameters"] == {"image": count("vision_model."), "text": count("text_model."), "other": 2,
                                  "total": sum(p.numel() for p in hf.parameters())}
    assert info["tokenizer"].startswith("SiglipTokenizer")
    assert info["preprocessing"]["mean"] == MEAN and info["preprocessing"]["size"] == SHAPES[0][1]
    # transformers' CLIPModel has no logit bias: the hf export refuses in one line
    args = ["export", "--checkpoint", str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "e")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "logit bias" in err


def test_open_clip_export_of_a_siglip_directory_loads_in_open_clip(tmp_path, spiece):
    """open_clip itself builds the export once the tower's name is registered, and gives transformers' features."""
    import open_clip

    from clipkit.export import export_checkpoint
    from clipkit.models.siglip_tower import register

    hf = siglip_directory(tmp_path / "hf", spiece, SHAPES[1])
    export_checkpoint(tmp_path / "hf", tmp_path / "oc")
    model_cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]
    assert register(model_cfg["vision_cfg"]["timm_model_name"])
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    images = _images(SHAPES[1][1])
    pixels = torch.stack([preprocess(im) for im in images])
    tokens = _hf_tokens(tmp_path / "hf", TEXTS, SHAPES[1][10])
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(pixels),
                                   _features(hf.get_image_features(pixel_values=pixels)), atol=1e-4, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)),
                                   atol=1e-4, rtol=0)
    assert model.logit_bias.item() == pytest.approx(LOGIT_BIAS)


def test_a_short_run_from_a_siglip_directory_trains_evaluates_and_exports(tmp_path, spiece, synth_small):
    from clipkit.config import load_config
    from clipkit.run import run

    released = math.log(117.0)  # about what the released SigLIP models learned: above CLIP's ceiling of 100
    siglip_directory(tmp_path / "hf", spiece, SHAPES[0], logit_scale=released)
    summary = run(load_config(None, [
        f"model.pretrained={tmp_path / 'hf'}", f"run.dir={tmp_path / 'run'}", f"data.train={synth_small.train_spec}",
        f"data.zeroshot={synth_small.eval_root}", "train.global_batch_size=8", "train.steps=2",
        "train.warmup_steps=1", "run.progress=false", "data.workers=1", "data.shuffle_buffer=20",
        "eval.retrieval_at_end=false", "run.report=false"]))
    assert summary["pretrained"]["format"] == "transformers"
    assert "loss: siglip" in (tmp_path / "run" / "config.yaml").read_text()
    # evaluated at the end with the directory's own tokenizer (its 200 ids, not open_clip's BPE)
    assert 0.0 <= summary["zeroshot"]["acc1"] <= 1.0
    exported = load_file(tmp_path / "run" / "export" / "open_clip_model.safetensors")
    assert exported["logit_bias"].item() != LOGIT_BIAS  # the imported bias trained on
    # its temperature trained on from its own value, not cut to CLIP's exp(logit_scale) <= 100 at the first step
    assert abs(exported["logit_scale"].item() - released) < 0.01 and exported["logit_scale"].item() > math.log(100.0)
    # the run's weights carry the directory's tokenizer: loaded alone, with the directory gone, they tokenise as
    # the directory's SiglipTokenizer does
    reference = _hf_tokens(tmp_path / "hf", TEXTS, SHAPES[0][10])
    shutil.rmtree(tmp_path / "hf")
    for weights in (summary["checkpoint"], tmp_path / "run" / "export"):
        assert torch.equal(load_model(weights).tokenizer(TEXTS), reference)
