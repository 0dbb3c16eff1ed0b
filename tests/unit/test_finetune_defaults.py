"""`clipkit finetune` with the defaults on a task drawn here (textures in an ImageFolder, not the built-in set):
LoRA targets chosen per architecture and covering the tower (checked against the modules peft really adapted),
schedules and early stopping in optimizer steps (read back from metrics.jsonl), and finetune.lr=auto (an LR
search on val: deterministic for a seed, blind to the test split, and beating zero-shot widely)."""
import json
import shutil
from pathlib import Path

import open_clip
import pytest
from torch import nn

from clipkit.errors import UserError
from clipkit.finetune.model import ImageClassifier, add_lora, set_trainable
from clipkit.finetune.run import main as finetune_main
from clipkit.models import create_model, save_weights

from drawn_task import write_texture_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """6 texture classes, 30 train / 10 val / 20 test images each (half the issue's small task)."""
    return write_texture_task(tmp_path_factory.mktemp("task"), per_class=(30, 10, 20), seed=1)


def _run(out, checkpoint, data, method, *overrides):
    rc = finetune_main(["--checkpoint", str(checkpoint), "--data", str(data), "--method", method, "--out", str(out),
                        "run.progress=false", "data.workers=0", "eval.batch_size=128", *overrides])
    assert rc == 0
    return json.loads((Path(out) / "result.json").read_text())


def _weights_by_hand(tower: nn.Module) -> tuple[int, int]:
    """(weights of the layers peft adapted, weights of every Linear/Conv layer and attention input projection),
    read from the adapted tower: a LoRA layer holds the original as base_layer."""
    from peft.tuners.lora import LoraLayer

    def weights(module: nn.Module) -> int:
        if isinstance(module, nn.MultiheadAttention):
            return module.in_proj_weight.numel() + module.out_proj.weight.numel()
        return module.weight.numel()

    adapted = total = 0
    for name, module in tower.named_modules():
        if "base_layer" in name.split(".") or any(part.startswith("lora_") for part in name.split(".")):
            continue  # inside an adapted layer (its original, its adapters; peft's attention wraps its out_proj)
        if isinstance(module, LoraLayer):
            adapted += weights(module.base_layer)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            total += module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention):
            total += module.in_proj_weight.numel()  # its out_proj is a Linear, counted on its own
    # an adapted layer's own weights are not in `total` yet (the walk skipped its base_layer)
    return adapted, total + adapted


@pytest.mark.parametrize("name", ["clipkit-tiny-rn", "clipkit-tiny", "clipkit-nano-timm"])
def test_auto_lora_targets_cover_the_tower(name):
    model = ImageClassifier(create_model(name), 3)
    set_trainable(model)
    chosen = add_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=None, min_coverage=0.5)
    adapted, total = _weights_by_hand(model.clip.visual)
    assert adapted / total >= 0.5
    assert chosen["image"]["coverage"] == pytest.approx(adapted / total)
    # the tower's kind decides the names: ResNet convolutions and attention pool, ViT attention and MLP, timm's own
    expected = {"clipkit-tiny-rn": ("resnet", {"conv1", "q_proj", "c_proj"}),
                "clipkit-tiny": ("vit", {"attn", "c_fc", "c_proj"}),
                "clipkit-nano-timm": ("timm", {"qkv", "fc1", "fc2"})}[name]
    assert chosen["image"]["architecture"] == expected[0] and expected[1] <= set(chosen["image"]["targets"])


def test_auto_lora_targets_cover_a_hugging_face_text_tower():
    from open_clip.hf_model import HFTextEncoder
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig

    from clipkit.finetune.lora_targets import auto_targets, coverage

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    tower = HFTextEncoder("bert-base-uncased", output_dim=16, config=config, pooler_type="cls_pooler",
                          proj_type="linear", pretrained=False)  # built from the config: nothing is downloaded
    targets = auto_targets(tower)
    assert {"query", "key", "value", "dense"} <= set(targets)
    share, _ = coverage(tower, targets)
    adapted = get_peft_model(tower, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    by_hand, total = _weights_by_hand(adapted)
    assert by_hand / total >= 0.5 and share == pytest.approx(by_hand / total)


def test_vit_targets_on_a_resnet_are_refused_in_one_line(task, tmp_path, capsys):
    from clipkit.cli import main

    model = create_model("clipkit-tiny-rn")
    weights = save_weights(model.state_dict(), tmp_path / "rn.safetensors", "clipkit-tiny-rn",
                           open_clip.get_model_config("clipkit-tiny-rn"))
    # the old default names a ViT's modules: on a ResNet it matches the attention pool's output projection alone
    assert main(["finetune", "--checkpoint", str(weights), "--data", str(task), "--method", "lora",
                 "--out", str(tmp_path / "x"), "run.progress=false", "data.workers=0", "finetune.lr=1e-3",
                 "finetune.lora.targets=attn,c_fc,c_proj"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipkit: error:") and "\n" not in err
    conv_and_linear = {n: m.weight.numel() for n, m in model.visual.named_modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d))}
    share = conv_and_linear["attnpool.c_proj"] / sum(conv_and_linear.values())
    assert "attnpool.c_proj" in err and f"{100 * share:.2f}%" in err and "finetune.lora.targets" in err
    assert not (tmp_path / "x" / "result.json").exists()


def test_early_stopping_waits_for_warmup_and_min_steps_and_validates_by_steps(trained_nano, task, tmp_path):
    checkpoint, _ = trained_nano
    # an LR far too small to change a prediction: val acc1 is best at the first validation (step 3), so a
    # patience of 3 steps would stop at step 6, but no stop comes before warm-up (4) + min_steps (6) = 10
    result = _run(tmp_path / "stop", checkpoint, task, "full", "finetune.global_batch_size=32", "finetune.epochs=50",
                  "finetune.lr=1e-12", "finetune.head_lr=1e-12", "finetune.warmup_steps=4", "finetune.min_steps=6",
                  "finetune.val_every=3", "finetune.patience_steps=3", "finetune.augment=false", "run.log_every=1")
    assert result["stopped_early"] and result["steps"] == 12 and result["best_step"] == 3
    assert [h["step"] for h in result["history"]] == [3, 6, 9, 12]
    lines = [json.loads(line) for line in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines if "val" in rec] == [3, 6, 9, 12]
    assert max(rec["step"] for rec in lines) == 12
    # 180 images are 5 steps of 32 an epoch: 12 steps ran into a third epoch
    assert result["epochs_run"] == 3


def test_a_small_set_trains_at_least_warmup_plus_min_steps(trained_nano, task, tmp_path):
    checkpoint, _ = trained_nano
    result = _run(tmp_path / "short", checkpoint, task, "full", "finetune.global_batch_size=32", "finetune.epochs=1",
                  "finetune.lr=1e-3", "finetune.warmup_steps=4", "finetune.min_steps=8", "finetune.val_every=5",
                  "finetune.patience_steps=0")
    # one epoch is 5 steps; the run still takes warm-up + min_steps = 12, over 3 epochs, validating at 5, 10, 12
    assert result["steps"] == 12 and result["epochs_run"] == 3 and not result["stopped_early"]
    assert [h["step"] for h in result["history"]] == [5, 10, 12]


SEARCH = ["finetune.lr_search.lrs=1e-4,1e-3,1e-2", "finetune.lr_search.steps=8", "finetune.global_batch_size=32",
          "finetune.epochs=1", "finetune.min_steps=0", "finetune.warmup_steps=2"]


def test_lr_search_is_deterministic_and_never_sees_test(trained_nano, task, tmp_path):
    checkpoint, _ = trained_nano
    first = _run(tmp_path / "a", checkpoint, task, "full", *SEARCH)
    again = _run(tmp_path / "b", checkpoint, task, "full", *SEARCH)
    search = first["lr_search"]
    assert [t["lr"] for t in search["trials"]] == [1e-4, 1e-3, 1e-2]
    assert all(t["steps"] == 8 for t in search["trials"])
    assert again["lr_search"] == search  # the same choice and the same val figures, bit for bit
    best = max(search["trials"], key=lambda t: (t["val_acc1"], -t["val_loss"]))
    assert first["lr"] == search["lr"] == best["lr"] and first["head_lr"] == pytest.approx(10 * best["lr"])
    assert search["at_edge"] == (best["lr"] in (1e-4, 1e-2))
    # the test split's labels scrambled (every image moved to the next class's folder): the search is unchanged
    scrambled = tmp_path / "scrambled"
    shutil.copytree(task, scrambled, ignore=shutil.ignore_patterns("test"))
    classes = sorted(p.name for p in (task / "test").iterdir())
    for i, name in enumerate(classes):
        shutil.copytree(task / "test" / name, scrambled / "test" / classes[(i + 1) % len(classes)])
    other = _run(tmp_path / "c", checkpoint, scrambled, "full", *SEARCH)
    assert other["lr_search"] == search
    assert other["test"]["acc1"] != first["test"]["acc1"]  # the test split did change


@pytest.mark.parametrize("method", ["full", "lora"])
def test_defaults_beat_zeroshot_widely(trained_nano, task, tmp_path, method):
    checkpoint, _ = trained_nano
    # the defaults (LR searched over the default grid, head LR ratio, warm-up, validation cadence, patience,
    # batch size, LoRA targets chosen from the model), with shorter lengths to keep this test fast: the full-length
    # figures are in docs/finetune.md
    result = _run(tmp_path / method, checkpoint, task, method, "finetune.lr_search.steps=20", "finetune.min_steps=60",
                  "finetune.val_every=20")
    zeroshot = result["zeroshot"]["test"]["acc1"]
    assert zeroshot < 0.3  # textures no pretraining caption names: near chance (1/6)
    assert result["test"]["acc1"] >= zeroshot + 0.3, (result["test"], result["lr_search"])
    towers = result["trainable_by_tower"]
    visual = sum(p.numel() for p in create_model("clipkit-nano").visual.parameters())
    if method == "lora":
        # nano's ViT tower, auto targets attn, c_fc, c_proj: rank 8 adapters on every block's 4 layers
        lora = 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
        assert result["lora_targets"]["image"]["targets"] == ["attn", "c_fc", "c_proj"]
        assert towers["image"]["trainable"] == lora and towers["image"]["total"] == visual + lora
    else:
        assert towers["image"]["trainable"] == towers["image"]["total"] == visual
    assert towers["text"]["trainable"] == 0 and towers["head"]["trainable"] == 6 * 33
    assert towers["image"]["fraction"] == pytest.approx(towers["image"]["trainable"] / towers["image"]["total"])


def test_summary_line_names_the_fraction_per_tower_and_the_searched_lr():
    from clipkit.finetune.run import summary_line

    result = {"method": "lora", "zeroshot": {"test": {"acc1": 0.2}}, "test": {"acc1": 0.9, "mean_per_class_recall": 0.9},
              "trainable_params": 10, "total_params": 1000, "trainable_fraction": 0.01, "lr": 0.003,
              "lr_search": {}, "trainable_by_tower": {"image": {"fraction": 0.02}, "text": {"fraction": 0.0},
                                                      "head": {"fraction": 1.0}}}
    line = summary_line(result)
    assert "image 2.00%, text 0.00%, head 100.00%" in line and "lr 0.003 (searched on val)" in line
    with pytest.raises(UserError, match="leave finetune.lora.targets unset"):
        add_lora(ImageClassifier(create_model("clipkit-tiny-rn"), 2), 2, 4.0, 0.0, ["c_fc"], min_coverage=0.5)
