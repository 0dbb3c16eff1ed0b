"""A checkpoint written by an earlier clipkit, whose saved config lacks keys added since, still resumes: a
missing key had its default in that run. A new key set away from its default is still a change."""
from clipkit.config import Config, config_to_dict, load_config
from clipkit.training.trainer import RESUMABLE_CHANGES, _with_defaults, config_changes


def _older(saved: dict) -> dict:
    """The config an earlier version saved: without the finetune section and a data.synth key."""
    saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    del saved["finetune"]
    saved["data"] = dict(saved["data"], synth={k: v for k, v in saved["data"]["synth"].items()
                                               if k != "downstream_train_samples"})
    return saved


def _changes(saved: dict, cfg) -> list[str]:
    filled = _with_defaults(config_to_dict(Config()), saved)
    return [k for k in config_changes(filled, config_to_dict(cfg)) if not k.startswith(RESUMABLE_CHANGES)]


def test_keys_missing_from_an_older_checkpoint_count_as_their_defaults():
    cfg = load_config(None, ["train.steps=7"])
    saved = _older(config_to_dict(cfg))
    assert "finetune" not in saved  # what the older version wrote
    assert config_changes(saved, config_to_dict(cfg))  # compared raw, the new keys would look changed
    assert _changes(saved, cfg) == []


def test_a_real_change_is_still_found():
    saved = _older(config_to_dict(load_config(None, ["train.steps=7"])))
    assert _changes(saved, load_config(None, ["train.steps=7", "train.lr=0.5"])) == ["train.lr"]
    # a key the older run lacked, set now away from its default, is a change too (when not resumable)
    assert _changes(saved, load_config(None, ["train.steps=7", "data.synth.downstream_train_samples=5"])) == []
    assert _changes({**saved, "model": {k: v for k, v in saved["model"].items() if k != "patch_dropout"}},
                    load_config(None, ["train.steps=7", "model.patch_dropout=0.5"])) == ["model.patch_dropout"]
