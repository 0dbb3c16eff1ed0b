"""Weights files: a model's state dict as safetensors, with the architecture to rebuild it in the header.

    save_weights(model.state_dict(), "model.safetensors", "clipkit-tiny", model_cfg)
    loaded = load_model("runs/default/checkpoints/step_00000600")   # or the .safetensors file, a run directory
    loaded.model, loaded.tokenizer, loaded.eval_transform           # (its newest checkpoint), an open_clip or
    loaded = load_model("epoch_32.pt", model_name="ViT-B-32")       # transformers directory, ... (sources.py)

Loading gives one bundle (LoadedModel): the model with the tokenizer, image transforms and context length
its source brings, so every command tokenises and preprocesses as the model was trained.

safetensors holds tensors and a JSON header only: loading a file never runs code from it, and the model
name in the header is data, never a path: a name that is not plain (see factory.plain_model_name) is
refused with CheckpointError naming it. Weights that
hold a NaN or an infinity (a diverged run) are refused with CheckpointError naming the first such tensor:
zero-shot, retrieval, embeddings and exports of them would be meaningless numbers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, read_latest, read_manifest, verify
from . import tokenizer_files as tokenizer_codec
from .factory import (ModelNameError, ModelNotFoundError, create_model, create_transforms, get_model_config,
                      get_tokenizer, plain_model_name, register_model_config)
from .sources import read_safetensors

WEIGHTS_FILE = "model.safetensors"


class ArchitectureNeeded(CheckpointError):
    """The file holds weights only: --model NAME (model.name) must say which architecture."""


@dataclass
class LoadedModel:
    """A loaded model with everything its source brings: every command tokenises and preprocesses with these."""
    model: torch.nn.Module
    name: str  # the name it is buildable under here
    model_name: str  # the name it was trained under, plain (a JSON config's path gives its stem)
    model_cfg: dict
    source: Path
    tokenizer: Callable = None  # texts -> LongTensor [n, context_length]
    train_transform: Callable = None
    eval_transform: Callable = None
    context_length: int = 0
    format: str = "clipkit"  # see sources.py: clipkit, open_clip, transformers, open_clip-trainer, state-dict
    description: str = ""  # what was read, for logs and `clipkit inspect`
    extra: dict = field(default_factory=dict)  # what else the source held (a trainer checkpoint's epoch...)
    # image preprocessing the source set (None: the architecture's default): weights files saved from this
    # model keep it (save_weights(..., preprocess_cfg=loaded.preprocess_cfg))
    preprocess_cfg: dict | None = None
    weights: Path | None = None  # the file the tensors were read from (a run directory resolved to its step)
    # the files of a transformers tokenizer (tokenizer_files.py), None for open_clip's own: weights files
    # saved from this model carry them (save_weights(..., tokenizer_files=loaded.tokenizer_files))
    tokenizer_files: dict | None = None

    @property
    def transforms(self) -> tuple[Callable, Callable]:
        return self.train_transform, self.eval_transform

    @property
    def checkpoint(self) -> Path:
        """What loads these same weights again: a run directory resolved to its step directory (so a run that
        trains on is not followed), a model directory, or the weights file given."""
        if self.weights is None:
            return self.source
        return self.weights.parent if self.source.is_dir() else self.weights


@dataclass
class _Source:
    """What a path holds before the model is built."""
    weights: Path  # the file the tensors come from
    state: dict
    name: str
    model_cfg: dict
    format: str
    preprocess_cfg: dict | None = None  # None: the architecture's defaults
    tokenizer_dir: Path | None = None  # a directory whose own tokenizer files are used
    convert: Callable | None = None  # (model, state) -> open_clip state dict
    extra: dict = field(default_factory=dict)


def save_weights(state_dict: dict, path: str | Path, model_name: str, model_cfg: dict,
                 preprocess_cfg: dict | None = None, tokenizer_files: dict | None = None) -> Path:
    """preprocess_cfg: image preprocessing other than the architecture's default (an imported model's);
    tokenizer_files: a transformers tokenizer's files, carried in the header (tokenizer_files.py)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", "model_name": model_name, "model_cfg": json.dumps(model_cfg)}
    if preprocess_cfg:
        meta["preprocess_cfg"] = json.dumps(preprocess_cfg)
    if tokenizer_files:
        meta[tokenizer_codec.HEADER_KEY] = tokenizer_codec.encode(tokenizer_files)
    save_file(state, str(path), metadata=meta)
    return path


def _clipkit_file(path: Path) -> tuple[Path, str, dict, dict | None, dict | None]:
    """A run directory, a clipkit checkpoint directory or a weights file clipkit wrote: (file, name, model_cfg,
    preprocess_cfg and tokenizer files when the header has them)."""
    latest = read_latest(path / "checkpoints") if path.is_dir() else None
    if latest is not None:  # a run directory: its newest checkpoint
        path = latest
    if path.is_dir():  # a clipkit checkpoint: only its weights file is read, once its checksum matches
        manifest = read_manifest(path)
        if WEIGHTS_FILE not in manifest["files"]:
            raise CheckpointError(f"{path} holds {manifest.get('engine')} training state without full weights "
                                  f"(ZeRO and FSDP2 checkpoints are consolidated at the end of the run): use the "
                                  "run's final checkpoint, or turn an fsdp2 one into a torch one with `clipkit "
                                  "convert-checkpoint --to torch`")
        verify(path, only=[WEIGHTS_FILE])
        path = path / WEIGHTS_FILE
    _, meta = read_safetensors(path)
    if "model_cfg" not in meta or "model_name" not in meta:
        raise CheckpointError(f"{path} does not say which architecture it holds (no model_name/model_cfg in "
                              "its header): it was not written by clipkit")
    try:
        name = plain_model_name(meta["model_name"])
    except ModelNameError as e:
        raise CheckpointError(f"{path}: its header's {e}") from None
    pp = json.loads(meta["preprocess_cfg"]) if "preprocess_cfg" in meta else None
    if pp:  # JSON has no tuples: mean and std as open_clip keeps them
        pp = {k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}
    files = meta.get(tokenizer_codec.HEADER_KEY)
    files = tokenizer_codec.decode(files, path) if files else None
    return path, name, json.loads(meta["model_cfg"]), pp, files


def _has_clipkit_header(path: Path) -> bool:
    _, meta = read_safetensors(path)
    return "model_cfg" in meta and "model_name" in meta


def _named_architecture(path: Path, model_name: str | None, what: str) -> tuple[str, dict]:
    """The architecture a file that does not carry one is loaded as: --model NAME / model.name."""
    if not model_name:
        raise ArchitectureNeeded(f"{path} is {what} without its architecture: name it with --model NAME (or "
                              "model.name=NAME in a config), e.g. --model ViT-B-32")
    try:
        model_cfg = get_model_config(model_name)
    except ModelNotFoundError as e:
        raise CheckpointError(f"--model {model_name}: {e}") from None
    return plain_model_name(model_name), model_cfg


def _source(path: Path, model_name: str | None) -> _Source:
    """Detect what `path` holds from its files (see sources.py) and read its tensors."""
    from . import hf_clip
    from .sources import OPEN_CLIP_CONFIG as OC_CONFIG, PICKLE_SUFFIXES, open_clip_directory, open_clip_state, \
        read_pickled, read_tensors, trainer_state
    from .torchscript import is_torchscript_archive, openai_model_config, openai_state, read_torchscript_state

    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / OC_CONFIG).is_file():  # open_clip's hub layout (and clipkit's export)
        weights, model_cfg, pp = open_clip_directory(path)
        # a Hugging Face tokenizer is read from the directory when its files are there (never downloaded)
        from .hf_siglip import TOKENIZER_FILES as SIGLIP_TOKENIZER_FILES

        layouts = hf_clip.TOKENIZER_FILES + SIGLIP_TOKENIZER_FILES  # BPE or SentencePiece, as the export wrote it
        hf_tokenizer = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") and hf_clip.has_tokenizer(path, layouts)
        return _Source(weights, read_tensors(weights), _directory_model_name(path), model_cfg, "open_clip",
                       preprocess_cfg=pp or None, tokenizer_dir=path if hf_tokenizer else None,
                       convert=open_clip_state)
    if hf_clip.is_hf_directory(path):  # a transformers CLIPModel or SiglipModel directory
        return _transformers_source(path)
    if path.is_dir() or (path.suffix == ".safetensors" and _has_clipkit_header(path)):
        weights, name, model_cfg, pp, files = _clipkit_file(path)
        return _Source(weights, read_safetensors(weights)[0], name, model_cfg, "clipkit", preprocess_cfg=pp,
                       tokenizer_dir=tokenizer_codec.materialize(files) if files else None)
    if path.suffix == ".safetensors":
        name, model_cfg = _named_architecture(path, model_name, "an open_clip state dict")
        return _Source(path, read_tensors(path), name, model_cfg, "state-dict", convert=open_clip_state)
    if is_torchscript_archive(path):  # OpenAI's original CLIP archives, read without running their code
        state = read_torchscript_state(path)
        model_cfg = openai_model_config(path, state)
        return _Source(path, state, _known_name(model_cfg) or _directory_model_name(path.with_suffix("")), model_cfg,
                       "openai-torchscript", convert=openai_state)
    if path.suffix in PICKLE_SUFFIXES:
        obj = read_pickled(path)  # weights_only: refused before anything else is looked at
        trainer = trainer_state(path, obj)
        kind = "an OpenCLIP trainer checkpoint" if trainer else "an open_clip state dict"
        state, extra = trainer if trainer else (obj, {})
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors) nor an OpenCLIP "
                                  "trainer checkpoint (epoch, state_dict, optimizer)")
        name, model_cfg = _named_architecture(path, model_name, kind)
        return _Source(path, state, name, model_cfg, "open_clip-trainer" if trainer else "state-dict",
                       convert=open_clip_state, extra=extra)
    raise CheckpointError(f"{path}: expected a checkpoint or run directory, a .safetensors weights file, an "
                          "open_clip or transformers CLIPModel/SiglipModel directory, or a weights-only .bin/.pt state "
                          "dict")


def _transformers_source(path: Path) -> _Source:
    """A transformers directory: CLIPModel (hf_clip.py) or SiglipModel (hf_siglip.py), told by model_type."""
    from . import hf_clip, hf_siglip
    from .sources import read_tensors

    config = hf_clip.read_config(path)
    kind = hf_siglip if config["model_type"] == "siglip" else hf_clip
    model_cfg = kind.model_config(path, config)
    weights = hf_clip.weights_file(path)
    hf_clip.check_tokenizer(path, kind.TOKENIZER_FILES)
    pp = hf_clip.preprocess_config(path, model_cfg["vision_cfg"]["image_size"])
    return _Source(weights, read_tensors(weights), _directory_model_name(path), model_cfg, "transformers",
                   preprocess_cfg=pp, tokenizer_dir=path,
                   convert=lambda model, state: kind.to_open_clip_state(
                       path, state, model_cfg, {k: v.shape for k, v in model.state_dict().items()}))


def _known_name(model_cfg: dict) -> str | None:
    """The open_clip architecture with exactly this config (ViT-B-32-quickgelu for OpenAI's ViT-B-32.pt), if any."""
    from open_clip import get_model_config as open_clip_config, list_models

    return next((name for name in list_models() if open_clip_config(name) == model_cfg), None)


def _directory_model_name(path: Path) -> str:
    """A model directory is named by its folder (a name the user chose), mapped to a plain name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).lstrip("._-")[:128]
    return name or "open_clip-model"


def first_nonfinite(state: dict) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def _check_fit(model: torch.nn.Module, state: dict, weights: Path, name: str) -> None:
    """The first tensor that is missing, left over or of another shape, named in one line."""
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise CheckpointError(f"weights in {weights} do not fit architecture {name}: tensor '{key}' has no "
                                  "place in it")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"weights in {weights} do not fit architecture {name}: tensor '{key}' has shape "
                                  f"{tuple(value.shape)}, the architecture needs {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"weights in {weights} do not fit architecture {name}: tensor '{missing[0]}' is "
                              f"missing ({len(missing)} missing)")


def context_length(model: torch.nn.Module) -> int:
    return int(getattr(model, "context_length", None) or model.text.context_length)


def tokenizer_context_length(model: torch.nn.Module, model_cfg: dict) -> int:
    """What texts are padded to: a Hugging Face text tower's text_cfg.context_length (as open_clip's
    get_tokenizer has it; the tower itself embeds max_position_embeddings), else the model's."""
    text = model_cfg.get("text_cfg", {})
    return int(text.get("context_length", 77)) if text.get("hf_model_name") else context_length(model)


def load_model(path: str | Path, device: str | torch.device = "cpu", model_name: str | None = None) -> LoadedModel:
    """Load any source sources.py describes, with its tokenizer and image transforms (refused when not finite).

    model_name (--model / model.name) names the architecture of a file that does not carry one; for one that
    does, it must name the same architecture."""
    src = _source(Path(path), model_name)
    if model_name and src.format in ("clipkit", "open_clip", "transformers", "openai-torchscript"):
        _check_same_architecture(path, model_name, src)
    bad = first_nonfinite(src.state)
    if bad is not None:
        raise CheckpointError(f"{src.weights}: tensor '{bad}' holds non-finite values (NaN or inf): these weights "
                              "come from a diverged run and are not usable; use an earlier checkpoint")
    registered = register_model_config(src.name, src.model_cfg)
    kwargs = {"force_preprocess_cfg": src.preprocess_cfg} if src.preprocess_cfg else {}
    model = create_model(registered, device="cpu", **kwargs)
    state = src.convert(model, src.state) if src.convert else src.state
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # A temperature kept as a 1-element vector (DeepSpeed) loads into open_clip's 0-d parameter.
    state = {k: v.reshape(shapes[k]) if k in shapes and v.numel() == shapes[k].numel() else v
             for k, v in state.items()}
    _check_fit(model, state, src.weights, src.name)
    model.load_state_dict(state)
    ctx = tokenizer_context_length(model, src.model_cfg)
    tokenizer = _tokenizer(src, registered, ctx)
    files = tokenizer_codec.read_tokenizer_files(src.tokenizer_dir) if src.tokenizer_dir is not None else None
    train_transform, eval_transform = create_transforms(model)
    if src.format == "transformers":  # the directory's processor places its crop its own way
        from .hf_clip import processor_eval_transform

        eval_transform = processor_eval_transform(eval_transform)
    return LoadedModel(model.to(device), registered, src.name, src.model_cfg, Path(path), tokenizer,
                       train_transform, eval_transform, ctx, src.format, f"{FORMATS[src.format]}: {src.weights}",
                       src.extra, dict(model.visual.preprocess_cfg) if src.preprocess_cfg else None, src.weights,
                       files)


def load_any(path: str | Path, model_name: str | None, device: str | torch.device = "cpu") -> LoadedModel:
    """The source's own architecture when it carries one, else model_name's (a config's model.name, which
    has a default and so cannot be told apart from a choice: it names only what the file leaves open)."""
    try:
        return load_model(path, device=device)
    except ArchitectureNeeded:
        return load_model(path, device=device, model_name=model_name)


FORMATS = {"clipkit": "clipkit weights", "open_clip": "open_clip model directory",
           "transformers": "transformers CLIPModel/SiglipModel directory",
           "open_clip-trainer": "OpenCLIP trainer checkpoint", "state-dict": "open_clip state dict",
           "openai-torchscript": "OpenAI CLIP TorchScript archive"}


def _check_same_architecture(path, model_name: str, src: _Source) -> None:
    try:
        named = get_model_config(model_name)
    except ModelNotFoundError as e:
        raise CheckpointError(f"--model {model_name}: {e}") from None
    if named != src.model_cfg:
        raise CheckpointError(f"{path} holds its own architecture ({src.name}), which is not {model_name}: leave "
                              "out --model (model.name), or name the same architecture")


def _tokenizer(src: _Source, registered: str, ctx: int):
    if src.tokenizer_dir is not None:
        from .hf_clip import DirectoryTokenizer, check_tokenizer_fits

        tokenizer = DirectoryTokenizer(src.tokenizer_dir, ctx)
        if src.format == "transformers":
            check_tokenizer_fits(src.tokenizer_dir, tokenizer, src.model_cfg)
            if src.model_cfg.get("text_cfg", {}).get("pool_type") == "last":  # SigLIP reads the last position
                from .hf_siglip import check_context

                check_context(src.tokenizer_dir, tokenizer, ctx)
        return tokenizer
    tokenizer = get_tokenizer(registered)
    _check_vocabulary(src, tokenizer)
    return tokenizer


def _check_vocabulary(src: _Source, tokenizer) -> None:
    """The architecture's own tokenizer must only give ids the text tower embeds: a bare state dict of weights
    trained with their own tokenizer (a SigLIP directory's SentencePiece) does not carry it."""
    size, embedded = getattr(tokenizer, "vocab_size", None), src.model_cfg.get("text_cfg", {}).get("vocab_size")
    if isinstance(size, int) and isinstance(embedded, int) and size > embedded:
        raise CheckpointError(f"{src.weights}: its text tower embeds {embedded} tokens but open_clip's tokenizer for "
                              f"{src.name} has {size}: these weights were trained with another tokenizer, which this "
                              "file does not carry; load the run's checkpoint or export (they carry it), or the "
                              "source directory")
