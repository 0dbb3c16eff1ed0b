"""The fsdp config section: checked before anything runs, one line naming the key."""
import pytest

from clipkit.config import ConfigError, load_config
from clipkit.training.engine import engine_class


def test_fsdp_and_deepspeed_together_are_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["fsdp.enabled=true", "deepspeed.enabled=true"])
    message = str(info.value)
    assert "\n" not in message and "'fsdp.enabled'" in message and "deepspeed.enabled" in message


def test_fsdp_param_dtype_must_agree_with_train_precision():
    with pytest.raises(ConfigError, match="'fsdp.param_dtype'.*train.precision=fp16"):
        load_config(None, ["fsdp.enabled=true", "fsdp.param_dtype=bf16", "train.precision=fp16"])
    # an fp32 run may ask for bf16 parameters in FSDP2's policy; null follows train.precision
    assert load_config(None, ["fsdp.param_dtype=bf16"]).fsdp.param_dtype == "bf16"
    assert load_config(None, ["train.precision=bf16"]).fsdp.param_dtype is None


def test_compile_is_taken_under_fsdp2():
    """train.compile=model compiles the blocks under FSDP2 too (tests/process/test_compile_ddp.py runs it)."""
    cfg = load_config(None, ["fsdp.enabled=true", "train.compile=model"])
    assert cfg.fsdp.enabled and cfg.train.compile == "model"


def test_fsdp_enabled_picks_the_fsdp2_engine():
    from clipkit.training.fsdp import FSDP2Engine

    assert engine_class(load_config(None, ["fsdp.enabled=true"])) is FSDP2Engine
    assert engine_class(load_config(None, [])).name == "torch"
    # DCP's metadata is pickled: only checkpoints this installation signed are loaded
    assert FSDP2Engine.unpickles_on_load and FSDP2Engine.resumes_on_other_world_sizes


def test_every_transformer_block_and_resnet_stage_of_both_towers_is_a_unit():
    """What fully_shard wraps before the root: counted against the architectures' configs by hand."""
    from clipkit.models import create_model
    from clipkit.training.fsdp import shard_units

    vit = create_model("clipkit-nano")  # 2 image blocks, 2 text blocks
    units = shard_units(vit)
    assert len(units) == 4 and {id(u) for u in units} == {
        id(b) for b in [*vit.visual.transformer.resblocks, *vit.transformer.resblocks]}
    rn = create_model("clipkit-tiny-rn")  # ResNet stages layer1..layer4, 2 text blocks
    units = shard_units(rn)
    stages = [getattr(rn.visual, f"layer{i}") for i in range(1, 5)]
    assert {id(u) for u in units} == {id(m) for m in [*stages, *rn.transformer.resblocks]}


def test_mixed_precision_policy_follows_the_dtypes_asked_for():
    import torch

    from clipkit.training.fsdp import mixed_precision

    plain = mixed_precision("fp32", "fp32")
    assert plain.param_dtype is None and plain.reduce_dtype is None  # fp32 throughout: nothing is cast
    bf16 = mixed_precision("bf16", "fp32")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    fp16 = mixed_precision("fp16", "bf16")
    assert fp16.param_dtype == torch.float16 and fp16.reduce_dtype == torch.bfloat16
