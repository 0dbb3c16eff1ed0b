"""Typed run configuration: dataclasses, loaded from YAML, with dotted command-line overrides.

    cfg = load_config("my.yaml", ["train.global_batch_size=64", "model.name=ViT-B-32"])

The defaults are the dataclasses' field defaults below, and nowhere else (`clipkit config` prints them).

Every key is checked against the dataclasses: an unknown key or a value of the wrong type raises
ConfigError naming the dotted key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .data.decode import DEFAULT_MAX_IMAGE_PIXELS
from .losses import LOSS_NAMES
from .losses.tiled import DEFAULT_TILE_SIZE

class ConfigError(ValueError):
    """A configuration value a user must fix; the message names the dotted key."""


# Keys that changed name, so an old config gets told the new one.
RENAMED = {"train.batch_size": "train.global_batch_size (the global batch, split evenly over the ranks)",
           "finetune.patience": "finetune.patience_steps (optimizer steps without a better validation)"}
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast with fp32 master weights; fp16 adds loss scaling
# torch.optim.AdamW's implementations: one fused kernel over all tensors (CPU and CUDA), per-op multi-tensor, or
# one tensor at a time (torch's default on CPU). The same update up to float rounding.
OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")


@dataclass
class SynthConfig:
    """The built-in procedurally drawn dataset (see clipkit.data.synth)."""

    out: str = "datasets/synth"
    train_samples: int = 20000
    eval_samples: int = 1500
    samples_per_shard: int = 1000
    image_size: int = 64
    seed: int = 0
    # The labelled downstream split (downstream/: train and test), for `clipkit finetune`.
    downstream_train_samples: int = 2000
    downstream_test_samples: int = 1000


@dataclass
class DataConfig:
    # Shard spec: a path, a brace pattern ("shards/{00000..00099}.tar") or several joined by "::".
    # None means the built-in synthetic set under data.synth.out (created on first use).
    train: Optional[str] = None
    # A CLIP_benchmark-style zero-shot set root (test/*.tar, classnames.txt, templates). None means the
    # held-out split of the built-in set when training on it, and no zero-shot evaluation otherwise.
    zeroshot: Optional[str] = None
    # A CLIP_benchmark-style retrieval root (several captions per image) or caption shards; None means the
    # held-out retrieval split of the built-in set when training on it, and no retrieval evaluation otherwise.
    retrieval: Optional[str] = None
    # OpenCLIP's upsampling factors, one per "::" source of data.train ("1::2"); None weighs sources by size.
    train_weights: Optional[str] = None
    # Draw shards with replacement, endlessly (OpenCLIP's --dataset-resampled); else epoch after epoch,
    # each sample once per epoch, split over ranks and loader workers without overlap.
    resampled: bool = False
    # Images above this many pixels are skipped (and counted) as decompression bombs; null: no limit.
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS
    workers: int = 1  # loader processes per rank (0: load in the training process)
    prefetch: int = 2  # batches each loader worker prepares ahead
    # Ship uint8 images from the loader and normalise them on the training device: a quarter of the
    # bytes through shared memory and host-to-device copies (open_clip's standard train transform only).
    normalize_on_device: bool = False
    shuffle_buffer: int = 2000  # samples; 0 disables sample shuffling (shards are still shuffled)
    # Caption-length bucketing: upper edges in tokens, e.g. [16, 32] groups captions of up to 16 tokens, of
    # 17-32 and of more into batches of their own, so the text tower runs shorter (model.trim_text).
    # [] disables it. Every sample is still seen once per epoch, and resume stays exact.
    length_buckets: list[int] = field(default_factory=list)
    image_key: str = "jpg;png;webp;jpeg"  # tar member extensions tried in order
    caption_key: str = "txt"
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ModelConfig:
    # Any open_clip architecture, a clipkit config, or a JSON file in that schema. The default, clipkit-tiny-rn
    # (model_configs/): a small ResNet image tower (open_clip's ModifiedResNet) with a 2-layer text tower; in the
    # main job's time it learns the built-in set's shapes, which the ViT clipkit-tiny barely does.
    name: str = "clipkit-tiny-rn"
    # Start from these weights (continued pretraining, LiT with lock_image): a clipkit checkpoint, an open_clip
    # or transformers CLIPModel/SiglipModel directory, an OpenCLIP epoch_N.pt or a state dict (docs/pretrained.md). A source
    # that carries its architecture gives it (model.name stays at its default or names the same one); for an
    # epoch_N.pt or a bare state dict model.name names it.
    pretrained: Optional[str] = None
    # One tower's weights (LiT, partial init; docs/pretrained.md): a timm model's weights file for a config whose
    # image tower is a timm model, and a transformers text model directory (BertModel, RobertaModel, XLM-R ...)
    # for a config with a Hugging Face text tower; the run then tokenises with the directory's tokenizer.
    pretrained_image: Optional[str] = None
    pretrained_text: Optional[str] = None
    grad_checkpointing: bool = False
    # Run the text tower only up to the batch's longest caption where that gives the same features and
    # gradients (a causal text tower read at its end-of-text token, as in every CLIP config); else full length.
    trim_text: bool = True
    # FLIP-style: drop this fraction of image patches in training (0 disables)
    patch_dropout: float = 0.0
    # LiT: freeze the image tower, optionally leaving its last N layer groups trainable
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0


@dataclass
class TrainConfig:
    # The global batch: split evenly over the ranks (each rank's share is its local batch).
    global_batch_size: int = 128
    steps: int = 600
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: Optional[float] = 1.0  # max global grad norm; None disables clipping
    checkpoint_every: int = 200
    keep_checkpoints: int = 2  # the newest N checkpoints are kept; 0 keeps all
    # "latest" continues the newest good checkpoint in run.dir, a path resumes that checkpoint
    # directory, None starts fresh.
    resume: Optional[str] = None
    # one of clipkit.losses.LOSS_NAMES; left at infonce, a model.pretrained with a logit bias (SigLIP) makes it siglip
    loss: str = "infonce"
    local_loss: bool = False  # each rank computes B_local x B_global logits instead of the full matrix
    tile_size: int = DEFAULT_TILE_SIZE  # infonce_tiled: similarity tile edge
    # Contrastive gradient accumulation: the batch is processed in accum_steps chunks, and the update
    # equals the one from the whole batch at once (features cached, loss over the full batch).
    accum_steps: int = 1
    precision: str = "fp32"  # one of PRECISIONS
    optimizer_impl: str = "fused"  # one of OPTIMIZER_IMPLS (the torch engine; DeepSpeed uses its own)
    # A step whose loss or gradients are not finite is skipped (no update) and counted; this many in a row
    # stop the run with a message, with nothing non-finite saved.
    max_nonfinite_steps: int = 5
    # When no step completes for this long, every thread's stack is written to run.dir and the process exits
    # non-zero (so a launcher can restart it); 0 disables the watchdog.
    stall_timeout_s: float = 1800.0


@dataclass
class DistConfig:
    # How long a collective (all-reduce, broadcast, barrier) may wait for the other ranks before failing,
    # instead of the backend's default (30 min gloo, 10 min NCCL).
    timeout_s: float = 600.0


@dataclass
class EvalConfig:
    batch_size: int = 256
    zeroshot_at_end: bool = True
    retrieval_at_end: bool = True
    # Evaluate on the held-out sets (data.zeroshot) every N steps during training, logged to metrics.jsonl
    # and TensorBoard under "eval"; 0: only at the end.
    every: int = 0


@dataclass
class ExportConfig:
    format: str = "open_clip"  # one of clipkit.export.EXPORT_FORMATS
    at_end: bool = True


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    zero_stage: int = 2  # 0 (DeepSpeed without ZeRO), 1, 2 or 3
    # A DeepSpeed JSON of the user's: its keys override the ones clipkit derives from this config.
    config: Optional[str] = None


@dataclass
class LinearProbeConfig:
    """Logistic regression on frozen, cached image features (CLIP_benchmark's linear-probe protocol): the L2
    strength is chosen on val from a log grid of scikit-learn's C (inverse strength), then refit on train+val."""

    c_min: float = 1e-3
    c_max: float = 1e3
    c_steps: int = 13  # grid points, log-spaced from c_min to c_max
    max_iter: int = 1000  # L-BFGS iterations per fit
    refit_on_train_val: bool = True  # the final classifier is fitted on train+val with the chosen C


@dataclass
class WiseConfig:
    """WiSE-FT: weight-space interpolation (1 - alpha) * zero-shot + alpha * fine-tuned."""

    alphas: str = "0,0.25,0.5,0.75,1"  # comma-separated, each in [0, 1]
    # The best checkpoint of an earlier full fine-tune of the same checkpoint (RUN_DIR/best); None: fine-tune first.
    finetuned: Optional[str] = None
    # The fine-tune interpolated towards (run first, or the kind of `finetuned`): full (the image tower and the head)
    # or flyp (both towers; the head is rebuilt from the interpolated text tower).
    method: str = "full"


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the image tower's layers; merged into the weights at export."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names (peft target_modules), comma-separated; empty: chosen from each tower's architecture (ViT:
    # attn,c_fc,c_proj; ResNet: its convolutions and attention-pool projections; timm / Hugging Face towers: the
    # names of the layers in their trunk / encoder).
    targets: str = ""
    # Refuse targets that cover less than this share of a tower's Linear/Conv weights (a list naming another
    # architecture's modules matches next to nothing).
    min_coverage: float = 0.5
    # Also adapt the text tower: the head is then the zero-shot classifier recomputed through it every step.
    text: bool = False


@dataclass
class LrSearchConfig:
    """finetune.lr=auto: each LR of the grid trains a fresh copy of the model for `steps` optimizer steps; the one
    with the best val acc1 (ties: the lower val loss, then the smaller LR) is the run's LR. Val only: test is
    never seen."""

    lrs: str = "1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2"  # comma-separated, each positive
    steps: int = 60  # optimizer steps per LR (warm-up: a quarter of them, at most warmup_steps)


@dataclass
class FinetuneConfig:
    """`clipkit finetune`: adapt a pretrained checkpoint to a labelled image classification task. Every length
    below is in optimizer steps except `epochs`, so the schedule means the same on a set of 300 images or 3M."""

    method: str = "full"  # one of FINETUNE_METHODS
    checkpoint: Optional[str] = None  # the pretrained model (as for `clipkit zeroshot --checkpoint`)
    # An image folder with train/, val/ (optional) and test/ sub-folders of class folders, or a CLIP_benchmark
    # webdataset root with train/ and test/ (and optionally val/) splits.
    data: Optional[str] = None
    val_fraction: float = 0.1  # without a val split: this fraction of train (per class, seeded) becomes val
    epochs: int = 10  # passes over train; a small set trains longer: see min_steps
    global_batch_size: int = 64  # split evenly over the ranks
    lr: Union[float, str] = "auto"  # the image tower's LR, or auto: chosen on val by finetune.lr_search
    head_lr: Optional[float] = None  # the classification head's LR; None: lr * head_lr_ratio
    head_lr_ratio: float = 10.0
    warmup_steps: int = 20
    # No early stop before warmup_steps + min_steps, and no run shorter than that (more epochs on a small set).
    min_steps: int = 200
    val_every: int = 25  # validate every this many steps (and after the last)
    patience_steps: int = 100  # stop after this many steps without a better val acc1 (0: never stop early)
    weight_decay: float = 0.1
    layer_decay: float = 1.0  # layer-wise LR decay per transformer block, from the head down (1: off)
    label_smoothing: float = 0.1
    augment: bool = True  # open_clip's training augmentation (RandomResizedCrop); else the eval transform
    trainable_blocks: int = -1  # train only the last N transformer blocks of the image tower (-1: all)
    freeze_head: bool = False  # keep the zero-shot head fixed
    grad_clip: Optional[float] = 1.0
    precision: str = "fp32"  # one of PRECISIONS
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    lr_search: LrSearchConfig = field(default_factory=LrSearchConfig)
    wise: WiseConfig = field(default_factory=WiseConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


FINETUNE_METHODS = ("linear_probe", "full", "wise", "lora", "flyp")
WISE_METHODS = ("full", "flyp")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    # Write run.dir/sample_keys/rank{R}.jsonl: the sample keys of every step's batch (a data audit trail).
    record_sample_keys: bool = False
    # Write run.dir/report.html at the end: loss, LR, throughput and MFU, evaluation over time (PNG plots).
    report: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, checking every key and type.


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null (expected {tp.__name__})")
    if tp == Union[float, str]:  # a number, or a word such as "auto" (checked by validate)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value) if _looks_like_float(value) else value
        raise ConfigError(f"config key '{key}' expects a number or a word such as auto, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of sub-keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_like_float(value):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp == list[int]:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"config key '{key}' expects a list of integers such as [16, 32], got {value!r}")
    else:  # pragma: no cover - only the types above are used in Config
        raise TypeError(f"unsupported config type {tp} at '{key}'")
    raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and _join(prefix, unknown[0]) in RENAMED:
        old = _join(prefix, unknown[0])
        raise ConfigError(f"config key '{old}' is now '{RENAMED[old]}'")
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' (valid keys under {where}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    # YAML scalars: 64 -> int, 1e-3 -> float, true -> bool, null -> None, anything else a string.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The dataclasses' defaults <- the user's YAML file <- dotted overrides, validated."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        data = _merge(data, _parse_override(item))
    return config_from_dict(data)


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each failure names its key."""
    from .export import EXPORT_FORMATS  # the export registry pulls in open_clip: import it when needed

    t, d, r = cfg.train, cfg.data, cfg.run
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
    _check(t.loss in LOSS_NAMES, "train.loss", f"must be one of {', '.join(LOSS_NAMES)} (got {t.loss!r})")
    _check(t.tile_size > 0, "train.tile_size", "must be positive")
    _check(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)} (got {t.precision!r})")
    _check(t.optimizer_impl in OPTIMIZER_IMPLS, "train.optimizer_impl",
           f"must be one of {', '.join(OPTIMIZER_IMPLS)} (got {t.optimizer_impl!r})")
    _check(t.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be 0 (keep all) or more")
    _check(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be positive")
    _check(t.stall_timeout_s >= 0, "train.stall_timeout_s", "must be 0 (no watchdog) or more")
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be positive")
    _check(bool(r.dir.strip()), "run.dir", "must name a directory")
    _check(r.seed >= 0, "run.seed", "must be 0 or more")
    for key in ("train", "zeroshot", "retrieval"):
        value = getattr(d, key)
        _check(value is None or bool(value.strip()), f"data.{key}", "must name a path or shards, or be null")
    if d.train_weights is not None:
        _check_weights(d.train_weights, d.train)
    _check(bool(d.image_key.strip(";").strip()), "data.image_key", "must name at least one extension")
    _check(bool(d.caption_key.strip()), "data.caption_key", "must name the caption's extension")
    _check(bool(d.synth.out.strip()), "data.synth.out", "must name a directory")
    _check(d.synth.seed >= 0, "data.synth.seed", "must be 0 or more")
    _check_model(cfg.model.name)
    p = cfg.model.pretrained
    _check(p is None or Path(p).exists(), "model.pretrained", f"names a path that does not exist: {p}")
    _check_towers(cfg.model)
    _check(t.resume is None or t.resume == "latest" or Path(t.resume).is_dir(), "train.resume",
           f"must be latest, null, or an existing checkpoint directory (got {t.resume!r})")
    _check(d.workers >= 0, "data.workers", "must be 0 (load in the training process) or more")
    _check(d.prefetch >= 1, "data.prefetch", "must be at least 1")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be 0 (no sample shuffling) or more")
    edges = d.length_buckets
    _check(all(e > 0 for e in edges) and all(a < b for a, b in zip(edges, edges[1:])), "data.length_buckets",
           f"must list increasing positive token counts, or be [] (got {edges!r})")
    _check(d.max_image_pixels is None or d.max_image_pixels > 0, "data.max_image_pixels",
           "must be positive, or null for no limit")
    s = d.synth
    for key in ("train_samples", "eval_samples", "samples_per_shard", "image_size", "downstream_train_samples",
                "downstream_test_samples"):
        _check(getattr(s, key) > 0, f"data.synth.{key}", "must be positive")
    _check(0.0 <= cfg.model.patch_dropout < 1.0, "model.patch_dropout", "must be in [0, 1)")
    _check(cfg.model.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups", "must be 0 or more")
    _check(cfg.model.lock_text_unlocked_layers >= 0, "model.lock_text_unlocked_layers", "must be 0 or more")
    _check(cfg.eval.batch_size > 0, "eval.batch_size", "must be positive")
    _check(cfg.eval.every >= 0, "eval.every", "must be 0 (only at the end) or more")
    _check(cfg.export.format in EXPORT_FORMATS, "export.format",
           f"must be one of {', '.join(EXPORT_FORMATS)} (got {cfg.export.format!r})")
    _check(r.log_every > 0, "run.log_every", "must be positive")
    ds = cfg.deepspeed
    _check(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    if ds.config is not None:
        _check_json_file(ds.config, "deepspeed.config")
    _validate_finetune(cfg.finetune)


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


def _check_model(name: str) -> None:
    from .models import ModelNotFoundError, get_model_config  # pulls in open_clip: imported when needed

    try:
        get_model_config(name)
    except ModelNotFoundError as e:
        raise ConfigError(f"config key 'model.name': {e}") from None


def _check_towers(m: ModelConfig) -> None:
    """Tower weights exist and fit the kind of tower model.name configures (with model.pretrained the source's
    architecture decides, checked when it is read)."""
    for key, path in (("model.pretrained_image", m.pretrained_image), ("model.pretrained_text", m.pretrained_text)):
        _check(path is None or Path(path).exists(), key, f"names a path that does not exist: {path}")
    if m.pretrained is not None or (m.pretrained_image is None and m.pretrained_text is None):
        return
    from .models import get_model_config
    from .models.towers import TowerError, check_image_tower, text_tower_config

    model_cfg = get_model_config(m.name)
    try:
        if m.pretrained_image is not None:
            check_image_tower(model_cfg, m.pretrained_image)
        if m.pretrained_text is not None:
            text_tower_config(model_cfg, m.pretrained_text)
    except TowerError as e:
        raise ConfigError(str(e)) from None


def _check_json_file(path: str, key: str) -> None:
    p = Path(path)
    _check(p.is_file(), key, f"names a file that does not exist: {path}")
    try:
        ok = isinstance(json.loads(p.read_text()), dict)
    except ValueError as e:
        raise ConfigError(f"config key '{key}' names {path}, which is not valid JSON: {e}") from None
    _check(ok, key, f"names {path}, which must hold a JSON object")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
