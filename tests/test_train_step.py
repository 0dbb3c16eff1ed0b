"""The training step's switches: exact contrastive gradient accumulation, bf16, checkpointing, FLIP, LiT."""
import pytest
import torch

from clipkit.config import load_config
from clipkit.distributed import DistEnv
from clipkit.losses import create_loss
from clipkit.training.engine import TorchEngine
from clipkit.training.step import ContrastiveStep
from clipkit.training.trainer import build_model


def _setup(*overrides, loss="infonce"):
    cfg = load_config(None, ["model.name=clipkit-nano", "train.batch_size=16", f"train.loss={loss}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    engine = TorchEngine(model, cfg, DistEnv())
    return cfg, model, engine


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 49000, (n, 16), generator=g)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_gradients_equal_the_full_batch(loss, accum):
    images, tokens = _batch()
    cfg, model, engine = _setup(loss=loss)
    full_loss = ContrastiveStep(engine, create_loss(loss)).compute_gradients(images, tokens)
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    acc_loss = ContrastiveStep(engine, create_loss(loss), accum_steps=accum).compute_gradients(images, tokens)
    acc = _grads(model)
    assert acc_loss == pytest.approx(full_loss, rel=1e-6)
    assert full.keys() == acc.keys() and "logit_scale" in acc
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    if loss == "siglip":
        assert "logit_bias" in acc


def test_naive_micro_batch_sum_would_differ():
    """The reference above is not trivially satisfied: per-chunk losses give other gradients."""
    images, tokens = _batch()
    cfg, model, engine = _setup()
    step = ContrastiveStep(engine, create_loss("infonce"))
    step.compute_gradients(images, tokens)
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    for i in range(2):
        step.compute_gradients(images[i * 8:(i + 1) * 8], tokens[i * 8:(i + 1) * 8])
    naive = _grads(model)
    assert not torch.allclose(naive["visual.proj"] / 2, full["visual.proj"], atol=1e-5)


def test_accumulation_replays_patch_dropout_identically():
    images, tokens = _batch()
    cfg, model, engine = _setup("model.patch_dropout=0.5")
    torch.manual_seed(5)
    ContrastiveStep(engine, create_loss("infonce"), accum_steps=2).compute_gradients(images, tokens)
    acc = _grads(model)
    model.zero_grad(set_to_none=True)
    # reference: the same random patch choices, drawn chunk by chunk, in one autograd graph
    torch.manual_seed(5)
    outs = [model(images[i * 8:(i + 1) * 8], tokens[i * 8:(i + 1) * 8]) for i in range(2)]
    loss = create_loss("infonce")(torch.cat([o["image_features"] for o in outs]),
                                  torch.cat([o["text_features"] for o in outs]), outs[0]["logit_scale"])
    loss.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(acc[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_patch_dropout_changes_training_forward_only():
    cfg, model, _ = _setup("model.patch_dropout=0.5")
    images, tokens = _batch(4)
    model.train()
    a, b = model(images, tokens)["image_features"], model(images, tokens)["image_features"]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(images, tokens)["image_features"], model(images, tokens)["image_features"])


def test_lit_locks_the_image_tower():
    cfg, model, engine = _setup("model.lock_image=true")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("visual.") for n in frozen)
    images, tokens = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ContrastiveStep(engine, create_loss("infonce"))(images, tokens)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == p.requires_grad or n == "logit_scale", n


def test_lit_unlocked_groups_stay_trainable():
    _, model, _ = _setup("model.lock_image=true", "model.lock_image_unlocked_groups=1")
    trainable_visual = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual.")]
    assert trainable_visual and any("ln_post" in n or "proj" in n for n in trainable_visual)


def test_grad_checkpointing_gives_the_same_gradients():
    images, tokens = _batch()
    _, model, engine = _setup()
    ContrastiveStep(engine, create_loss("infonce")).compute_gradients(images, tokens)
    plain = _grads(model)
    _, model_ckpt, engine_ckpt = _setup("model.grad_checkpointing=true")
    assert model_ckpt.transformer.grad_checkpointing
    ContrastiveStep(engine_ckpt, create_loss("infonce")).compute_gradients(images, tokens)
    for name, g in _grads(model_ckpt).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_step_runs_and_stays_close_to_fp32():
    images, tokens = _batch()
    _, model, engine = _setup()
    fp32 = ContrastiveStep(engine, create_loss("infonce")).compute_gradients(images, tokens)
    _, model16, engine16 = _setup("train.precision=bf16")
    bf16 = ContrastiveStep(engine16, create_loss("infonce"), autocast_dtype=torch.bfloat16).compute_gradients(images, tokens)
    assert abs(bf16 - fp32) < 0.05 * fp32
    assert all(p.dtype == torch.float32 for p in model16.parameters())  # fp32 master weights
