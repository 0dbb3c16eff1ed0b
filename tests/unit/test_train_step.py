"""The training step's switches: exact contrastive gradient accumulation, bf16, checkpointing, FLIP, LiT."""
import pytest
import torch

from clipkit.config import load_config
from clipkit.distributed import DistEnv
from clipkit.losses import create_loss
from clipkit.models import get_model_config
from clipkit.training.engine import build_engine
from clipkit.training.step import ContrastiveStep
from clipkit.training.trainer import build_model


def _setup(*overrides, loss="infonce"):
    cfg = load_config(None, ["model.name=clipkit-nano", "train.global_batch_size=16", f"train.loss={loss}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    engine = build_engine(cfg, model, DistEnv(), "clipkit-nano", get_model_config("clipkit-nano"))
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
    bf16 = ContrastiveStep(engine16, create_loss("infonce")).compute_gradients(images, tokens)  # the engine autocasts
    assert bf16 != fp32  # the engine really ran the forward under bf16 autocast
    assert abs(bf16 - fp32) < 0.05 * fp32
    assert all(p.dtype == torch.float32 for p in model16.parameters())  # fp32 master weights


def test_fp16_autocast_with_loss_scaling_steps_and_checkpoints_its_scale(tmp_path):
    """fp16: the loss is scaled in the backward, an overflowing step is skipped and the scale halved (as
    GradScaler does), gradients are unscaled before clipping and the update: the first real update goes
    the way the fp32 one does. The scale is part of the checkpoint."""
    import warnings

    images, tokens = _batch()
    _, model, engine = _setup("train.lr=1e-3", "train.warmup_steps=0")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ContrastiveStep(engine, create_loss("infonce"))(images, tokens)
    _, model16, engine16 = _setup("train.precision=fp16", "train.lr=1e-3", "train.warmup_steps=0")
    assert engine16.scaler is not None and engine16.scaler.get_scale() == 2.0 ** 16
    step = ContrastiveStep(engine16, create_loss("infonce"))
    scales = []
    with warnings.catch_warnings():  # torch notes the schedule stepping while an overflow skips the update
        warnings.filterwarnings("ignore", message="Detected call of")
        for _ in range(30):
            scales.append(engine16.scaler.get_scale())
            step(images, tokens)
            if any(not torch.equal(p, start[n]) for n, p in model16.named_parameters()):
                break
    moved = {n for n, p in model16.named_parameters() if not torch.equal(p, start[n])}
    assert moved, f"no update in 30 steps; scales {scales}"
    assert scales == sorted(scales, reverse=True)  # skipped steps only ever lowered the scale
    ref = dict(model.named_parameters())
    names = sorted(moved)
    update16 = torch.cat([(dict(model16.named_parameters())[n] - start[n]).flatten() for n in names])
    update32 = torch.cat([(ref[n].detach() - start[n]).flatten() for n in names])
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) > 0.9
    assert all(p.dtype == torch.float32 for p in model16.parameters())  # fp32 master weights
    engine16.save_state(tmp_path)
    assert torch.load(tmp_path / "optimizer.pt", weights_only=True)["grad_scaler"]["scale"] == engine16.scaler.get_scale()
    _, _, fresh = _setup("train.precision=fp16")
    fresh.load_state(tmp_path)
    assert fresh.scaler.get_scale() == engine16.scaler.get_scale()


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_optimizer_impls_give_torchs_one_tensor_at_a_time_update(impl, tmp_path):
    """train.optimizer_impl: the fused (the default) and multi-tensor AdamW make the update of torch's
    reference implementation (one tensor at a time) up to float rounding, step after step (warm-up, decay,
    clipping), and their state continues in the other: a checkpoint written with one loads into another.
    Both optimizers get the very same gradients each step (computed once, copied): were each model to compute
    its own, the first update's rounding difference (~1e-9) would change the next gradients by as little, and
    Adam's normalised update turns such a change in a near-zero gradient into a difference of up to the
    learning rate (seen at one thread in the token embedding), which is not the optimizer's doing."""
    assert load_config(None, []).train.optimizer_impl == "fused"
    runs = {}
    for name in (impl, "for_loop"):
        _, model, engine = _setup(f"train.optimizer_impl={name}", "train.lr=1e-3", "train.warmup_steps=2")
        expected = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[name]
        assert all(engine.optimizer.defaults[k] == v for k, v in expected.items())
        runs[name] = (model, engine)
    (model, engine), (ref, ref_engine) = runs[impl], runs["for_loop"]
    start = [p.detach().clone() for p in ref.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start))  # the same initial weights
    step = ContrastiveStep(ref_engine, create_loss("infonce"))
    for i in range(4):
        step.compute_gradients(*_batch(seed=10 + i))
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad = q.grad.clone()
        assert engine.step(apply=True) and ref_engine.step(apply=True)  # clipping, update, schedule
    assert max((q - s).abs().max().item() for q, s in zip(ref.parameters(), start)) > 1e-3  # the steps moved it
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    engine.save_state(tmp_path)
    _, other_model, other = _setup("train.optimizer_impl=for_loop", "train.lr=1e-3", "train.warmup_steps=2")
    other.load_state(tmp_path)
    for key, state in engine.optimizer.state_dict()["state"].items():
        loaded = other.optimizer.state_dict()["state"][key]
        assert torch.equal(state["exp_avg"], loaded["exp_avg"]) and torch.equal(state["exp_avg_sq"], loaded["exp_avg_sq"])
        assert float(state["step"]) == float(loaded["step"]) == 4
