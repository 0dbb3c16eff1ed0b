"""Every config key has a value that is refused before anything runs, with one line naming the key: the table
below must cover every key of the config (a new key without an entry fails the coverage test)."""
import dataclasses

import pytest

from clipkit.config import Config, ConfigError, config_to_dict, load_config

# key -> an out-of-range (or ill-typed, for switches and free text) value
BAD = {
    "run.dir": "' '", "run.seed": "-1", "run.log_every": "0", "run.progress": "maybe",
    "run.record_sample_keys": "2", "run.report": "yes please",
    "data.train": "' '", "data.zeroshot": "' '", "data.retrieval": "' '", "data.train_weights": "1::x",
    "data.resampled": "often", "data.max_image_pixels": "0", "data.workers": "-1", "data.prefetch": "0",
    "data.normalize_on_device": "3", "data.shuffle_buffer": "-1", "data.image_key": "';'",
    "data.caption_key": "' '", "data.length_buckets": "[32,16]",
    "data.synth.out": "' '", "data.synth.train_samples": "0", "data.synth.eval_samples": "0",
    "data.synth.samples_per_shard": "0", "data.synth.image_size": "0", "data.synth.seed": "-3",
    "data.synth.downstream_train_samples": "0", "data.synth.downstream_test_samples": "-1",
    "model.name": "ViT-Q-99", "model.pretrained": "/no/such/model",
    "model.pretrained_image": "/no/such/tower.safetensors", "model.pretrained_text": "/no/such/text-model",
    "model.grad_checkpointing": "yes please", "model.trim_text": "often", "model.patch_dropout": "1.0",
    "model.lock_image": "[1]", "model.lock_image_unlocked_groups": "-1", "model.lock_image_freeze_bn_stats": "{}",
    "model.lock_text": "x", "model.lock_text_unlocked_layers": "-2",
    "train.global_batch_size": "0", "train.steps": "0", "train.lr": "0", "train.warmup_steps": "-1",
    "train.weight_decay": "-0.1", "train.beta1": "1.0", "train.beta2": "1.5", "train.eps": "0",
    "train.grad_clip": "0", "train.checkpoint_every": "0", "train.keep_checkpoints": "-1",
    "train.resume": "/no/such/checkpoint", "train.loss": "triplet", "train.local_loss": "sometimes",
    "train.tile_size": "0", "train.accum_steps": "0", "train.precision": "fp8", "train.optimizer_impl": "adam8bit", "train.max_nonfinite_steps": "0",
    "train.compile": "always", "train.compile_pad_text": "0",
    "train.stall_timeout_s": "-1",
    "eval.batch_size": "0", "eval.zeroshot_at_end": "nah", "eval.retrieval_at_end": "7", "eval.every": "-1",
    "export.format": "tflite", "export.at_end": "later",
    "deepspeed.enabled": "2", "deepspeed.zero_stage": "4", "deepspeed.config": "/no/such/ds.json",
    "fsdp.enabled": "2", "fsdp.param_dtype": "fp8", "fsdp.reduce_dtype": "int8", "fsdp.reshard_after_forward": "later",
    "fsdp.cpu_offload": "x",
    "dist.timeout_s": "0",
    "finetune.method": "prompt_tuning", "finetune.checkpoint": "/no/such/ck", "finetune.data": "/no/such/data",
    "finetune.val_fraction": "1.0", "finetune.epochs": "0", "finetune.global_batch_size": "0", "finetune.lr": "0",
    "finetune.head_lr": "-1", "finetune.warmup_steps": "-1", "finetune.weight_decay": "-1",
    "finetune.layer_decay": "1.5", "finetune.label_smoothing": "1.0", "finetune.augment": "9",
    "finetune.trainable_blocks": "-2", "finetune.freeze_head": "x", "finetune.patience_steps": "-1",
    "finetune.head_lr_ratio": "0", "finetune.min_steps": "-1", "finetune.val_every": "0",
    "finetune.lr_search.lrs": "1e-3,0", "finetune.lr_search.steps": "0", "finetune.lora.min_coverage": "1.5",
    "finetune.grad_clip": "0", "finetune.precision": "int4",
    "finetune.linear_probe.c_min": "0", "finetune.linear_probe.c_max": "-1", "finetune.linear_probe.c_steps": "0",
    "finetune.linear_probe.max_iter": "0", "finetune.linear_probe.refit_on_train_val": "both",
    "finetune.wise.alphas": "0,1.5", "finetune.wise.finetuned": "/no/such/run", "finetune.wise.method": "lora",
    "finetune.lora.rank": "0", "finetune.lora.alpha": "0", "finetune.lora.dropout": "1.0",
    "finetune.lora.targets": "out_proj", "finetune.lora.text": "maybe",
    "curate.data": "' '", "curate.out": "' '", "curate.model": "/no/such/model", "curate.model_name": "' '",
    "curate.batch_size": "0", "curate.seed": "-1", "curate.samples_per_shard": "0", "curate.max_image_pixels": "0",
    "curate.image_key": "';'", "curate.caption_key": "' '", "curate.progress": "often",
    "curate.filters.enabled": "maybe", "curate.filters.min_image_side": "-1", "curate.filters.max_aspect": "0.5",
    "curate.filters.min_words": "-1", "curate.filters.max_words": "0", "curate.filters.max_tokens": "0",
    "curate.filters.languages": "english", "curate.filters.detector_languages": "EN",
    "curate.filters.min_language_confidence": "1.5", "curate.filters.boilerplate": "'[unclosed'",
    "curate.dedup.exact": "2", "curate.dedup.phash": "x", "curate.dedup.phash_max_distance": "33",
    "curate.dedup.phash_verify": "1.5",
    "curate.dedup.semantic": "maybe", "curate.dedup.semantic_threshold": "0", "curate.dedup.clusters": "-1",
    "curate.decontam.eval_sets": "/no/such/eval", "curate.decontam.phash_max_distance": "-1",
    "curate.decontam.cosine": "2", "curate.score.enabled": "sometimes", "curate.score.threshold": "1.5",
    "curate.score.top_fraction": "0", "curate.balance.enabled": "x", "curate.balance.entries": "/no/such/entries",
    "curate.balance.t": "0", "curate.write.mode": "keep_list",
}
# the range checks whose message names a related key instead of (only) this one
NAMED_AS = {"train.beta2": "train.beta1", "finetune.linear_probe.c_max": "finetune.linear_probe.c_min"}


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_the_table_covers_every_key():
    keys = set(_leaves(config_to_dict(Config())))
    assert keys - set(BAD) == set(), "config keys without a refused value in the table"
    assert set(BAD) - keys == set(), "table entries for keys the config does not have"


@pytest.mark.parametrize("key", sorted(BAD))
def test_each_bad_value_is_refused_naming_its_key(key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={BAD[key]}"])
    message = str(info.value)
    assert f"'{NAMED_AS.get(key, key)}" in message and "\n" not in message


def test_the_defaults_pass():
    assert dataclasses.asdict(load_config()) == config_to_dict(Config())
