import pytest
import torch

from clipkit.models import MODEL_CONFIG_DIR, ModelNotFoundError, create_model, create_transforms, get_tokenizer, list_models

CLIPKIT_CONFIGS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def test_clipkit_configs_are_registered_with_open_clip():
    import open_clip

    assert CLIPKIT_CONFIGS and set(CLIPKIT_CONFIGS) <= set(open_clip.list_models())
    assert "ViT-B-32" in list_models() and "RN50" in list_models()


@pytest.mark.parametrize("name", [c for c in CLIPKIT_CONFIGS if c != "clipkit-tiny"] + ["clipkit-tiny"])
def test_every_clipkit_config_runs_forward_and_backward(name):
    model = create_model(name)
    train_tf, val_tf = create_transforms(model)
    tok = get_tokenizer(name)
    size = model.visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(3, 3, size, size)
    tokens = tok(["a red circle", "two blue squares on a white background", "a star"])
    out = model(images, tokens)
    img, txt = out["image_features"], out["text_features"]
    assert img.shape == txt.shape and img.shape[0] == 3
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    (img @ txt.T * out["logit_scale"]).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_open_clip_architecture_by_name_builds_without_download():
    model = create_model("RN50")
    assert model.visual.output_dim == 1024


def test_json_path_as_model_name(tmp_path):
    cfg = (MODEL_CONFIG_DIR / "clipkit-nano.json").read_text().replace('"embed_dim": 32', '"embed_dim": 24')
    path = tmp_path / "my-arch.json"
    path.write_text(cfg)
    model = create_model(str(path))
    assert model.text_projection.shape[-1] == 24


def test_unknown_model_gets_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99")
