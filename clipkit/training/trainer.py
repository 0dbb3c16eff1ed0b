"""The training loop: composes data, model, loss, engine, checkpoints and metrics.

    from clipkit.config import load_config
    from clipkit.training import Trainer
    trainer = Trainer(load_config("my.yaml", ["train.steps=200", "data.train=shards/{0..9}.tar"]))
    trainer.fit()

The same code runs on one process, under torchrun (DDP), with DeepSpeed ZeRO or with FSDP2: parallelism is applied
from outside the model by the engine (engine.py), the loss gathers features across ranks, and the
checkpoint manager (checkpoint.py) decides what is saved and when. Evaluation and export happen above
this package, in clipkit.run.

Faults (docs/reliability.md):

- A step whose loss or gradients are not finite on any rank is skipped on every rank (no update; the
  LR schedule and the fp16 loss scale move on as for any step), counted (metrics.jsonl and the summary:
  nonfinite_steps) and logged. train.max_nonfinite_steps skipped steps in a row stop the run with
  TrainingDiverged, which names the step and the likely cause. No checkpoint is written while skipped
  steps are unresolved, and none is ever written with non-finite weights, so the good ones survive
  rotation.
- SIGTERM or SIGUSR1 (SLURM's pre-emption warning) during fit(): every rank learns of it at the next
  step boundary (it rides on the step's one all-reduce), the run saves a checkpoint at that step and
  fit() returns; `trainer.stopped_by` names the signal (clipkit.run then skips evaluation and export, and
  `clipkit train` exits with status 75, EXIT_PREEMPTED). A second such signal ends the process at once.
  The previous handlers are back when fit() returns.
- The stall watchdog (train.stall_timeout_s, watchdog.py) ends a process in which no step completed for
  that long, with every thread's stack in run.dir/stall_rank{R}.txt and exit status 3; collectives fail
  after dist.timeout_s instead of the backend's default.
- Automatic restart: a process that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0, as under
  `torchrun --max-restarts=N`) continues from the newest good checkpoint in run.dir, as
  train.resume=latest does (when train.resume names a checkpoint, that one is used only while run.dir
  holds none of its own); it says so in the log. Nothing is resumed from when no checkpoint exists yet.
- run.dir is checked before anything is built: created, a probe file written atomically and removed; a
  read-only, full or forbidden directory is a ConfigError naming it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_write_bytes, atomic_write_text
from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, ModelConfig, TrainConfig, config_to_dict, save_config
from ..data import StreamState, build_train_loader, expand_sources, repartition_train_states
from ..distributed import DistEnv, gather_objects, init_distributed
from ..errors import UserError
from ..losses import create_loss
from ..models import (LoadedModel, create_model, create_transforms, get_model_config, get_tokenizer,
                      register_model_config)
from ..models.weights import load_any
from ..models.flops import matmul_peak, train_flops_per_sample
from .checkpoint import CheckpointManager, RNGState
from .engine import build_engine, engine_class
from .fsdp import whole
from .metrics import MetricsLogger
from .step import ContrastiveStep, StepResult
from .watchdog import Watchdog

log = logging.getLogger("clipkit.training")

MAX_LOGIT_SCALE = math.log(100.0)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # pre-emption: save at the next step boundary, then stop
EXIT_PREEMPTED = 75  # `clipkit train`'s exit status after such a stop (EX_TEMPFAIL: resume it later)


class TrainingDiverged(UserError):
    """train.max_nonfinite_steps steps in a row had a non-finite loss or gradients: the run stopped."""

# Keys a resumed run may change: how it is observed, saved, evaluated and exported, how far it goes, and
# exact speed-ups (model.trim_text and train.compile give the same numbers either way, to float rounding).
# Any other difference from the checkpoint's config would silently not apply (or apply halfway).
RESUMABLE_CHANGES = ("run.dir", "run.progress", "run.log_every", "run.record_sample_keys", "run.report", "train.steps", "train.resume",
                     "train.checkpoint_every", "train.keep_checkpoints", "data.prefetch", "data.zeroshot", "data.retrieval",
                     "eval.", "export.", "train.max_nonfinite_steps", "train.stall_timeout_s", "dist.", "data.workers",
                     "finetune.", "data.synth.downstream_", "model.trim_text", "train.optimizer_impl",
                     "fsdp.reshard_after_forward", "fsdp.cpu_offload",
                     "train.compile")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_pretrained(cfg: Config) -> LoadedModel | None:
    """model.pretrained, loaded with its own architecture, tokenizer and preprocessing (None when unset).

    A source that carries its architecture gives it: model.name must then be left at its default or name
    the same architecture. A file of weights alone (epoch_N.pt, a state dict) is read as model.name."""
    path = cfg.model.pretrained
    if path is None:
        return None
    loaded = load_any(path, cfg.model.name)
    _keep_sigmoid_loss(cfg, loaded)
    if loaded.format in ("open_clip-trainer", "state-dict"):
        return loaded  # read as model.name
    if cfg.model.name != ModelConfig().name and get_model_config(cfg.model.name) != loaded.model_cfg:
        raise ConfigError(f"config key 'model.name': {cfg.model.name} is not the architecture that "
                          f"model.pretrained={path} holds ({loaded.model_name}, {loaded.format}): leave model.name "
                          "out, or name that architecture")
    return loaded


def _keep_sigmoid_loss(cfg: Config, pretrained: LoadedModel) -> None:
    """A model trained with the sigmoid loss (it has a logit bias: SigLIP) goes on with it, its imported bias
    included: train.loss left at its default becomes siglip in the run's config (so config.yaml and a resume
    see it). A loss named otherwise stays as named."""
    if getattr(pretrained.model, "logit_bias", None) is not None and cfg.train.loss == TrainConfig().loss:
        log.info("model.pretrained=%s was trained with a sigmoid loss (it has a logit bias): train.loss=siglip",
                 cfg.model.pretrained)
        cfg.train.loss = "siglip"


def architecture(cfg: Config, pretrained: LoadedModel | None) -> tuple[str, str, dict]:
    """(the name the model builds under in this process, the name its checkpoints record, its model_cfg): the
    pretrained source's or model.name's, with model.pretrained_text's text tower when there is one. A tower
    file whose tower is of another kind is refused here, before anything is built."""
    from ..models.towers import TowerError, with_tower_files

    build_name = pretrained.name if pretrained else cfg.model.name
    model_name = pretrained.model_name if pretrained else cfg.model.name
    model_cfg = pretrained.model_cfg if pretrained else get_model_config(cfg.model.name)
    try:
        model_cfg = with_tower_files(model_cfg, cfg.model.pretrained_image, cfg.model.pretrained_text)
    except TowerError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.pretrained_text is not None:
        build_name = register_model_config(model_name, model_cfg)
    return build_name, model_name, model_cfg


def run_tokenizer(cfg: Config, pretrained: LoadedModel | None, model_cfg: dict) -> tuple[Callable, dict | None]:
    """The tokenizer the run trains with and the files its weights files carry (None: open_clip's own): a
    transformers text tower's directory, else the pretrained source's, else the architecture's."""
    if cfg.model.pretrained_text is not None:
        from ..models.hf_clip import DirectoryTokenizer
        from ..models.tokenizer_files import read_tokenizer_files

        path = Path(cfg.model.pretrained_text)
        return DirectoryTokenizer(path, model_cfg["text_cfg"]["context_length"]), read_tokenizer_files(path)
    if pretrained is not None:
        return pretrained.tokenizer, pretrained.tokenizer_files
    return get_tokenizer(cfg.model.name), None


def _load_pretrained_weights(model: torch.nn.Module, pretrained: LoadedModel) -> None:
    """The pretrained weights into the model built for training; a sigmoid loss's logit bias, which a
    softmax-trained source has not, keeps its initial value."""
    state = pretrained.model.state_dict()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {k: v.reshape(shapes[k]) if k in shapes and v.numel() == shapes[k].numel() else v
             for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "logit_bias"]
    if missing or result.unexpected_keys:
        raise ConfigError(f"model.pretrained={pretrained.source}: its weights do not fit the model built for "
                          f"training (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def build_model(cfg: Config, device: torch.device, pretrained: LoadedModel | None = None,
                **engine_kwargs) -> torch.nn.Module:
    """The open_clip model with the config's training switches applied (no parallelism here), starting
    from the pretrained weights when there are some (before any tower is locked)."""
    kwargs = dict(engine_kwargs)
    if cfg.train.loss == "siglip":  # SigLIP's initial temperature and bias
        kwargs.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    if cfg.model.patch_dropout > 0:
        kwargs["force_patch_dropout"] = cfg.model.patch_dropout
    if pretrained is not None:
        kwargs["force_preprocess_cfg"] = dict(pretrained.model.visual.preprocess_cfg)
    name = architecture(cfg, pretrained)[0]
    model = create_model(name, device=device, trim_text=cfg.model.trim_text, **kwargs)
    if pretrained is not None:
        _load_pretrained_weights(model, pretrained)
    m = cfg.model
    _load_tower_weights(model, m)
    if m.lock_image:
        model.lock_image_tower(unlocked_groups=m.lock_image_unlocked_groups, freeze_bn_stats=m.lock_image_freeze_bn_stats)
    if m.lock_text:
        model.lock_text_tower(unlocked_layers=m.lock_text_unlocked_layers)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _load_tower_weights(model: torch.nn.Module, m: ModelConfig) -> None:
    """model.pretrained_image / pretrained_text into their towers (after model.pretrained, before locking)."""
    from ..models.towers import TowerError, load_image_tower, load_text_tower

    try:
        if m.pretrained_image is not None:
            load_image_tower(model, m.pretrained_image)
        if m.pretrained_text is not None:
            load_text_tower(model, m.pretrained_text)
    except TowerError as e:
        raise ConfigError(str(e)) from None


class Throughput:
    """Global samples/s over the logged windows, leaving out the first (start-up, warm-up, compilation)."""

    def __init__(self) -> None:
        self.windows = 0
        self.samples = 0
        self.seconds = 0.0

    def add(self, samples: int, seconds: float) -> None:
        self.windows += 1
        if self.windows > 1:
            self.samples += samples
            self.seconds += seconds

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None


class NonFiniteCount:
    """Skipped non-finite steps: in all, and in a row now (a checkpoint state provider)."""

    def __init__(self) -> None:
        self.total = 0
        self.streak = 0
        self.first_of_streak = 0

    def state_dict(self) -> dict:
        return {"total": self.total, "streak": self.streak, "first_of_streak": self.first_of_streak}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.streak = state["total"], state["streak"]
        self.first_of_streak = state.get("first_of_streak", 0)


class SkipTally(Counter):
    """This rank's skipped samples by reason (a checkpoint state provider)."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.update(state)


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, name + ".")
        elif a != b:
            changed.append(name)
    return changed


def _with_defaults(defaults: dict, saved: dict) -> dict:
    """`saved` with every key it lacks taken from `defaults` (recursively)."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(value, out[key])
    return out


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.env = env = env or init_distributed(timeout_s=cfg.dist.timeout_s)
        t = cfg.train
        if t.global_batch_size % (env.world_size * t.accum_steps):
            raise ConfigError(f"config key 'train.global_batch_size' ({t.global_batch_size}) must divide evenly "
                              f"over {env.world_size} ranks x train.accum_steps={t.accum_steps}")
        if cfg.data.train is None:
            raise ConfigError("config key 'data.train' names no shards (clipkit.run fills in the built-in set)")
        expand_sources(cfg.data.train, cfg.data.train_weights)  # a missing shard fails here, before training
        self.local_batch_size = t.global_batch_size // env.world_size
        self.device = env.device
        self.run_dir = Path(cfg.run.dir)
        self._check_writable()
        pretrained = load_pretrained(cfg)
        # the name the model builds under in this process, and the architecture its checkpoints record
        self.build_name, self.model_name, self.model_cfg = architecture(cfg, pretrained)
        meta = {"model_name": self.model_name, "model_cfg": self.model_cfg, "config": config_to_dict(cfg)}
        self.pretrained = None
        self.optimizer_from_pretrained = False
        if pretrained is not None:  # what the run started from, for its summary; its preprocessing travels on
            self.pretrained = {"path": str(cfg.model.pretrained), "format": pretrained.format,
                               "architecture": pretrained.model_name, "source": pretrained.description}
            meta["preprocess_cfg"] = pretrained.preprocess_cfg
        towers = {k: v for k, v in (("image", cfg.model.pretrained_image), ("text", cfg.model.pretrained_text)) if v}
        if towers:  # tower weights, for the summary (their paths are in config.yaml too)
            self.pretrained = {**(self.pretrained or {}), "towers": towers}

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.module = build_model(cfg, self.device, pretrained, **engine_class(cfg).model_kwargs(cfg))
        # exp(logit_scale) is kept at or below CLIP's 100; a pretrained model that learned a higher one (SigLIP's
        # are about 117) keeps its own as the ceiling, so its first step does not cut its temperature
        self.max_logit_scale = max(MAX_LOGIT_SCALE, float(self.module.logit_scale.detach().max()))
        # MFU's numerator: the model's FLOPs per sample, counted on the plain model before any wrapping
        self.flops_per_sample = self._count_flops() if env.is_main else None
        self.tokenizer, tokenizer_files = run_tokenizer(cfg, pretrained, self.model_cfg)
        self.train_transform, self.val_transform = self._transforms(pretrained)
        if pretrained is not None:
            pretrained.model = None  # its weights are in self.module now
        seed_everything(cfg.run.seed + env.rank)  # then per-rank randomness (augmentation, dropout)

        self.engine = build_engine(cfg, self.module, env, self.model_name, self.model_cfg)
        self.engine.preprocess_cfg = meta.get("preprocess_cfg")
        self.engine.tokenizer_files = tokenizer_files  # a transformers tokenizer travels with the weights
        loss_fn = create_loss(t.loss, local_loss=t.local_loss, tile_size=t.tile_size)
        self.step_fn = ContrastiveStep(self.engine, loss_fn, t.accum_steps, self.device)
        self.step = 0
        self.skipped = SkipTally()
        self.nonfinite = NonFiniteCount()
        self.stopped_by: str | None = None  # the signal that stopped the last fit() early
        self._stop_signal: int | None = None
        self._save_pending = False
        self._notes: list[str] = []  # said in the log when fit() starts
        self.stream = StreamState()  # where this rank is in its data stream (batches consumed)
        self.throughput = Throughput()
        self._waited = 0.0  # seconds of the current log window spent waiting for the loader
        self._compile_logged = 0.0  # compile seconds already logged (train.compile)
        # the last step's global gradient norm (unscaled, before clipping; None: not computed, DeepSpeed)
        self.last_grad_norm: float | None = None
        self.resumed_from: Path | None = None
        if pretrained is not None and pretrained.format == "open_clip-trainer":
            self._import_openclip_optimizer(pretrained.extra.get("optimizer"))
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", env, self.engine,
            {"rng": RNGState(), "data": self.stream, "skipped": self.skipped, "nonfinite": self.nonfinite},
            every=t.checkpoint_every, keep=t.keep_checkpoints, meta=meta, reshard=self._reshard())
        self.checkpoints.tokenizer_files = tokenizer_files
        self._start()

    def _transforms(self, pretrained: LoadedModel | None) -> tuple[Callable, Callable]:
        """(train transform, eval transform): a pretrained source's own, from its bundle (the model built here
        carries the same preprocessing config), else the architecture's."""
        if pretrained is not None:
            return pretrained.train_transform, pretrained.eval_transform
        return create_transforms(self.module)

    def _import_openclip_optimizer(self, saved) -> None:
        """Continue an OpenCLIP run: its AdamW moments when they fit this run's optimizer (a resumed checkpoint
        replaces them after), else a note that the optimizer starts fresh."""
        from .openclip_optimizer import load_openclip_moments

        optimizer = getattr(self.engine, "optimizer", None)
        why = load_openclip_moments(optimizer, self.module, saved) if optimizer is not None else "no optimizer"
        self.optimizer_from_pretrained = why is None
        self.pretrained["optimizer"] = "AdamW moments from the checkpoint" if why is None else f"fresh: {why}"
        self._notes.append("optimizer: AdamW moments from model.pretrained" if why is None else
                           f"optimizer starts fresh: model.pretrained's optimizer state does not fit ({why})")

    def _reshard(self) -> dict:
        """How this rank's state comes from a checkpoint written by another number of ranks or loader workers
        (train.resume on another layout; the same layout gets each rank's own state back unchanged)."""
        rank, world = self.env.rank, self.env.world_size

        def data(states: list[dict]) -> dict:
            # the stream each old worker had not delivered yet, dealt to the new ranks and workers: over the
            # epoch every sample is still seen once
            return repartition_train_states(self.cfg.data, states, world_size=world)[rank]

        def skipped(states: list[dict]) -> dict:
            # the old ranks' tallies, each kept by one new rank: the sums over ranks stay the same
            return dict(sum((Counter(s) for s in states[rank::world]), Counter()))

        def same_everywhere(states: list[dict]) -> dict:
            return states[0]  # decided together: every rank holds the same

        return {"data": data, "skipped": skipped, "nonfinite": same_everywhere}

    def _count_flops(self) -> float | None:
        vision, text = self.model_cfg.get("vision_cfg", {}), self.model_cfg.get("text_cfg", {})
        size = vision.get("image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                return train_flops_per_sample(self.module, size, text.get("context_length", 77))
        except Exception as e:  # a tower FlopCounterMode cannot trace: no MFU in the metrics, training goes on
            log.warning("could not count the model's FLOPs (%s: %s): metrics.jsonl will have no mfu",
                        type(e).__name__, e)
            return None

    def _check_writable(self) -> None:
        """run.dir must take files (every rank checks the directory it sees); else a one-line ConfigError."""
        probe = self.run_dir / f".write_probe.rank{self.env.rank}.{os.getpid()}"
        error = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(probe, b"clipkit\n")  # as checkpoint pointers and metrics are written
            probe.unlink()
        except OSError as e:
            reason = e.strerror or str(e)
            error = (f"run.dir={self.run_dir} is not writable ({reason}; on rank {self.env.rank}): the run could "
                     "save neither checkpoints nor metrics; make room or fix its permissions, or choose another "
                     "run.dir")
        errors = [e for e in gather_objects(error, self.env) if e]
        if errors:
            raise ConfigError(errors[0])

    def _start(self) -> None:
        """Refuse to mix runs, clean up after an interrupted save, resume, then record the config."""
        existing = self.checkpoints.existing()
        resume = self.cfg.train.resume
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart > 0 and existing is not None and resume != "latest":
            # torchrun restarted this group after a failure: continue this run's progress, not start over
            resume = "latest"
            self._notes.append(f"restart {restart} of this torchrun job (TORCHELASTIC_RESTART_COUNT={restart}): "
                               "continuing from the latest good checkpoint, as train.resume=latest does")
        elif restart > 0 and resume is None:
            self._notes.append(f"restart {restart} of this torchrun job: no checkpoint yet, starting from step 0")
        if resume is None and existing is not None:  # never mix a new run's files with an old run's
            raise ConfigError(f"run.dir={self.run_dir} already holds a run (checkpoint {existing}): continue "
                              "it with train.resume=latest, or start this one in another run.dir")
        self.checkpoints.recover_interrupted()
        if resume is not None:
            resumed = self.checkpoints.resume(resume)
            if resumed is not None:
                self.step, info = resumed
                self._check_config(info["config"])
                self.resumed_from = self.checkpoints.last
                was = (info["world_size"], info["config"]["data"]["workers"])
                if was != (self.env.world_size, self.cfg.data.workers):
                    self._notes.append(f"the checkpoint was written by {was[0]} ranks x data.workers={was[1]}; this "
                                       f"run has {self.env.world_size} x {self.cfg.data.workers}: the data stream "
                                       "is repartitioned, every sample of the epoch still seen once")
                if self.checkpoints.load_note:
                    self._notes.append(self.checkpoints.load_note)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")

    def _check_config(self, saved: dict) -> None:
        # A key the checkpoint's config lacks (added by a later clipkit) had its default in that run.
        saved = _with_defaults(config_to_dict(Config()), saved)
        changed = [k for k in config_changes(saved, config_to_dict(self.cfg))
                   if not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise ConfigError(f"config key '{changed[0]}' differs from the checkpoint's run "
                              f"({', '.join(changed)} changed): a resumed run trains with the config it started "
                              "with; set these back, or start a new run in another run.dir")

    # -- the loop -----------------------------------------------------------------------------------

    def _loader(self):
        """This rank's loader, continuing exactly where the batches consumed so far (or the checkpoint's)
        left the stream: over an epoch every sample is seen once, however often the run is resumed."""
        resume_state = self.stream.state_dict() if self.stream.fingerprint else None
        self.stream.load_state_dict(resume_state)
        loader = build_train_loader(self.cfg.data, transform=self.train_transform, tokenizer=self.tokenizer,
                                    local_batch_size=self.local_batch_size, rank=self.env.rank,
                                    world_size=self.env.world_size, seed=self.cfg.run.seed, resume_state=resume_state)
        self.step_fn.normalize = loader.dataset.normalize  # None unless the batches come as uint8
        return loader

    def train_on(self, images: torch.Tensor, tokens: torch.Tensor) -> float:
        """One optimisation step on this rank's share of a global batch (skipped when not finite on some
        rank, and counted); returns this rank's loss."""
        return self._train_step(images, tokens).loss

    def global_mean(self, value: float) -> float:
        if not self.env.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.env.world_size

    def global_skipped(self) -> dict:
        total: Counter[str] = Counter()
        for counts in gather_objects(dict(self.skipped), self.env):
            total.update(counts)
        return dict(total)

    def _sample_keys_log(self):
        """run.dir/sample_keys/rank{R}.jsonl, one line per step with the keys of this rank's batch."""
        if not self.cfg.run.record_sample_keys:
            return None
        path = self.run_dir / "sample_keys" / f"rank{self.env.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():  # a resumed run: steps logged after the checkpoint will be trained again
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return open(path, "a", buffering=1)

    def fit(self, until: int | None = None, after_step: Callable[[int], dict | None] | None = None) -> Path:
        """Train up to train.steps (or to step `until`, e.g. to run a schedule in slices); returns the
        checkpoint written at the end (at train.steps it holds full fp32 weights for every engine).

        after_step(step) runs on every rank after each step (the run layer evaluates there); metrics it
        returns are logged under "eval". It may use collectives: every rank calls it at the same step."""
        c = self.cfg
        last = c.train.steps if until is None else min(until, c.train.steps)
        start = self.step
        logger = MetricsLogger(self.run_dir, c.train.steps, self.step, enabled=self.env.is_main,
                               progress=c.run.progress)
        for note in self._notes:
            logger.write(note)
        self._notes = []
        if self.resumed_from is not None:
            logger.write(f"resumed from {self.resumed_from} at step {self.step}")
        self.engine.model.train()
        keys_log = self._sample_keys_log()
        self.stopped_by, self._stop_signal = None, None
        previous = self._catch_stop_signals()
        try:
            watchdog = Watchdog(c.train.stall_timeout_s, self.run_dir, self.env.rank).start()
            try:
                if self.step < last:
                    self._run_steps(last, logger, keys_log, after_step, watchdog)
            finally:
                watchdog.stop()  # the final save (and the evaluation after fit) may take long
                logger.close()
                if keys_log is not None:
                    keys_log.close()
            if self.step == start and self.checkpoints.last is not None and self.checkpoints.holds_weights(self.step):
                return self.checkpoints.last  # nothing trained since the checkpoint this run resumed from
            return self.checkpoints.save(self.step, final=self.step >= c.train.steps)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.stopped_by is None and self._stop_signal is not None:  # came during the final save
                self.stopped_by = signal.Signals(self._stop_signal).name

    def _catch_stop_signals(self) -> dict:
        """SIGTERM/SIGUSR1 set a flag that the step loop acts on; returns the handlers they replace."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # Python delivers signals to the main thread only: the launcher's handling stays

        def on_signal(signum, frame):
            if self._stop_signal is not None:  # asked twice: do what the signal did before, now
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                os.kill(os.getpid(), signum)
                return
            self._stop_signal = signum

        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:
            signal.signal(s, on_signal)
        return previous

    def _run_steps(self, last: int, logger: MetricsLogger, keys_log, after_step, watchdog: Watchdog) -> None:
        c = self.cfg
        batches = iter(self._loader())
        window_start, window_samples, losses, norms = time.perf_counter(), 0, [], []
        self._waited = 0.0  # seconds of the window spent waiting for the loader
        while self.step < last:
            asked = time.perf_counter()
            batch = next(batches)
            self._waited += time.perf_counter() - asked
            self.stream.observe(batch)
            self.skipped.update(batch.skipped)
            result = self._train_step(batch.images, batch.targets, stop=lambda: self._stop_signal is not None)
            watchdog.beat()
            losses.append(result.loss)
            if result.grad_norm is not None:
                norms.append(result.grad_norm)
            if not result.applied:
                logger.write(f"step {self.step}: the loss ({result.loss:.4g} on rank 0) or the gradients were not "
                             f"finite on some rank: update skipped ({self.nonfinite.streak} in a row, "
                             f"{self.nonfinite.total} in all; train.max_nonfinite_steps={c.train.max_nonfinite_steps} "
                             "in a row stop the run)")
            if keys_log is not None:
                keys_log.write(json.dumps({"step": self.step, "keys": batch.keys}) + "\n")
            window_samples += batch.images.shape[0] * self.env.world_size
            logger.advance()
            if self.step % c.run.log_every == 0 or self.step == last or result.stop:
                elapsed = time.perf_counter() - window_start
                logger.log(self.step, self._metrics(losses, window_samples, elapsed, norms))
                self.throughput.add(window_samples, elapsed)
                window_start, window_samples, losses, norms = time.perf_counter(), 0, [], []
                self._waited = 0.0
            if self.nonfinite.streak >= c.train.max_nonfinite_steps:
                raise TrainingDiverged(self._diverged_message())
            if result.stop:  # every rank stops here; fit() saves this step's checkpoint
                name = signal.Signals(self._stop_signal).name if self._stop_signal else "a stop signal to another rank"
                self.stopped_by = name
                logger.write(f"step {self.step}: stopping on {name}: saving a checkpoint of this step; continue the "
                             "run with train.resume=latest")
                return
            with watchdog.paused():  # evaluation and checkpoint writes are not steps
                evaluated = after_step(self.step) if after_step is not None else None
                if evaluated:
                    logger.log(self.step, {"eval": evaluated})
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if self.step < last and (self.step % c.train.checkpoint_every == 0 or self._save_pending):
                    # Not while steps are being skipped: weights that give non-finite values must not rotate
                    # the good checkpoints away. The save waits for the next step that updates.
                    self._save_pending = self.nonfinite.streak > 0
                    if not self._save_pending:
                        self.checkpoints.save(self.step)

    def _train_step(self, images: torch.Tensor, tokens: torch.Tensor,
                    stop: bool | Callable[[], bool] = False) -> StepResult:
        result = self.step_fn.run(images, tokens, stop=stop)
        self.last_grad_norm = result.grad_norm
        if self.engine.compiler is not None:
            self.engine.compiler.stats.step_done()
        with torch.no_grad():
            self.module.logit_scale.clamp_(0, self.max_logit_scale)
        self.step += 1
        if result.applied:
            self.nonfinite.streak = 0
        else:
            self.nonfinite.total += 1
            self.nonfinite.streak += 1
            if self.nonfinite.streak == 1:
                self.nonfinite.first_of_streak = self.step
        return result

    def _diverged_message(self) -> str:
        t, n = self.cfg.train, self.nonfinite
        causes = []
        if t.precision == "fp16":
            causes.append("fp16 overflow (train.precision=fp16: bf16 has fp32's range)")
        causes.append(f"a learning rate too high (train.lr={t.lr:g})")
        if t.grad_clip is None:
            causes.append("no gradient clipping (train.grad_clip=null)")
        last = self.checkpoints.last.name if self.checkpoints.last is not None else "none yet"
        return (f"step {self.step}: the loss or the gradients were not finite for {n.streak} steps in a row "
                f"(steps {n.first_of_streak}-{self.step}; train.max_nonfinite_steps={t.max_nonfinite_steps}): "
                f"training stopped, nothing non-finite was saved (latest checkpoint: {last}). Likely cause: "
                f"{' or '.join(causes)}; fix it and train again in a new run.dir (a resumed run keeps its config)")

    def _metrics(self, losses: list[float], samples: int, elapsed: float, norms: list[float]) -> dict:
        """The record of a log window: `losses` and `norms` (global gradient norms before clipping) of its steps."""
        record = {
            "loss": self.global_mean(float(np.mean(losses))),
            "lr": self.engine.lr,
            "logit_scale": whole(self.module.logit_scale).exp().item(),  # gathered when sharded
            "samples_per_s": samples / max(elapsed, 1e-9),
            "data_wait": self._waited / max(elapsed, 1e-9),  # share of the time (rank 0)
            "skipped": self.global_skipped(),
            "nonfinite_steps": self.nonfinite.total,
        }
        finite = [n for n in norms if math.isfinite(n)]
        if finite:  # the same on every rank; DeepSpeed's engine computes none
            record["grad_norm"] = float(np.mean(finite))  # the window's mean, before clipping
            clip = self.cfg.train.grad_clip
            record["clipped_steps"] = sum(n > clip for n in finite) if clip is not None else 0
        if self.engine.compiler is not None:  # compile time apart from step time (it is inside this window's)
            stats = self.engine.compiler.stats
            record["compile"] = {**stats.as_dict(), "window_seconds": round(stats.seconds - self._compile_logged, 3)}
            self._compile_logged = stats.seconds
            steps = max(elapsed - record["compile"]["window_seconds"], 1e-9)
            record["samples_per_s_without_compile"] = samples / steps
        if self.flops_per_sample is not None:  # per device, as torchtitan logs them
            achieved = record["samples_per_s"] * self.flops_per_sample / self.env.world_size
            record["tflops"] = achieved / 1e12
            record["mfu"] = achieved / _peak(self.device, self.cfg.train.precision)
        if self.device.type == "cuda":
            record["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return record


_PEAKS: dict = {}


def _peak(device: torch.device, precision: str) -> float:
    """The measured matmul FLOP/s of this device in the run's precision (once per process and thread count)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _PEAKS:
        _PEAKS[key] = matmul_peak(device, dtype)
    return _PEAKS[key]


__all__ = ["EXIT_PREEMPTED", "CheckpointError", "Trainer", "TrainingDiverged", "build_model", "seed_everything"]
