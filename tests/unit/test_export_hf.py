"""`--format hf`: a directory transformers loads as CLIPModel + CLIPProcessor (offline), whose tokens, pixels
and embeddings are open_clip's; and one clear error for every architecture CLIP cannot express."""
import copy
import functools
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as photos
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor

from clipkit.cli import main as cli_main
from clipkit.errors import UserError
from clipkit.export import EXPORT_FORMATS, export_hf
from clipkit.models import create_model, create_transforms, get_model_config, get_tokenizer, load_model, save_weights
from clipkit.models.factory import register_model_config

CAPTIONS = [
    "a photo of a red circle.",
    "Two BIG   blue squares, on a striped background!!",
    "wow! it's 3.5 metres -- don't   panic?",
    "café naïve résumé",
    "",
    "a very long caption that goes on and on " * 4,  # truncated at the context length, ending in eot
]


def _photos() -> list[Image.Image]:
    """Real photographs of different shapes (scikit-image ships them): resize and crop are exercised."""
    return [Image.fromarray(photos.coffee()), Image.fromarray(photos.astronaut()), Image.fromarray(photos.chelsea())]


@functools.cache
def _open_clip_tokenizer(context_length: int):
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _load(directory):
    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(directory, local_files_only=True)


def _assert_same_embeddings(oc_model, directory, pixels):
    """The HF model fed the processor's own tokens and the same pixels gives open_clip's embeddings."""
    hf, processor = _load(directory)
    ctx = oc_model.positional_embedding.shape[0]
    tokens = processor(text=CAPTIONS, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
    oc_tokens = _open_clip_tokenizer(ctx)(CAPTIONS)
    assert torch.equal(tokens["input_ids"], oc_tokens)
    with torch.no_grad():
        hf_img = hf.get_image_features(pixel_values=pixels).pooler_output
        hf_txt = hf.get_text_features(**tokens).pooler_output
        oc_img, oc_txt = oc_model.encode_image(pixels), oc_model.encode_text(oc_tokens)
        logits = hf(pixel_values=pixels, **tokens).logits_per_image
    torch.testing.assert_close(hf_img, oc_img, rtol=0, atol=1e-4)
    torch.testing.assert_close(hf_txt, oc_txt, rtol=0, atol=1e-4)
    expected = oc_model.logit_scale.exp() * F.normalize(oc_img, dim=-1) @ F.normalize(oc_txt, dim=-1).T
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    return processor


@pytest.fixture(scope="module")
def trained_run(nano_run_export):
    """A short clipkit-nano run whose run layer exports with export.format=hf."""
    return nano_run_export("hf")


def test_run_layer_export_loads_in_transformers_with_open_clip_outputs(trained_run):
    export_dir = Path(trained_run["export"]["config"]).parent
    assert {"config", "weights", "tokenizer", "vocab", "merges", "preprocessor"} <= trained_run["export"].keys()
    loaded = load_model(trained_run["checkpoint"])
    config = json.loads((export_dir / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "gelu"
    assert config["text_config"]["max_position_embeddings"] == 16 and config["vision_config"]["image_size"] == 32
    _, val = create_transforms(loaded.model)
    pixels = torch.stack([val(im) for im in _photos()])
    processor = _assert_same_embeddings(loaded.model.eval(), export_dir, pixels)

    # The processor's own preprocessing of the photos: transformers 5's default (torchvision) backend
    # resizes tensors and differs from open_clip's PIL resize by about one grey level at most; its PIL
    # backend reproduces open_clip's pixels.
    processed = processor(images=_photos(), return_tensors="pt")["pixel_values"]
    assert processed.shape == pixels.shape
    assert (processed - pixels).abs().max() < 0.05 and (processed - pixels).abs().mean() < 1e-3
    pil = AutoImageProcessor.from_pretrained(export_dir, local_files_only=True, backend="pil")
    torch.testing.assert_close(pil(images=_photos(), return_tensors="pt")["pixel_values"], pixels,
                               rtol=0, atol=1e-5)


def test_cli_export_hf(trained_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert "hf" in EXPORT_FORMATS
    assert cli_main(["export", "--checkpoint", trained_run["checkpoint"], "--format", "hf", "--out", str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    loaded = load_model(trained_run["checkpoint"])
    pixels = torch.randn(2, 3, 32, 32)
    _assert_same_embeddings(loaded.model.eval(), out, pixels)


def _variant(name: str, base: str = "clipkit-nano", embed_dim=None, **changes) -> tuple:
    """A clipkit-nano variant, with every weight (biases, norms, layer scales included) made non-trivial
    so a misplaced or dropped tensor shows in the outputs."""
    cfg = copy.deepcopy(get_model_config(base))
    for key, value in changes.items():
        section, field = key.split("__") if "__" in key else (None, key)
        (cfg[section] if section else cfg)[field] = value
    if embed_dim:
        cfg["embed_dim"] = embed_dim
    model = create_model(register_model_config(f"hf-test-{name}", cfg)).eval()
    gen = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, cfg


EXPRESSIBLE = {
    "quick_gelu": dict(quick_gelu=True),
    "layer_scale": dict(vision_cfg__ls_init_value=0.5, text_cfg__ls_init_value=0.5),
    "final_ln_after_pool_and_mlp_ratio": dict(vision_cfg__final_ln_after_pool=True, vision_cfg__mlp_ratio=2.0,
                                              text_cfg__mlp_ratio=3.0),
    "patch_dropout_eos_pool_sincos": dict(vision_cfg__patch_dropout=0.5, vision_cfg__pos_embed_type="sin_cos_2d",
                                          text_cfg__pool_type="eos", text_cfg__eos_id=49407),
    "no_text_projection_norm_eps": dict(embed_dim=64, text_cfg__proj_type="none",
                                        vision_cfg__norm_kwargs={"eps": 1e-6}, text_cfg__norm_kwargs={"eps": 1e-6}),
    "tanh_gelu_context_24": dict(vision_cfg__act_kwargs={"approximate": "tanh"},
                                 text_cfg__act_kwargs={"approximate": "tanh"}, text_cfg__context_length=24,
                                 text_cfg__vocab_size=49500),
}


@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_expressible_variants_match_open_clip(name, tmp_path):
    model, cfg = _variant(name, **EXPRESSIBLE[name])
    export_hf(model, name, cfg, tmp_path)
    _assert_same_embeddings(model, tmp_path, torch.randn(3, 3, 32, 32))
    config = json.loads((tmp_path / "config.json").read_text())
    if name == "quick_gelu":
        assert config["vision_config"]["hidden_act"] == config["text_config"]["hidden_act"] == "quick_gelu"


TINY_RESNET = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16,
                                               "head_width": 64}}
UNSUPPORTED = {
    "timm_tower": (dict(base="clipkit-nano-timm"), "image tower is TimmModel"),
    "resnet_tower": (dict(vision_cfg=TINY_RESNET["vision_cfg"]), "image tower is ModifiedResNet"),
    "avg_pool": (dict(vision_cfg__pool_type="avg"), "pools with 'avg'"),
    "attentional_pool": (dict(vision_cfg__attentional_pool=True, vision_cfg__attn_pooler_heads=2),
                         "attentional pooling"),
    "no_ln_pre": (dict(vision_cfg__no_ln_pre=True), "no_ln_pre"),
    "qk_norm": (dict(vision_cfg__qk_norm=True), "CustomResidualAttentionBlock"),
    "bidirectional_text": (dict(text_cfg__no_causal_mask=True), "bidirectional"),
    "last_token_pool": (dict(text_cfg__pool_type="last"), "pools with 'last'"),
    "text_proj_bias": (dict(text_cfg__proj_bias=True), "projection has a bias"),
    "logit_bias": (dict(init_logit_bias=-10.0), "logit bias"),
    "custom_tokenizer": (dict(text_cfg__tokenizer_kwargs={"clean": "whitespace"}), "tokenizer_kwargs"),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_architectures_raise_one_clear_line(name, tmp_path):
    changes, reason = UNSUPPORTED[name]
    model, cfg = _variant(name, **changes)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        export_hf(model, name, cfg, out)
    message = str(err.value)
    assert reason in message and "\n" not in message and "transformers" in message
    assert not out.exists()  # refused before anything is written


def test_cli_refuses_a_timm_checkpoint_with_the_reason(tmp_path, capsys):
    model = create_model("clipkit-nano-timm")
    weights = save_weights(model.state_dict(), tmp_path / "timm.safetensors", "clipkit-nano-timm",
                           get_model_config("clipkit-nano-timm"))
    assert cli_main(["export", "--checkpoint", str(weights), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TimmModel" in err and err.startswith("clipkit: error:")


def test_tokenizer_files_are_open_clips_vocabulary(trained_run):
    vocab = json.loads((Path(trained_run["export"]["config"]).parent / "vocab.json").read_text())
    bpe = _open_clip_tokenizer(77)
    assert len(vocab) == len(bpe.encoder) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert get_tokenizer("clipkit-nano")(["hello world"]).tolist()[0][:4] == [49406, vocab["hello</w>"],
                                                                              vocab["world</w>"], 49407]
