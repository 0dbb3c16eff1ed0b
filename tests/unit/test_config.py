import pytest
import yaml

from clipkit.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config


def test_defaults_load_and_have_documented_keys():
    cfg = load_config()
    assert isinstance(cfg, Config)
    # keys that docs and scripts rely on
    assert cfg.data.train is None and cfg.model.name == "clipkit-tiny-rn"
    assert cfg.train.global_batch_size > 0 and cfg.train.steps > 0 and cfg.train.lr > 0
    assert cfg.run.dir


def test_yaml_then_dotted_overrides(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  global_batch_size: 32\n  lr: 5e-4\nmodel:\n  name: RN50\n")
    cfg = load_config(f, ["train.global_batch_size=64", "model.name=ViT-B-32", "data.train=a/{0..3}.tar",
                          "train.grad_clip=null", "run.progress=false", "train.lr=2e-3"])
    assert cfg.train.global_batch_size == 64
    assert cfg.model.name == "ViT-B-32"
    assert cfg.data.train == "a/{0..3}.tar"
    assert cfg.train.grad_clip is None
    assert cfg.run.progress is False
    assert cfg.train.lr == pytest.approx(2e-3)
    # untouched keys keep the file's or the default's value
    assert cfg.train.warmup_steps == load_config().train.warmup_steps


def test_yaml_float_without_dot_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string
    assert load_config(f).train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, key", [
    (["train.batch_sise=3"], "train.batch_sise"),
    (["nope.x=1"], "nope"),
    (["data.synth.colour=red"], "data.synth.colour"),
])
def test_unknown_keys_are_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, override)


@pytest.mark.parametrize("override, key", [
    (["train.global_batch_size=big"], "train.global_batch_size"),
    (["train.steps=1.5"], "train.steps"),
    (["run.progress=3"], "run.progress"),
    (["model.name=null"], "model.name"),
    (["train=5"], "train"),
])
def test_wrong_types_are_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, override)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7", "data.train=x.tar"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("override, key", [
    ("run.log_every=0", "run.log_every"),
    ("train.lr=-1", "train.lr"),
    ("train.tile_size=0", "train.tile_size"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("train.warmup_steps=-5", "train.warmup_steps"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("export.format=onnx-nope", "export.format"),
    ("train.loss=clip", "train.loss"),
    ("train.precision=fp8", "train.precision"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("data.synth.image_size=0", "data.synth.image_size"),
    ("deepspeed.config=/no/such/ds.json", "deepspeed.config"),
])
def test_bad_values_are_rejected_before_anything_runs_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_each_default_lives_in_one_place():
    """The defaults are the dataclasses' own: no YAML of defaults to disagree with them, and the values
    components would otherwise default to come from the components' constants."""
    from clipkit.data import DEFAULT_MAX_IMAGE_PIXELS
    from clipkit.losses import LOSS_NAMES
    from clipkit.losses.tiled import DEFAULT_TILE_SIZE

    cfg = load_config()
    assert config_to_dict(cfg) == config_to_dict(Config())
    assert cfg.train.tile_size == DEFAULT_TILE_SIZE and cfg.data.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert cfg.train.loss in LOSS_NAMES


def test_renamed_key_names_its_new_name():
    with pytest.raises(ConfigError, match="'train.batch_size' is now 'train.global_batch_size"):
        load_config(None, ["train.batch_size=64"])
