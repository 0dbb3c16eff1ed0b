"""Exact text truncation (model.trim_text): the text tower run only up to the batch's longest caption gives
open_clip's own features and gradients, checked against an untouched open_clip CLIP holding the same weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from clipkit.config import load_config
from clipkit.distributed import DistEnv
from clipkit.losses import create_loss
from clipkit.models import (TrimmedTextCLIP, create_model, get_model_config, get_tokenizer, set_text_trimming,
                            text_trimming)
from clipkit.training.engine import build_engine
from clipkit.training.step import ContrastiveStep
from clipkit.training.trainer import build_model
from dist.torchrun import run_torchrun
from helpers import DIST

TRIM_STEP = DIST / "trim_step.py"

MIXED = ["a dog", "a photo of a red car parked next to a tall building in the rain at night",
         "two cats", "an old wooden boat on a lake", "sunset"]
FULL = MIXED[:3] + [" ".join(f"word{i}" for i in range(120))]  # tokenised to 77 ids, eot last


def _arch(tmp_path, **text_cfg) -> str:
    """A small architecture at CLIP's context length 77 (a JSON path, as model.name accepts)."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                           "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, **text_cfg}}
    name = "trim-" + "-".join(f"{k}{v}" for k, v in sorted(text_cfg.items())).replace("_", "")
    path = tmp_path / f"{name.rstrip('-')}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _pair(arch: str):
    """(clipkit's model, open_clip's untouched CLIP with the same weights)."""
    torch.manual_seed(0)
    ours = create_model(arch)
    name = arch.rsplit("/", 1)[-1][:-len(".json")]  # create_model registered the file under its stem
    ref = open_clip.create_model(name, pretrained=None, output_dict=True)
    ref.load_state_dict(ours.state_dict())
    assert type(ref) is open_clip.CLIP
    return ours, ref


def _tokens(captions):
    return open_clip.get_tokenizer("ViT-B-32")(captions)


def _lengths_run(model):
    """The sequence lengths the text transformer is run at, recorded as the model runs."""
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]),
                                                with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    return _arch(tmp_path_factory.mktemp("arch"))


@pytest.mark.parametrize("captions, length", [(MIXED, None), (FULL, 77)], ids=["mixed", "one-fills-77"])
def test_embeddings_equal_open_clips_encode_text(arch, captions, length, one_thread):
    ours, ref = _pair(arch)
    assert type(ours) is TrimmedTextCLIP and text_trimming(ours)
    tokens = _tokens(captions)
    expected = length or int(tokens.argmax(-1).max()) + 1
    assert expected == (77 if length else 19)  # the mixed batch: 17 words + sot + eot
    seen = _lengths_run(ours)
    with torch.no_grad():
        got, want = ours.encode_text(tokens), ref.encode_text(tokens)
    assert seen == [expected]  # cut at the longest caption: 19 of 77 positions (all 77 when one fills them)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(want[0], want[2], atol=1e-3)  # the captions do give different features


@pytest.mark.parametrize("captions", [MIXED, FULL], ids=["mixed", "one-fills-77"])
def test_gradients_equal_open_clips_forward_and_backward(arch, captions, one_thread):
    ours, ref = _pair(arch)
    tokens = _tokens(captions)
    images = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss_fn = open_clip.ClipLoss()
    losses = []
    for model in (ours, ref):
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    assert ours.positional_embedding.grad.abs().sum() > 0


def test_eos_pooling_is_trimmed_exactly_too(tmp_path, one_thread):
    ours, ref = _pair(_arch(tmp_path, pool_type="eos", eos_id=49407))
    assert text_trimming(ours)
    tokens = _tokens(MIXED)
    seen = _lengths_run(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(tokens), ref.encode_text(tokens), rtol=0, atol=1e-5)
    assert seen == [19]


@pytest.mark.parametrize("text_cfg, why", [({"no_causal_mask": True}, "bidirectional"),
                                           ({"pool_type": "last"}, "'last'"),
                                           ({"pool_type": "first"}, "'first'")])
def test_towers_where_cutting_is_not_exact_run_full_length(tmp_path, text_cfg, why, caplog, one_thread):
    caplog.set_level("INFO", logger="clipkit.models")
    ours, ref = _pair(_arch(tmp_path, **text_cfg))
    assert type(ours) is open_clip.CLIP and not text_trimming(ours)
    assert why in caplog.text
    seen = _lengths_run(ours)
    tokens = _tokens(MIXED)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(tokens), ref.encode_text(tokens), rtol=0, atol=0)
    assert seen == [77]


def test_custom_text_towers_run_full_length(tmp_path, one_thread):
    """CustomTextCLIP (Hugging Face and custom text towers) keeps its own encode_text."""
    arch = _arch(tmp_path)
    cfg = json.loads(open(arch).read())
    cfg["custom_text"] = True
    path = tmp_path / "trim-custom.json"
    path.write_text(json.dumps(cfg))
    model = create_model(str(path))
    assert type(model) is open_clip.CustomTextCLIP and not text_trimming(model)


def test_switching_off_and_on_keeps_the_weights(arch):
    ours, _ = _pair(arch)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    assert set_text_trimming(ours, False) is False and type(ours) is open_clip.CLIP
    assert set_text_trimming(ours, True) is True and type(ours) is TrimmedTextCLIP
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    assert type(create_model(arch, trim_text=False)) is open_clip.CLIP


def test_an_exported_graph_keeps_the_full_context(arch, one_thread):
    """Exported (torch.export, as the ONNX export does) on short captions, the graph still serves a caption
    that fills the context; tests/test_export_onnx.py checks the ONNX files themselves."""
    ours, ref = _pair(arch)
    ours.eval()

    class Text(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model.encode_text(ids)

    with torch.no_grad():
        graph = torch.export.export(Text(ours), (_tokens(MIXED[:4]),)).module()
        full = _tokens(FULL)
        torch.testing.assert_close(graph(full), ref.encode_text(full), rtol=0, atol=1e-5)


@pytest.mark.parametrize("accum", [1, 2])
def test_training_step_gradients_equal_with_trim_on_and_off(accum, one_thread):
    """clipkit's ContrastiveStep and engine (as the trainer builds them): the same loss and gradients."""
    captions = ["a dog", "two cats", "an old wooden boat on a lake", "sunset", "a blue house", "a bird",
                "a red car parked next to a building", "a cat", "trees", "a bridge over a river", "snow", "a tram"]
    tokens = get_tokenizer("clipkit-nano")(captions)  # its context is 16: these take 3-10 of them
    images = torch.randn(len(tokens), 3, 32, 32, generator=torch.Generator().manual_seed(2))
    results = []
    for trim in (True, False):
        cfg = load_config(None, ["model.name=clipkit-nano", "train.global_batch_size=12", f"model.trim_text={trim}"])
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        assert text_trimming(model) is trim
        engine = build_engine(cfg, model, DistEnv(), "clipkit-nano", get_model_config("clipkit-nano"))
        loss = ContrastiveStep(engine, create_loss("infonce"), accum_steps=accum).compute_gradients(images, tokens)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_on, on), (loss_off, off) = results
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    assert on.keys() == off.keys() and "positional_embedding" in on
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-5, msg=name)


def _trim_steps(out: Path, nproc: int, *overrides: str) -> dict:
    args = [str(out), "3", *overrides]
    if nproc > 1:
        run_torchrun(TRIM_STEP, nproc, *args, timeout=300)
    else:
        env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, str(TRIM_STEP), *args], capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine", [[], ["deepspeed.enabled=true", "deepspeed.zero_stage=3"]], ids=["ddp", "zero3"])
def test_two_ranks_with_trimmed_text_train_as_one_process_with_the_full_tower(arch, engine, tmp_path):
    """DDP and DeepSpeed ZeRO-3 call model(images, tokens): each rank cuts its text tower at its own longest
    caption, and three AdamW steps give the losses of one process running open_clip's untouched tower."""
    common = [f"model.name={arch}", "train.global_batch_size=8", "train.steps=3", "train.warmup_steps=0",
              "train.lr=1e-3", "run.seed=4"]
    full = _trim_steps(tmp_path / "full.json", 1, *common, "model.trim_text=false")
    trimmed = _trim_steps(tmp_path / "trimmed.json", 2, *common, *engine)
    assert set(full["lengths"][0]) == {77}
    per_rank = trimmed["lengths"]
    assert len(per_rank) == 2 and all(max(lengths) < 20 for lengths in per_rank) and per_rank[0] != per_rank[1]
    assert full["losses"][-1] != full["losses"][0]  # the weights do move between the steps compared
    for got, want in zip(trimmed["losses"], full["losses"], strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_model_flops_are_counted_at_the_full_context_while_trimming(one_thread):
    """MFU's numerator is the model's FLOPs: a trimming model is counted as open_clip's untouched model
    (FlopCounterMode by hand), and it keeps trimming afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipkit.models.flops import train_flops_per_sample

    trimmed = create_model("clipkit-nano")
    reference = create_model("clipkit-nano", trim_text=False)
    assert type(reference) is open_clip.CLIP
    counter = FlopCounterMode(display=False)
    with counter:
        tokens = torch.zeros(1, reference.context_length, dtype=torch.long)
        tokens[0, -1] = 49407  # the end-of-text token at the last position: the whole context is read
        (reference.encode_image(torch.zeros(1, 3, 32, 32)) @ reference.encode_text(tokens).T).sum().backward()
    assert train_flops_per_sample(trimmed, (32, 32), trimmed.context_length) == counter.get_total_flops()
    assert type(trimmed) is TrimmedTextCLIP and all(p.grad is None for p in trimmed.parameters())
