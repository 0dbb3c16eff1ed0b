"""Value checks the types alone cannot express, across fields; each failure names its key.

Checks against a registry (model names, export formats, loss names) belong to the package that owns the registry:
each such package offers its check, and the top of clipkit registers it here (register_check), so that config
imports none of them while every validated config has passed them all.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .schema import (COMPILE_MODES, CURATE_WRITE_MODES, FINETUNE_METHODS, CurateConfig, OPTIMIZER_IMPLS, PRECISIONS, WISE_METHODS, Config, ConfigError, DataConfig,
                     FinetuneConfig, ModelConfig, RunConfig, TrainConfig)

_REGISTERED: list[Callable[[Config], None]] = []


def register_check(check: Callable[[Config], None]) -> None:
    """Run `check(cfg)` in every validate(cfg), after config's own checks; it raises ConfigError naming its key."""
    if check not in _REGISTERED:
        _REGISTERED.append(check)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express, section by section, then the registered ones (a registry's
    names, checked by its package); each failure names its key."""
    _validate_train(cfg.train)
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be positive")
    _validate_run(cfg.run)
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _check(cfg.eval.batch_size > 0, "eval.batch_size", "must be positive")
    _check(cfg.eval.every >= 0, "eval.every", "must be 0 (only at the end) or more")
    ds = cfg.deepspeed
    _check(cfg.train.compile == "off" or not ds.enabled, "train.compile",
           "applies to the torch engine and FSDP2: set it off with deepspeed.enabled=true")
    _check(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    if ds.config is not None:
        _check_json_file(ds.config, "deepspeed.config")
    _validate_fsdp(cfg)
    _validate_finetune(cfg.finetune)
    _validate_curate(cfg.curate)
    for check in _REGISTERED:
        check(cfg)


def _validate_fsdp(cfg: Config) -> None:
    f = cfg.fsdp
    _check(not (f.enabled and cfg.deepspeed.enabled), "fsdp.enabled",
           "and deepspeed.enabled cannot both be true: choose one engine (see docs/distributed.md)")
    _check(f.param_dtype is None or f.param_dtype in PRECISIONS, "fsdp.param_dtype",
           f"must be null (train.precision's) or one of {', '.join(PRECISIONS)} (got {f.param_dtype!r})")
    _check(f.param_dtype is None or cfg.train.precision in ("fp32", f.param_dtype), "fsdp.param_dtype",
           f"({f.param_dtype}) contradicts train.precision={cfg.train.precision}: set one of them")
    _check(f.reduce_dtype in PRECISIONS, "fsdp.reduce_dtype",
           f"must be one of {', '.join(PRECISIONS)} (got {f.reduce_dtype!r})")


# Why train.compile=step is refused (docs/distributed.md): clipkit's step is not one graph.
STEP_REFUSED = ("=step is not supported: the step reads the batch's caption length (model.trim_text), the loss and "
                "gradient norm on the host to skip non-finite updates on every rank alike, and all-reduces between "
                "backward and update, each a graph break; use train.compile=model (the towers' blocks)")


def _validate_train(t: TrainConfig) -> None:
    _check(t.global_batch_size > 0, "train.global_batch_size", "must be positive")
    _check(t.steps > 0, "train.steps", "must be positive")
    _check(t.lr > 0, "train.lr", f"must be positive (got {t.lr})")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be 0 or more")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1", "and train.beta2 must be in [0, 1)")
    _check(t.eps > 0, "train.eps", "must be positive")
    _check(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be positive, or null for no clipping")
    _check(t.accum_steps > 0, "train.accum_steps", "must be positive")
    _check(t.global_batch_size % t.accum_steps == 0, "train.accum_steps",
           f"must divide train.global_batch_size={t.global_batch_size}")
    _check(t.tile_size > 0, "train.tile_size", "must be positive")
    _check(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)} (got {t.precision!r})")
    _check(t.optimizer_impl in OPTIMIZER_IMPLS, "train.optimizer_impl",
           f"must be one of {', '.join(OPTIMIZER_IMPLS)} (got {t.optimizer_impl!r})")
    _check(t.compile in COMPILE_MODES, "train.compile", f"must be one of {', '.join(COMPILE_MODES)} (got {t.compile!r})")
    _check(t.compile != "step", "train.compile", STEP_REFUSED)
    _check(t.compile_pad_text > 0, "train.compile_pad_text", "must be positive")
    _check(t.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be 0 (keep all) or more")
    _check(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be positive")
    _check(t.stall_timeout_s >= 0, "train.stall_timeout_s", "must be 0 (no watchdog) or more")
    _check(t.resume is None or t.resume == "latest" or Path(t.resume).is_dir(), "train.resume",
           f"must be latest, null, or an existing checkpoint directory (got {t.resume!r})")


def _validate_run(r: RunConfig) -> None:
    _check(bool(r.dir.strip()), "run.dir", "must name a directory")
    _check(r.seed >= 0, "run.seed", "must be 0 or more")
    _check(r.log_every > 0, "run.log_every", "must be positive")


def _validate_data(d: DataConfig) -> None:
    for key in ("train", "zeroshot", "retrieval"):
        value = getattr(d, key)
        _check(value is None or bool(value.strip()), f"data.{key}", "must name a path or shards, or be null")
    if d.train_weights is not None:
        _check_weights(d.train_weights, d.train)
    _check(bool(d.image_key.strip(";").strip()), "data.image_key", "must name at least one extension")
    _check(bool(d.caption_key.strip()), "data.caption_key", "must name the caption's extension")
    _check(d.workers >= 0, "data.workers", "must be 0 (load in the training process) or more")
    _check(d.prefetch >= 1, "data.prefetch", "must be at least 1")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be 0 (no sample shuffling) or more")
    edges = d.length_buckets
    _check(all(e > 0 for e in edges) and all(a < b for a, b in zip(edges, edges[1:])), "data.length_buckets",
           f"must list increasing positive token counts, or be [] (got {edges!r})")
    _check(d.max_image_pixels is None or d.max_image_pixels > 0, "data.max_image_pixels",
           "must be positive, or null for no limit")
    s = d.synth
    _check(bool(s.out.strip()), "data.synth.out", "must name a directory")
    _check(s.seed >= 0, "data.synth.seed", "must be 0 or more")
    for key in ("train_samples", "eval_samples", "samples_per_shard", "image_size", "downstream_train_samples",
                "downstream_test_samples"):
        _check(getattr(s, key) > 0, f"data.synth.{key}", "must be positive")


def _validate_model(m: ModelConfig) -> None:
    """The model section's values; model.name and whether tower weights fit its towers are checked by
    clipkit.models, which owns the architectures."""
    for key, path in (("model.pretrained", m.pretrained), ("model.pretrained_image", m.pretrained_image),
                      ("model.pretrained_text", m.pretrained_text)):
        _check(path is None or Path(path).exists(), key, f"names a path that does not exist: {path}")
    _check(0.0 <= m.patch_dropout < 1.0, "model.patch_dropout", "must be in [0, 1)")
    _check(m.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups", "must be 0 or more")
    _check(m.lock_text_unlocked_layers >= 0, "model.lock_text_unlocked_layers", "must be 0 or more")


def parse_alphas(text: str) -> list[float]:
    """WiSE-FT's alphas from "0,0.25,1"; ConfigError naming finetune.wise.alphas when one is not in [0, 1]."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"config key 'finetune.wise.alphas' must be comma-separated numbers (got {text!r})") from None
    _check(bool(alphas) and all(0.0 <= a <= 1.0 for a in alphas), "finetune.wise.alphas",
           f"must list numbers in [0, 1] (got {text!r})")
    return alphas


def parse_lrs(text: str) -> list[float]:
    """The LR search's grid from "1e-4,1e-3"; ConfigError naming finetune.lr_search.lrs unless all positive."""
    try:
        lrs = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"config key 'finetune.lr_search.lrs' must be comma-separated numbers (got {text!r})") from None
    _check(bool(lrs) and all(lr > 0 for lr in lrs), "finetune.lr_search.lrs",
           f"must list positive numbers (got {text!r})")
    return lrs


def lora_targets(text: str) -> list[str]:
    """finetune.lora.targets as a list; empty: choose them from the model."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _validate_finetune(f: FinetuneConfig) -> None:
    _check(f.method in FINETUNE_METHODS, "finetune.method",
           f"must be one of {', '.join(FINETUNE_METHODS)} (got {f.method!r})")
    for key, value in (("checkpoint", f.checkpoint), ("data", f.data), ("wise.finetuned", f.wise.finetuned)):
        _check(value is None or Path(value).exists(), f"finetune.{key}", f"names a path that does not exist: {value}")
    _check(0.0 < f.val_fraction < 1.0, "finetune.val_fraction", "must be in (0, 1)")
    _check(f.epochs > 0, "finetune.epochs", "must be positive")
    _check(f.global_batch_size > 0, "finetune.global_batch_size", "must be positive")
    _check(f.lr == "auto" or (isinstance(f.lr, float) and f.lr > 0), "finetune.lr",
           f"must be positive or auto (got {f.lr!r})")
    _check(f.head_lr is None or f.head_lr > 0, "finetune.head_lr",
           "must be positive, or null for finetune.lr * finetune.head_lr_ratio")
    _check(f.head_lr_ratio > 0, "finetune.head_lr_ratio", "must be positive")
    _check(f.warmup_steps >= 0, "finetune.warmup_steps", "must be 0 or more")
    _check(f.min_steps >= 0, "finetune.min_steps", "must be 0 or more")
    _check(f.val_every > 0, "finetune.val_every", "must be positive (steps between validations)")
    _check(f.patience_steps >= 0, "finetune.patience_steps", "must be 0 (never stop early) or more")
    parse_lrs(f.lr_search.lrs)
    _check(f.lr_search.steps > 0, "finetune.lr_search.steps", "must be positive")
    _check(f.weight_decay >= 0, "finetune.weight_decay", "must be 0 or more")
    _check(0.0 < f.layer_decay <= 1.0, "finetune.layer_decay", "must be in (0, 1] (1: no layer-wise decay)")
    _check(0.0 <= f.label_smoothing < 1.0, "finetune.label_smoothing", "must be in [0, 1)")
    _check(f.trainable_blocks >= -1, "finetune.trainable_blocks", "must be -1 (all) or 0 or more")
    _check(f.grad_clip is None or f.grad_clip > 0, "finetune.grad_clip", "must be positive, or null for no clipping")
    _check(f.precision in PRECISIONS, "finetune.precision",
           f"must be one of {', '.join(PRECISIONS)} (got {f.precision!r})")
    lp = f.linear_probe
    _check(0 < lp.c_min <= lp.c_max, "finetune.linear_probe.c_min", "must be positive and at most c_max")
    _check(lp.c_steps > 0, "finetune.linear_probe.c_steps", "must be positive")
    _check(lp.max_iter > 0, "finetune.linear_probe.max_iter", "must be positive")
    parse_alphas(f.wise.alphas)
    _check(f.wise.method in WISE_METHODS, "finetune.wise.method",
           f"must be one of {', '.join(WISE_METHODS)} (got {f.wise.method!r})")
    _check(f.trainable_blocks == -1 or not (f.method == "flyp" or (f.method == "wise" and f.wise.method == "flyp")),
           "finetune.trainable_blocks", "must be -1 with flyp: FLYP trains both towers whole")
    lo = f.lora
    _check(lo.rank > 0, "finetune.lora.rank", "must be positive")
    _check(lo.alpha > 0, "finetune.lora.alpha", "must be positive")
    _check(0.0 <= lo.dropout < 1.0, "finetune.lora.dropout", "must be in [0, 1)")
    _check(0.0 <= lo.min_coverage <= 1.0, "finetune.lora.min_coverage", "must be in [0, 1]")
    _check("out_proj" not in [t.strip() for t in lo.targets.split(",")], "finetune.lora.targets",
           "may not name out_proj: nn.MultiheadAttention never calls it, so its adapter would do nothing "
           "(name attn to adapt the attention)")


def _check_weights(weights: str, train: str | None) -> None:
    parts = weights.split("::")
    try:
        ok = all(float(w) > 0 for w in parts)
    except ValueError:
        ok = False
    _check(ok, "data.train_weights", f"must be positive numbers joined by '::', one per source (got {weights!r})")
    if train is not None:
        sources = len(train.split("::"))
        _check(len(parts) == sources, "data.train_weights",
               f"names {len(parts)} weights for the {sources} '::'-joined sources of data.train")



def _check_json_file(path: str, key: str) -> None:
    p = Path(path)
    _check(p.is_file(), key, f"names a file that does not exist: {path}")
    try:
        ok = isinstance(json.loads(p.read_text()), dict)
    except ValueError as e:
        raise ConfigError(f"config key '{key}' names {path}, which is not valid JSON: {e}") from None
    _check(ok, key, f"names {path}, which must hold a JSON object")



def _validate_curate(c: CurateConfig) -> None:
    """`clipkit curate`'s values (whether the optional packages a stage needs are installed is checked when the
    run starts, by clipkit.curate.run)."""
    import re

    for key in ("data", "out", "model", "model_name"):
        value = getattr(c, key)
        _check(value is None or bool(value.strip()), f"curate.{key}", "must name a path or be null")
    _check(c.model is None or Path(c.model).exists(), "curate.model", f"names a path that does not exist: {c.model}")
    _check(c.batch_size > 0, "curate.batch_size", "must be positive")
    _check(c.seed >= 0, "curate.seed", "must be 0 or more")
    _check(c.samples_per_shard > 0, "curate.samples_per_shard", "must be positive")
    _check(c.max_image_pixels is None or c.max_image_pixels > 0, "curate.max_image_pixels",
           "must be positive, or null for no limit")
    _check(bool(c.image_key.strip(";").strip()), "curate.image_key", "must name at least one extension")
    _check(bool(c.caption_key.strip()), "curate.caption_key", "must name the caption's extension")
    f = c.filters
    _check(f.min_image_side >= 0, "curate.filters.min_image_side", "must be 0 or more")
    _check(f.max_aspect >= 1.0, "curate.filters.max_aspect", "must be at least 1")
    _check(f.min_words >= 0, "curate.filters.min_words", "must be 0 or more")
    _check(f.max_words >= max(f.min_words, 1), "curate.filters.max_words", "must be positive and at least min_words")
    _check(f.max_tokens is None or f.max_tokens > 0, "curate.filters.max_tokens", "must be positive, or null")
    for key in ("languages", "detector_languages"):
        codes = getattr(f, key)
        _check(all(len(x) == 2 and x.isalpha() and x.islower() for x in codes), f"curate.filters.{key}",
               f"must list two-letter lower-case ISO 639-1 codes (got {codes!r})")
    _check(not f.languages or len(f.detector_languages) >= 1, "curate.filters.detector_languages",
           "must list at least one language when curate.filters.languages is set")
    missing = [x for x in f.languages if x not in f.detector_languages]
    _check(not missing, "curate.filters.languages",
           f"names {', '.join(missing)}, which curate.filters.detector_languages does not list")
    _check(0.0 <= f.min_language_confidence <= 1.0, "curate.filters.min_language_confidence", "must be in [0, 1]")
    for pattern in f.boilerplate:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config key 'curate.filters.boilerplate' holds {pattern!r}, not a regular "
                              f"expression: {e}") from None
    d = c.dedup
    _check(0 <= d.phash_max_distance <= 32, "curate.dedup.phash_max_distance", "must be in [0, 32] bits")
    _check(d.phash_verify is None or -1.0 <= d.phash_verify <= 1.0, "curate.dedup.phash_verify",
           "must be in [-1, 1], or null")
    _check(0.0 < d.semantic_threshold <= 1.0, "curate.dedup.semantic_threshold", "must be in (0, 1]")
    _check(d.clusters >= 0, "curate.dedup.clusters", "must be 0 (about sqrt(N)) or more")
    x = c.decontam
    for root in x.eval_sets:
        _check(Path(root).is_dir(), "curate.decontam.eval_sets", f"names a folder that does not exist: {root}")
    _check(0 <= x.phash_max_distance <= 32, "curate.decontam.phash_max_distance", "must be in [0, 32] bits")
    _check(x.cosine is None or -1.0 <= x.cosine <= 1.0, "curate.decontam.cosine", "must be in [-1, 1], or null")
    s = c.score
    _check(s.threshold is None or -1.0 <= s.threshold <= 1.0, "curate.score.threshold", "must be in [-1, 1], or null")
    _check(s.top_fraction is None or 0.0 < s.top_fraction <= 1.0, "curate.score.top_fraction",
           "must be in (0, 1], or null")
    _check(not s.enabled or s.threshold is not None or s.top_fraction is not None, "curate.score.enabled",
           "needs curate.score.threshold or curate.score.top_fraction")
    _check(s.threshold is None or s.top_fraction is None, "curate.score.top_fraction",
           "keeps a fraction whatever the scores: set curate.score.threshold=null with it")
    b = c.balance
    _check(b.entries == "builtin" or Path(b.entries).is_file(), "curate.balance.entries",
           f"must be builtin or an existing file (got {b.entries!r})")
    _check(b.t > 0, "curate.balance.t", "must be positive")
    _check(c.write.mode in CURATE_WRITE_MODES, "curate.write.mode",
           f"must be one of {', '.join(CURATE_WRITE_MODES)} (got {c.write.mode!r})")
    needs_model = [key for key, on in (("curate.dedup.semantic", d.semantic), ("curate.score.enabled", s.enabled),
                                       ("curate.decontam.cosine", x.cosine is not None)) if on]
    _check(c.model is not None or not needs_model, needs_model[0] if needs_model else "curate.model",
           "needs image and text embeddings: set curate.model to a checkpoint or pretrained model")
