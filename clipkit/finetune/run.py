"""`clipkit finetune`: adapt a pretrained checkpoint to a labelled task, and report it against zero-shot.

    clipkit finetune --checkpoint CK --data DIR --method full --out RUN_DIR [CONFIG.yaml] [dotted overrides]
    torchrun --nproc_per_node=2 -m clipkit finetune ...          # DDP, the same update as one process

Methods (finetune.method): linear_probe, full (partial with finetune.trainable_blocks), wise (WiSE-FT), lora, flyp
(both towers with the contrastive loss against class prompts, the zero-shot head rebuilt from the text tower).
RUN_DIR gets config.yaml, metrics.jsonl, tensorboard/, result.json (method, parameter counts, val and test
metrics with CLIP_benchmark's names, the zero-shot baseline on the same splits), checkpoints/best/ (the
adapted model: model.safetensors + head.safetensors, verified like every clipkit checkpoint) and export/ (an
open_clip model directory plus head.safetensors: classify with open_clip and safetensors alone).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_write_text
from ..checkpoint import commit, read_latest, recover_interrupted
from ..config import Config, load_config, lora_targets, parse_alphas, save_config
from ..distributed import DistEnv, cleanup, init_distributed
from ..errors import UserError
from ..extras import check_config
from ..evaluation import build_classifier
from ..export import export_open_clip
from ..models import WEIGHTS_FILE, load_model, save_weights
from ..models.digest import weights_sha256
from ..models.weights import LoadedModel, load_any
from ..training.metrics import MetricsLogger
from .data import DownstreamSet, eval_loader, load_downstream
from .flyp import FlypClassifier, FlypObjective, train_both_towers
from .linear_probe import extract_features, linear_probe, load_features, save_features
from .lr_search import head_lr_for, search_lr
from .model import (ImageClassifier, add_lora, count_parameters, feature_dim, interpolate, merge_lora, set_trainable,
                    trainable_by_tower)
from .train import FitResult, Plan, evaluate, fit, steps_per_epoch

log = logging.getLogger("clipkit.finetune")
HEAD_FILE = "head.safetensors"
RESULT_FILE = "result.json"


def write_result(run_dir: str | Path, result: dict) -> Path:
    """RUN_DIR/result.json, replaced whole (a run that fails or is killed while writing it leaves the previous
    one, never a truncated file that finetune-report would choke on)."""
    return atomic_write_text(Path(run_dir) / RESULT_FILE, json.dumps(result, indent=2))


def save_head(model: ImageClassifier, path: Path, classnames: list[str], model_name: str) -> Path:
    """The head as safetensors: logits = normalize(encode_image(x)) @ weight.T + bias."""
    with torch.no_grad():
        weight = model.head_weight().detach().float().cpu().contiguous()
    save_file({"weight": weight, "bias": model.head.bias.detach().float().cpu().contiguous()}, str(path),
              metadata={"format": "pt", "classnames": json.dumps(classnames), "model_name": model_name,
                        "logits": "normalize(encode_image(images)) @ weight.T + bias"})
    return path


def load_head(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("classnames", "[]"))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{path} is not a readable head file: {e}") from None


def _plain(model: ImageClassifier) -> ImageClassifier:
    """The model with LoRA adapters folded in and a text-tower head materialised: plain open_clip + Linear."""
    model = merge_lora(model)
    if model.prompts is not None:
        with torch.no_grad():
            model.head.weight.copy_(model.text_head_weight())
        model.prompts = None
    return model


def save_best(model: ImageClassifier, run_dir: Path, loaded: LoadedModel, classnames: list[str],
              meta: dict) -> Path:
    """RUN_DIR/checkpoints/best: the adapted CLIP model (loads wherever a clipkit checkpoint does) + its head."""
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    recover_interrupted(directory)
    tmp = directory / "best.tmp"
    tmp.mkdir()
    save_weights(model.clip.state_dict(), tmp / WEIGHTS_FILE, loaded.model_name, loaded.model_cfg,
                 loaded.preprocess_cfg, loaded.tokenizer_files)
    save_head(model, tmp / HEAD_FILE, classnames, loaded.model_name)
    return commit(tmp, {"kind": "finetune", "engine": "finetune", **meta})


def export_classifier(model: ImageClassifier, out: Path, loaded: LoadedModel, classnames: list[str]) -> dict:
    files = export_open_clip(model.clip.cpu(), loaded.model_name, loaded.model_cfg, out,
                             tokenizer_files=loaded.tokenizer_files)
    files["head"] = save_head(model, out / HEAD_FILE, classnames, loaded.model_name)
    return {k: str(v) for k, v in files.items()}


def _splits(data: DownstreamSet) -> dict:
    return {"train": len(data.train), "val": len(data.val), "test": len(data.test),
            "val_from_train": data.val_from_train, "classes": len(data.classnames)}


class Finetune:
    """One fine-tuning run: the pieces every method shares."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.f, self.env = cfg, cfg.finetune, env
        self.run_dir = Path(cfg.run.dir)
        self.device = env.device
        self.data = load_downstream(self.f.data, val_fraction=self.f.val_fraction, seed=cfg.run.seed)
        self.loaded = load_any(self.f.checkpoint, cfg.model.name, device=self.device)  # model.name: bare files
        self.clip = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.transforms = self.loaded.transforms
        self.num_classes = len(self.data.classnames)
        self.zeroshot_weights = build_classifier(self.clip, self.tokenizer, self.data.classnames, self.data.templates,
                                                 self.device)
        self.eval_kwargs = dict(batch_size=cfg.eval.batch_size, workers=cfg.data.workers, device=self.device,
                                precision=self.f.precision)

    def zeroshot_model(self) -> ImageClassifier:
        """A classifier on its own copy of the pretrained model: training it (an LR search trial, the run) or
        adding adapters leaves the pretrained model as loaded for the next."""
        return ImageClassifier.from_zeroshot(copy.deepcopy(self.clip), self.zeroshot_weights).to(self.device)

    def evaluate(self, model: ImageClassifier, split: str) -> dict:
        return evaluate(model, getattr(self.data, split), self.transforms[1], self.num_classes, **self.eval_kwargs)

    def val_test(self, model: ImageClassifier) -> dict:
        return {"val": self.evaluate(model, "val"), "test": self.evaluate(model, "test")}

    # -- methods ------------------------------------------------------------------------------------------

    def linear_probe(self) -> tuple[ImageClassifier, dict]:
        feats = {split: self.features(split) for split in ("train", "val", "test")}
        res = linear_probe(feats["train"], feats["val"], feats["test"], self.num_classes, self.f.linear_probe)
        model = ImageClassifier(self.clip, self.num_classes).to(self.device)
        with torch.no_grad():
            model.head.weight.copy_(res.classifier.weight.float())
            model.head.bias.copy_(res.classifier.bias.float())
        for p in model.clip.parameters():
            p.requires_grad_(False)
        return model, {"val": res.val, "test": res.test, "best_C": res.best_C, "sweep": res.sweep,
                       "trainable_by_tower": trainable_by_tower(model)}

    def features(self, split: str):
        samples = getattr(self.data, split)
        keys = hashlib.sha256("\n".join(s.key for s in samples).encode()).hexdigest()
        meta = {"weights": self._digest(), "split": split, "samples": keys, "transform": repr(self.transforms[1])}
        path = self.run_dir / "features" / f"{split}.safetensors"
        cached = load_features(path, meta)
        if cached is not None:
            return cached
        feats = extract_features(self.clip, eval_loader(samples, self.transforms[1], batch_size=self.cfg.eval.batch_size,
                                                        workers=self.cfg.data.workers), self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_features(feats, path, meta)
        return feats

    def _digest(self) -> str:
        if not hasattr(self, "_weights_digest"):
            self._weights_digest = weights_sha256(self.loaded.model)  # what the feature cache is keyed by
        return self._weights_digest

    def plan(self) -> Plan:
        return Plan.for_run(self.f, steps_per_epoch(self.data.train, self.f, self.env, self.cfg.run.seed))

    def train(self, build: Callable[[], ImageClassifier], logger: MetricsLogger,
              objective=None) -> tuple[ImageClassifier, dict]:
        """Choose the LR (finetune.lr=auto: search_lr on val), then train a model from build() with it; objective:
        what a step minimises (None: cross-entropy on the classifier's logits)."""
        f, common = self.f, {**self.fit_kwargs(), "objective": objective}
        extra: dict = {}
        if f.lr == "auto":
            extra["lr_search"] = search_lr(build, self.data.train, self.data.val, self.num_classes, f,
                                           run_dir=self.run_dir, **common)
            lr = extra["lr_search"]["lr"]
        else:
            lr = f.lr
        torch.manual_seed(self.cfg.run.seed)  # the same start with or without a search before it
        model = build()
        trainable, _ = count_parameters(model)
        result = fit(model, self.data.train, self.data.val, self.num_classes, f, plan=self.plan(), lr=lr,
                     head_lr=head_lr_for(f, lr), logger=logger, log_every=self.cfg.run.log_every, **common)
        if self.env.is_main:
            model.load_state_dict(result.best_state)
        return model, {"fit": result, "trainable_params": trainable, "lr": lr, "head_lr": head_lr_for(f, lr),
                       "trainable_by_tower": trainable_by_tower(model), **extra}

    def fit_kwargs(self) -> dict:
        return dict(env=self.env, transforms=self.transforms, seed=self.cfg.run.seed, workers=self.cfg.data.workers,
                    eval_batch_size=self.cfg.eval.batch_size)

    def build_full(self) -> ImageClassifier:
        model = self.zeroshot_model()
        set_trainable(model, self.f.trainable_blocks, self.f.freeze_head)
        return model

    def build_lora(self) -> ImageClassifier:
        lo = self.f.lora
        model = self.zeroshot_model()
        set_trainable(model, -1, self.f.freeze_head)
        self.lora_record = add_lora(model, lo.rank, lo.alpha, lo.dropout, lora_targets(lo.targets), text=lo.text,
                                     min_coverage=lo.min_coverage)
        if lo.text:
            prompts = [t.replace("{c}", c) for c in self.data.classnames for t in self.data.templates]
            tokens = self.tokenizer(prompts).to(self.device)
            model.use_text_head(tokens.reshape(self.num_classes, len(self.data.templates), -1))
        return model.to(self.device)

    def build_flyp(self) -> FlypClassifier:
        model = FlypClassifier.from_zeroshot(copy.deepcopy(self.clip), self.zeroshot_weights).to(self.device)
        train_both_towers(model)
        return model

    def flyp_objective(self) -> FlypObjective:
        return FlypObjective(self.tokenizer, self.data.classnames, self.data.templates, seed=self.cfg.run.seed)

    def full(self, logger: MetricsLogger) -> tuple[ImageClassifier, dict]:
        return self.train(self.build_full, logger)

    def flyp(self, logger: MetricsLogger) -> tuple[ImageClassifier, dict]:
        return self.train(self.build_flyp, logger, self.flyp_objective())

    def lora(self, logger: MetricsLogger) -> tuple[ImageClassifier, dict]:
        self.build_lora()  # the targets are checked (and refused) before any training, the search included
        model, out = self.train(self.build_lora, logger)
        return _plain(model), {**out, "lora_targets": self.lora_record}

    def wise(self, logger: MetricsLogger) -> tuple[ImageClassifier, dict]:
        zeroshot = self.zeroshot_model()
        zs_state = {k: v.detach().cpu().clone() for k, v in zeroshot.state_dict().items()}
        del zeroshot  # a copy of the whole model: not held through the training
        extra: dict = {}
        if self.f.wise.finetuned is not None:
            finetuned = self.load_finetuned(self.f.wise.finetuned)
            trainable = self.finetuned_trainable
        else:
            finetuned, extra = self.flyp(logger) if self.f.wise.method == "flyp" else self.full(logger)
            trainable = extra.pop("trainable_params")
        ft_state = {k: v.detach().cpu().clone() for k, v in finetuned.state_dict().items()}
        if not self.env.is_main:
            return finetuned, {**extra, "trainable_params": trainable}
        model = self.zeroshot_model()
        curve = []
        for alpha in parse_alphas(self.f.wise.alphas):
            self.load_interpolated(model, interpolate(zs_state, ft_state, alpha))
            curve.append({"alpha": alpha, **self.val_test(model)})
        best = max(curve, key=lambda c: c["val"]["acc1"])  # the first of equals: the smaller alpha
        self.load_interpolated(model, interpolate(zs_state, ft_state, best["alpha"]))
        return model, {**extra, "trainable_params": trainable, "wise_method": self.f.wise.method, "alphas": curve,
                       "best_alpha": best["alpha"], "val": best["val"], "test": best["test"]}

    def load_interpolated(self, model: ImageClassifier, state: dict) -> None:
        """WiSE-FT's weights; interpolating FLYP's, the head is zero-shot's of the interpolated text tower, as FLYP
        classifies (the interpolated heads would mix two text towers' classifiers)."""
        model.load_state_dict(state)
        if self.f.wise.method == "flyp":
            self.flyp_objective().prepare_eval(model)

    def load_finetuned(self, path: str) -> ImageClassifier:
        """A fine-tuned classifier from an earlier run's checkpoints/best (or its export directory)."""
        path = Path(path)
        latest = read_latest(path / "checkpoints")
        if latest is not None:  # an earlier fine-tune's run directory: its best checkpoint
            path = latest
        # what that fine-tune trained (its result.json, beside checkpoints/best), when it is there
        run_result = path.parent.parent / RESULT_FILE
        self.finetuned_trainable = (json.loads(run_result.read_text()).get("trainable_params")
                                    if run_result.is_file() else None)
        other = load_model(path, device=self.device)
        if other.model_cfg != self.loaded.model_cfg:
            raise UserError(f"finetune.wise.finetuned: {path} holds a {other.model_name} model of another "
                            f"architecture than the checkpoint's {self.loaded.model_name}: WiSE-FT interpolates "
                            "two models of one architecture")
        head, classnames = load_head(path / HEAD_FILE) if (path / HEAD_FILE).is_file() else (None, None)
        if head is None:
            raise UserError(f"finetune.wise.finetuned: {path} has no {HEAD_FILE} (expected a fine-tune's "
                            "checkpoints/best or export directory)")
        if classnames != self.data.classnames:
            raise UserError(f"finetune.wise.finetuned: {path} was fine-tuned for the classes {classnames[:5]}..., "
                            f"not this data's {self.data.classnames[:5]}...")
        model = ImageClassifier(other.model, self.num_classes).to(self.device)
        model.head.load_state_dict(head)
        return model


def finetune(cfg: Config) -> dict:
    """Run cfg.finetune.method; rank 0 writes and returns the result (other ranks return {})."""
    f = cfg.finetune
    if f.checkpoint is None or f.data is None:
        raise UserError("finetune needs --checkpoint (the pretrained model) and --data (the labelled set)")
    run_dir = Path(cfg.run.dir)
    if (run_dir / RESULT_FILE).exists():
        raise UserError(f"{run_dir} already holds a finished fine-tune ({RESULT_FILE}): choose another --out")
    check_config(cfg)
    env = init_distributed()
    try:
        torch.manual_seed(cfg.run.seed)
        started = time.perf_counter()
        job = Finetune(cfg, env)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        steps = 0 if f.method == "linear_probe" else job.plan().total
        logger = MetricsLogger(run_dir, total_steps=steps, enabled=env.is_main,
                               progress=cfg.run.progress and steps > 0)
        try:
            zeroshot = job.val_test(job.zeroshot_model()) if env.is_main else {}
            if f.method == "linear_probe":
                model, out = job.linear_probe() if env.is_main else (None, {})
            else:
                model, out = getattr(job, f.method)(logger)
        finally:
            logger.close()
        if not env.is_main:
            return {}
        fitted: FitResult | None = out.pop("fit", None)
        if "val" not in out:
            out.update(job.val_test(model))
        trainable = out.pop("trainable_params", None)
        _, total = count_parameters(model)
        if f.method == "linear_probe":
            trainable = job.num_classes * (feature_dim(job.clip) + 1)  # the probe's weights and biases
        result = {"method": f.method, "model": job.loaded.model_name, "checkpoint": str(f.checkpoint),
                  "data": str(f.data), "splits": _splits(job.data), "skipped": job.data.skipped,
                  "trainable_params": trainable, "total_params": total,
                  # None: WiSE-FT of a fine-tuned model whose run (result.json) is not at hand
                  "trainable_fraction": trainable / total if trainable is not None else None, **out, "zeroshot": zeroshot}
        if fitted is not None:
            result.update(best_step=fitted.best_step, best_epoch=fitted.best_epoch, epochs_run=fitted.epochs_run,
                          steps=fitted.steps, stopped_early=fitted.stopped_early, history=fitted.history)
            if fitted.skipped:
                result["skipped_in_training"] = fitted.skipped
        best = save_best(model, run_dir, job.loaded, job.data.classnames, {"method": f.method})
        result["best_checkpoint"] = str(best)
        result["export"] = export_classifier(model, run_dir / "export", job.loaded, job.data.classnames)
        result["seconds"] = time.perf_counter() - started
        write_result(run_dir, result)
        return result
    finally:
        if env.distributed:
            dist.barrier()
        cleanup()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="the pretrained model: a checkpoint directory, .safetensors weights file, "
                        "open_clip or transformers CLIPModel directory, or an OpenCLIP epoch_N.pt "
                        "/ state dict read as model.name (finetune.checkpoint)")
    p.add_argument("--data", metavar="DATA",
                   help="an image folder with train/, val/ (optional), test/ of class folders, or a "
                        "CLIP_benchmark webdataset root (finetune.data)")
    p.add_argument("--method", help="linear_probe, full, wise, lora or flyp (finetune.method; default full)")
    p.add_argument("--out", metavar="DIR", help="the run directory (run.dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="[CONFIG.yaml] then dotted.key=value overrides")


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    p = argparse.ArgumentParser(prog="clipkit finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    path = overrides.pop(0) if overrides and "=" not in overrides[0] else None
    for key, value in (("finetune.checkpoint", args.checkpoint), ("finetune.data", args.data),
                       ("finetune.method", args.method), ("run.dir", args.out)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return path, overrides


def summary_line(result: dict) -> str:
    zs, test = result["zeroshot"]["test"], result["test"]
    line = (f"{result['method']}: test acc1 {test['acc1']:.4f} (zero-shot {zs['acc1']:.4f}), "
            f"mean per-class recall {test['mean_per_class_recall']:.4f}")
    if result["trainable_params"] is not None:
        line += (f"; trainable parameters {result['trainable_params']:,} of {result['total_params']:,} "
                 f"({100 * result['trainable_fraction']:.2f}%")
        towers = result.get("trainable_by_tower")
        if towers:
            line += ": " + ", ".join(f"{name} {100 * t['fraction']:.2f}%" for name, t in towers.items())
        line += ")"
    if "lr" in result:
        line += f"; lr {result['lr']:g}" + (" (searched on val)" if "lr_search" in result else "")
    return line


def main(argv: list[str] | None = None) -> int:
    path, overrides = parse_args(argv)
    cfg = load_config(path, overrides)
    result = finetune(cfg)
    if result:
        print(summary_line(result))
        print(f"result: {Path(cfg.run.dir) / RESULT_FILE}")
    return 0
