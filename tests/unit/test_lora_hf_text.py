"""LoRA on a Hugging Face text tower (`finetune.lora.text=true` on an open_clip CustomTextCLIP whose text tower is
an HFTextEncoder): the adapters go inside the Hugging Face encoder (`text.transformer`), their targets chosen from
it, and they cover the tower as the image tower's do (counted from the layers peft really wrapped)."""
import open_clip
import pytest
import torch
from torch import nn

from clipkit.finetune.model import ImageClassifier, add_lora, merge_lora, set_trainable, trainable_by_tower

from test_finetune_defaults import _weights_by_hand


@pytest.fixture
def hf_text_clip(tmp_path):
    """clipkit-nano's image tower with a BERT-like text tower built from a config saved here (random weights)."""
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32).save_pretrained(tmp_path / "bert")
    cfg = open_clip.get_model_config("clipkit-nano")
    text_cfg = {"hf_model_name": str(tmp_path / "bert"), "hf_model_pretrained": False, "hf_proj_type": "linear",
                "hf_pooler_type": "cls_pooler", "context_length": 16}
    torch.manual_seed(0)
    return open_clip.model.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], text_cfg)


def test_lora_text_adapts_the_hugging_face_encoder_and_covers_it(hf_text_clip):
    from peft.tuners.lora import LoraLayer

    model = ImageClassifier(hf_text_clip, 3).eval()  # eval: BERT's dropout off, so encodings compare
    set_trainable(model)
    tokens = torch.randint(1, 100, (4, 16))
    with torch.no_grad():
        before = model.clip.encode_text(tokens)
    chosen = add_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=None, text=True, min_coverage=0.5)

    assert chosen["text"]["architecture"] == "hf"
    assert {"query", "key", "value", "dense"} <= set(chosen["text"]["targets"])
    encoder = model.clip.text.base_model.model.transformer  # the HFTextEncoder's Hugging Face model, under peft
    inside = {id(m) for m in encoder.modules()}
    wrapped = [(name, m) for name, m in model.clip.named_modules() if isinstance(m, LoraLayer)]
    text_wrapped = [name for name, m in wrapped if name.startswith("text.")]
    assert text_wrapped and all(id(m) in inside for name, m in wrapped if name.startswith("text."))
    # coverage from the layers peft wrapped, against every Linear / Conv weight of the text tower
    adapted, total = _weights_by_hand(model.clip.text)
    assert adapted / total >= 0.5
    assert chosen["text"]["coverage"] == pytest.approx(adapted / total)
    assert len(text_wrapped) == chosen["text"]["modules"]

    # only the adapters train in the text tower, and they count there
    towers = trainable_by_tower(model)
    lora_text = sum(p.numel() for n, p in model.clip.text.named_parameters() if "lora_" in n)
    assert towers["text"]["trainable"] == lora_text > 0
    # LoRA's B starts at zero: the adapted tower encodes as before, and merged it is a plain HFTextEncoder again
    with torch.no_grad():
        assert torch.allclose(model.clip.encode_text(tokens), before, atol=1e-6)
    merged = merge_lora(model)
    assert type(merged.clip.text).__name__ == "HFTextEncoder"
    assert not any(isinstance(m, LoraLayer) for m in merged.clip.modules())
    with torch.no_grad():
        assert torch.allclose(merged.clip.encode_text(tokens), before, atol=1e-6)


def test_open_clip_text_targets_on_a_hugging_face_text_tower_are_refused(hf_text_clip):
    from clipkit.errors import UserError

    model = ImageClassifier(hf_text_clip, 3)
    set_trainable(model)
    # open_clip's transformer names match nothing inside BERT (the image tower, a ViT, would accept them)
    with pytest.raises(UserError, match=r"text tower's Linear/Conv weights \(hf: matched nothing\)"):
        add_lora(model, 2, 4.0, 0.0, ["attn", "c_fc", "c_proj"], text=True, min_coverage=0.5)
    assert not any(isinstance(m, nn.Module) and "lora_" in n for n, m in model.named_modules())
