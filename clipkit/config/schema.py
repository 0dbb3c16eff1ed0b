"""The run configuration's schema: typed dataclasses whose field defaults are the defaults, and nowhere else
(`clipkit config` prints them), with the name tables validation reads.

This module imports nothing from the rest of clipkit: data, losses, models and export read their defaults and
names from here, and each registry's own checks live in its package (see clipkit.config.validate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


class ConfigError(ValueError):
    """A configuration value a user must fix; the message names the dotted key."""


# Keys that changed name, so an old config gets told the new one.
RENAMED = {"train.batch_size": "train.global_batch_size (the global batch, split evenly over the ranks)",
           "finetune.patience": "finetune.patience_steps (optimizer steps without a better validation)"}
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast with fp32 master weights; fp16 adds loss scaling
# torch.optim.AdamW's implementations: one fused kernel over all tensors (CPU and CUDA), per-op multi-tensor, or
# one tensor at a time (torch's default on CPU). The same update up to float rounding.
OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")
# train.compile: off (eager), model (torch.compile of every transformer block of both towers), step (the whole
# training step as one graph: refused, see clipkit/config/validate.py)
COMPILE_MODES = ("off", "model", "step")
# Pillow's own warning threshold; images above the limit are skipped before their pixels are decoded.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# infonce_tiled's similarity tile edge.
DEFAULT_TILE_SIZE = 1024
# A webdataset sample's image member: the tar member extensions tried in order (the first present is read).
DEFAULT_IMAGE_KEY = "jpg;png;webp;jpeg"


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
    image_key: str = DEFAULT_IMAGE_KEY
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
    # torch.compile, one of COMPILE_MODES: "model" compiles every transformer block of both towers (the torch
    # and FSDP2 engines); off by default: on CPU it does not pay (docs/benchmarks.md).
    compile: str = "off"
    # With train.compile on, the trimmed text length is rounded up to a multiple of this (exact): the compiled
    # text blocks see at most ceil(context / compile_pad_text) lengths, each compiled once.
    compile_pad_text: int = 16
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
class FSDPConfig:
    """PyTorch's FSDP2 (fully_shard per transformer block / ResNet stage of both towers, then the root): each rank
    keeps 1/W of the weights, gradients and optimizer state; checkpoints are sharded (torch.distributed.checkpoint)
    and resume on any number of ranks."""

    enabled: bool = False
    # The dtype the forward and backward run in (parameters gathered in it): one of PRECISIONS, or null for
    # train.precision's. The sharded master weights and the optimizer stay fp32.
    param_dtype: Optional[str] = None
    reduce_dtype: str = "fp32"  # gradients are averaged across ranks in this dtype (one of PRECISIONS)
    # Free each block's gathered weights after its forward (gather them again for the backward): less memory,
    # one more all-gather per block. False keeps them from the forward to the backward (ZeRO-2-like).
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # sharded weights, gradients and optimizer state in CPU memory (CUDA runs)


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


# Caption patterns dropped as boilerplate (case-insensitive regular expressions, matched with re.search): captions
# that are camera file names, placeholder text or stock-photo labels rather than descriptions.
DEFAULT_BOILERPLATE = [
    r"^\s*(img|dsc|dscn|dscf|pict|p|photo|image|screenshot)[ _-]?\d+(\.\w{2,4})?\s*$",
    r"^\s*[\w-]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic)\s*$",
    r"image may contain",
    r"stock (photo|image|picture)",
    r"^\s*(untitled|no title|no description|image|photo|picture)\s*$",
    r"click (here )?to (enlarge|view)",
]
DEFAULT_DETECTOR_LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "nl"]


@dataclass
class CurateFiltersConfig:
    """Stage 1, basic filters: each drops a sample for the first rule it breaks, in this order."""

    enabled: bool = True
    min_image_side: int = 32  # pixels, the shorter side
    max_aspect: float = 3.0  # longer side / shorter side
    min_words: int = 2
    max_words: int = 256
    max_tokens: Optional[int] = None  # the tokenizer's tokens (without start/end tokens); null: no limit
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes kept; []: no language filter
    detector_languages: list[str] = field(default_factory=lambda: list(DEFAULT_DETECTOR_LANGUAGES))
    min_language_confidence: float = 0.2  # below it the language counts as unknown (and is dropped)
    boilerplate: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))


@dataclass
class CurateDedupConfig:
    exact: bool = True  # identical image bytes
    phash: bool = True  # perceptual-hash near duplicates (a mirrored copy included)
    # bits of 64; 12 with phash_verify also finds copies cropped by a few per cent (4 does not); the search is
    # a faiss popcount over all pairs at this distance (docs/curation.md)
    phash_max_distance: int = 12
    # A pHash match counts only if the 8x8 colour thumbnails also correlate at least this much; null: off.
    phash_verify: Optional[float] = 0.85
    semantic: bool = False  # SemDeDup on image embeddings (needs curate.model)
    semantic_threshold: float = 0.95  # cosine similarity at or above which two images are duplicates
    clusters: int = 0  # k-means clusters for SemDeDup; 0: about sqrt(N)


@dataclass
class CurateDecontamConfig:
    eval_sets: list[str] = field(default_factory=list)  # evaluation set roots; []: no decontamination
    phash_max_distance: int = 4
    cosine: Optional[float] = None  # image-embedding cosine at or above which a sample matches (needs curate.model)


@dataclass
class CurateScoreConfig:
    enabled: bool = False  # needs curate.model
    threshold: Optional[float] = 0.28  # drop pairs whose image-text cosine is below it; null: none
    top_fraction: Optional[float] = None  # keep only this fraction of the best-scored alive pairs; null: all


@dataclass
class CurateBalanceConfig:
    enabled: bool = False
    entries: str = "builtin"  # a file of metadata entries, one per line, or builtin
    t: int = 20000  # MetaCLIP's per-entry count above which entries are sampled down


@dataclass
class CurateWriteConfig:
    mode: str = "shards"  # one of CURATE_WRITE_MODES


CURATE_WRITE_MODES = ("shards",)


@dataclass
class CurateConfig:
    """`clipkit curate`: raw image-text pairs in, a filtered, deduplicated training set out (docs/curation.md)."""

    data: Optional[str] = None  # the input shard spec (--data)
    out: Optional[str] = None  # the output folder (--out)
    # The scoring model (any source load_model reads); null: stages that need embeddings are refused if enabled.
    model: Optional[str] = None
    model_name: Optional[str] = None  # its architecture when the source does not carry one
    batch_size: int = 64
    seed: int = 0
    samples_per_shard: int = 1000  # of the output shards
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS
    image_key: str = DEFAULT_IMAGE_KEY
    caption_key: str = "txt"
    progress: bool = True
    filters: CurateFiltersConfig = field(default_factory=CurateFiltersConfig)
    dedup: CurateDedupConfig = field(default_factory=CurateDedupConfig)
    decontam: CurateDecontamConfig = field(default_factory=CurateDecontamConfig)
    score: CurateScoreConfig = field(default_factory=CurateScoreConfig)
    balance: CurateBalanceConfig = field(default_factory=CurateBalanceConfig)
    write: CurateWriteConfig = field(default_factory=CurateWriteConfig)


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
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)

