"""OpenAI's TorchScript CLIP archives, read without running their code: checked against open_clip's
load_openai_model (which runs torch.jit.load: acceptable here, on archives this test builds itself)."""
import json
import os
import pickle
import zipfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipkit.checkpoint import CheckpointError
from clipkit.models import eval_mode, load_model, set_text_trimming

pytestmark = pytest.mark.usefixtures("one_thread")

# OpenAI-compatible shapes (widths in heads of 64, as build_model_from_openai_state_dict assumes), QuickGELU
VIT = {"embed_dim": 16, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
       "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
RN = {"embed_dim": 16, "quick_gelu": True,
      "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 64, "patch_size": None},
      "text_cfg": {"context_length": 10, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


def _openai_archive(path, cfg):
    """An archive laid out as OpenAI's: a traced CLIP whose sizes are buffers, whose attention mask is a plain
    attribute (a graph constant, not state), weights far from any initialisation, fp16 where OpenAI's are."""
    from open_clip.model import CLIP, convert_weights_to_lp

    torch.manual_seed(0)
    model = CLIP(**{k: v for k, v in cfg.items()}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    mask = model.attn_mask
    del model._buffers["attn_mask"]
    model.attn_mask = mask
    size = cfg["vision_cfg"]["image_size"]
    for key, value in (("input_resolution", size), ("context_length", cfg["text_cfg"]["context_length"]),
                       ("vocab_size", cfg["text_cfg"]["vocab_size"])):
        if hasattr(model, key):
            delattr(model, key)
        model.register_buffer(key, torch.tensor(value))
    convert_weights_to_lp(model, torch.float16)  # OpenAI's archives hold fp16 weights (norms stay fp32)
    pixels = torch.randn(1, 3, size, size).half()
    tokens = torch.randint(0, 49408, (1, cfg["text_cfg"]["context_length"]))
    traced = torch.jit.trace_module(model, {"encode_image": pixels, "encode_text": tokens}, strict=False,
                                    check_trace=False)
    traced.save(str(path))
    return path


@pytest.mark.parametrize("cfg", [VIT, RN], ids=["vit", "resnet"])
def test_openai_archive_gives_open_clips_features_tokens_and_pixels(tmp_path, cfg):
    archive = _openai_archive(tmp_path / "ViT-T.pt", cfg)
    loaded = load_model(archive)
    reference = open_clip.load_openai_model(str(archive), device="cpu", precision="fp32")
    assert loaded.format == "openai-torchscript" and loaded.model_cfg == cfg
    from clipkit.inspect import inspect_path

    described = inspect_path(str(archive))
    assert described["format"] == "openai-torchscript" and described["commands"]["zeroshot"] == "yes"
    ours, theirs = loaded.model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    size = cfg["vision_cfg"]["image_size"]
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (size + 9 * i, size + 5, 3), dtype=np.uint8))
              for i in range(3)]
    openai_transform = open_clip.image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                                 std=open_clip.OPENAI_DATASET_STD)
    pixels = torch.stack([loaded.eval_transform(im) for im in images])
    assert torch.equal(pixels, torch.stack([openai_transform(im) for im in images]))
    texts = ["a photo of a cat", "a dog on the grass", "x " * 40]
    tokens = loaded.tokenizer(texts)
    assert torch.equal(tokens, open_clip.tokenize(texts, context_length=cfg["text_cfg"]["context_length"]))
    set_text_trimming(loaded.model, False)  # trimming is exact in arithmetic, not in float rounding
    with torch.no_grad(), eval_mode(loaded.model):  # as every command runs it (BatchNorm's running stats)
        assert torch.equal(loaded.model.encode_image(pixels), reference.encode_image(pixels))
        assert torch.equal(loaded.model.encode_text(tokens), reference.encode_text(tokens))


def _with_data_pkl(archive, out, data: bytes):
    """The archive with its data.pkl replaced (everything else, code and tensors, as it was)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith("/data.pkl") else src.read(info.filename))
    return out


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_archive_with_a_reduce_payload_is_refused_and_never_runs(tmp_path, capsys):
    from clipkit.cli import main

    archive = _openai_archive(tmp_path / "good.pt", VIT)
    marker = tmp_path / "marker"
    plain = _with_data_pkl(archive, tmp_path / "evil.pt", pickle.dumps(Payload(marker), protocol=2))
    # a payload posing as a TorchScript class: `__torch__` names are inert containers, never called
    posing = pickle.dumps(Payload(marker), protocol=2).replace(b"cposix\nsystem\n", b"c__torch__.model\nCLIP\n")
    assert b"__torch__.model" in posing
    disguised = _with_data_pkl(archive, tmp_path / "disguised.pt", posing)
    for path in (plain, disguised):
        with pytest.raises(CheckpointError, match="refused") as info:
            load_model(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        capsys.readouterr()
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("clipkit: error:") and "\n" not in err and str(path) in err
    assert not marker.exists()


def test_training_from_an_openai_archive_records_its_source(tmp_path, synth_small):
    from clipkit.config import load_config
    from clipkit.run import run

    archive = _openai_archive(tmp_path / "ViT-T.pt", VIT)
    source = open_clip.load_openai_model(str(archive), device="cpu", precision="fp32").state_dict()
    summary = run(load_config(None, [f"model.pretrained={archive}", "model.lock_image=true",
                                     f"run.dir={tmp_path / 'run'}", f"data.train={synth_small.train_spec}",
                                     "train.global_batch_size=8", "train.steps=2", "train.warmup_steps=1",
                                     "run.progress=false", "data.workers=0", "data.shuffle_buffer=20",
                                     "eval.zeroshot_at_end=false", "eval.retrieval_at_end=false",
                                     "export.at_end=false", "run.report=false"]))
    assert summary["pretrained"]["format"] == "openai-torchscript"
    trained = load_model(summary["checkpoint"]).model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in source.items() if k.startswith("visual."))
    assert json.loads(json.dumps(summary["pretrained"]))["path"] == str(archive)


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-L-14-quickgelu", "RN50-quickgelu", "RN101-quickgelu"])
def test_openai_shapes_are_read_as_open_clips_quickgelu_architectures(name):
    """The architecture read from the tensor shapes of OpenAI's released models (built on the meta device: no
    memory, no download) is open_clip's -quickgelu config of the same name, and the model is named by it."""
    from open_clip.model import CLIP

    from clipkit.models.torchscript import openai_model_config
    from clipkit.models.weights import _known_name

    with torch.device("meta"):
        state = CLIP(**open_clip.get_model_config(name)).state_dict()
    inferred = openai_model_config(None, state)
    assert inferred == open_clip.get_model_config(name) and _known_name(inferred) == name
