"""The checkpoint manager: when to save, what goes in, retention, the latest pointer, verification
and fallback on resume. The loop only says `checkpoints.maybe_save(step)`.

What a checkpoint holds (see docs/checkpoints.md):
    step_00000600/model.safetensors   fp32 weights + architecture (torch engine; DeepSpeed, FSDP2: final step)
    step_00000600/optimizer.pt        optimizer, schedule, loss scale: tensors and numbers only
    step_00000600/deepspeed/          DeepSpeed's own sharded files (DeepSpeed engine)
    step_00000600/fsdp/               torch.distributed.checkpoint's shards and metadata (FSDP2 engine; schedule.pt
                                      beside it: the LR schedule and loss scale)
    step_00000600/trainer.json        step, engine, world size, model name and architecture, run config
    step_00000600/ranks.json          per rank: each state provider's JSON (RNG, data stream, skip counts)
    step_00000600/manifest.json       sha256 of every file above, signed; written last

A checkpoint whose weights hold a NaN or an infinity is never written (save() raises CheckpointError and
leaves the earlier ones, which retention would otherwise rotate away, in place).
"""
from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import (
    CheckpointError,
    commit,
    disk_full_error,
    is_disk_full,
    list_steps,
    recover_interrupted,
    remove_checkpoint,
    signing_key,
    stage_verified,
    step_dir,
    write_json,
)
from ..distributed import DistEnv, gather_objects
from ..models import WEIGHTS_FILE, save_weights

log = logging.getLogger("clipkit.training")

TRAINER_FILE = "trainer.json"
RANKS_FILE = "ranks.json"
PRIVATE_PREFIX = ".verified-"  # the private copy a resume loads from, in the checkpoints directory


class StateProvider(Protocol):
    """Per-rank state that a checkpoint carries as JSON."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """Python, numpy, torch and CUDA generators, as JSON (no pickled objects)."""

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
        return {"python": [version, list(internal), gauss],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                "torch": _b64(torch.get_rng_state()), "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_unb64(state["torch"]))
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _agree(error: str | None, env: DistEnv) -> None:
    """Raise the same CheckpointError on every rank if any rank failed (none is left waiting)."""
    errors = [e for e in gather_objects(error, env) if e]
    if errors:
        raise CheckpointError(errors[0])


class CheckpointManager:
    def __init__(self, directory: str | Path, env: DistEnv, engine, providers: dict[str, StateProvider], *,
                 every: int, keep: int, meta: dict,
                 reshard: dict[str, Callable[[list[dict]], dict | None]] | None = None) -> None:
        """meta: what identifies the run in trainer.json (model_name, model_cfg, config).
        reshard: per provider, this rank's state from the saved states of every rank of a checkpoint (in
        rank order, whatever their number); a provider without one gets its own rank's saved state, or keeps
        its fresh state on a rank the checkpoint did not have. A function may return None: keep it fresh."""
        self.directory, self.env, self.engine = Path(directory), env, engine
        self.providers, self.every, self.keep, self.meta = providers, every, keep, meta
        self.reshard = reshard or {}
        self.tokenizer_files: dict | None = None  # a transformers tokenizer the weights files carry
        self.last: Path | None = None
        self.load_note: str | None = None  # what the engine said about the last resume (a conversion), for the log
        if env.is_main:  # a missing key is made, a weak one refused, now rather than at the first save
            signing_key()

    def existing(self) -> Path | None:
        """The newest checkpoint directory, complete or not (a run.dir holding one holds a run)."""
        found = list_steps(self.directory)
        return found[-1] if found else None

    def holds_weights(self, step: int) -> bool:
        """Whether the checkpoint last saved or loaded is this step's and carries full weights."""
        return (self.last is not None and self.last.name == step_dir(self.directory, step).name
                and (self.last / WEIGHTS_FILE).is_file())

    def recover_interrupted(self) -> None:
        """Complete or undo an interrupted save, remove what an interrupted save or resume left."""
        if self.env.is_main:
            for note in recover_interrupted(self.directory):
                log.warning("%s", note)

    # -- saving ---------------------------------------------------------------------------------------

    def maybe_save(self, step: int) -> Path | None:
        return self.save(step) if step % self.every == 0 else None

    def save(self, step: int, *, final: bool = False) -> Path:
        """Write step_N; the final checkpoint also carries full fp32 weights (consolidated under ZeRO)."""
        final_dir = step_dir(self.directory, step)
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        bad = self.engine.nonfinite_weight()  # every rank checks the weights it holds
        _agree(None if bad is None else
               f"checkpoint {final_dir.name} was not written: weight '{bad}' holds non-finite values (NaN or inf) "
               f"at step {step}; the checkpoints saved before are intact in {self.directory}", self.env)
        ranks = gather_objects({name: p.state_dict() for name, p in self.providers.items()}, self.env)
        error = None
        if self.env.is_main:
            error = self._attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)), tmp)
        _agree(error, self.env)
        error = self._attempt(lambda: self.engine.save_state(tmp), tmp)
        _agree(error, self.env)
        weights = self.engine.full_state_dict() if final and not self.engine.writes_full_weights else None
        if self.env.is_main:
            error = self._attempt(lambda: self._seal(tmp, step, ranks, weights), tmp)
        _agree(error, self.env)
        self.last = final_dir
        return final_dir

    def _attempt(self, write, tmp: Path) -> str | None:
        try:
            write()
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                return str(disk_full_error(tmp.parent, e))
            if isinstance(e, CheckpointError):
                return str(e)
            return f"writing checkpoint {tmp.name[:-4]} in {tmp.parent} failed: {type(e).__name__}: {e}"
        return None

    def _seal(self, tmp: Path, step: int, ranks: list, weights: dict | None) -> None:
        if weights is not None:
            save_weights(weights, tmp / WEIGHTS_FILE, self.meta["model_name"], self.meta["model_cfg"],
                         self.meta.get("preprocess_cfg"), self.tokenizer_files)
        write_json(tmp / TRAINER_FILE, {"step": step, "engine": self.engine.name, "world_size": self.env.world_size,
                                        **self.meta})
        write_json(tmp / RANKS_FILE, ranks)
        commit(tmp, {"step": step, "engine": self.engine.name})
        if self.keep > 0:
            for old in list_steps(self.directory)[:-self.keep]:
                remove_checkpoint(old)

    # -- resuming -------------------------------------------------------------------------------------

    def resume(self, spec: str) -> tuple[int, dict] | None:
        """Load 'latest' (the newest checkpoint that verifies) or a given checkpoint directory into the
        engine and providers; returns (step, trainer.json) or None when 'latest' finds nothing.

        Rank 0 verifies the checkpoint into a private copy (clipkit.checkpoint.stage_verified), which every
        rank then loads: nothing swapped in the checkpoint after it was checked is read."""
        chosen, error = (None, None), None
        if self.env.is_main:
            try:
                chosen = self._choose(spec)
            except CheckpointError as e:
                error = str(e)
        _agree(error, self.env)
        if self.env.distributed:
            box = [tuple(str(p) if p else None for p in chosen)]
            dist.broadcast_object_list(box, src=0)
            chosen = tuple(Path(p) if p else None for p in box[0])
        path, private = chosen
        if path is None:
            return None
        failure = None
        try:
            result = self._load(path, private)
        except CheckpointError as e:  # named after the checkpoint, not after its private copy
            failure = CheckpointError(str(e).replace(str(private), str(path)))
        except Exception as e:
            failure = e
        others = [e for e in gather_objects(None if failure is None else str(failure), self.env) if e]
        if self.env.is_main:  # every rank has read the copy
            shutil.rmtree(private, ignore_errors=True)
        if failure is not None:
            raise failure
        if others:
            raise CheckpointError(others[0])
        return result

    def _load(self, path: Path, private: Path) -> tuple[int, dict]:
        """Load the private copy `private` of checkpoint `path` into the engine and the providers."""
        info = json.loads((private / TRAINER_FILE).read_text())
        self._check_compatible(path, info)
        # the engine's temporaries (a DeepSpeed checkpoint converted for another world size) go in this run's
        # checkpoints directory, never in the sealed checkpoint
        self.load_note = self.engine.load_state(private, saved_world_size=info["world_size"], scratch=self.directory)
        ranks = json.loads((private / RANKS_FILE).read_text())
        if len(ranks) != info["world_size"]:
            raise CheckpointError(f"{path / RANKS_FILE} holds {len(ranks)} ranks' states; the checkpoint was "
                                  f"written by {info['world_size']}")
        for name, provider in self.providers.items():
            states = [r.get(name) for r in ranks]
            if any(s is None for s in states):  # a provider newer than the checkpoint keeps its fresh state
                continue
            if name in self.reshard:
                state = self.reshard[name](states)
            else:
                state = states[self.env.rank] if self.env.rank < len(states) else None
            if state is not None:
                provider.load_state_dict(state)
        self.last = path
        return info["step"], info

    def _choose(self, spec: str) -> tuple[Path, Path] | tuple[None, None]:
        """(checkpoint, its verified private copy): the one named, or the newest that verifies for 'latest'."""
        candidates = [Path(spec)] if spec != "latest" else list(reversed(list_steps(self.directory)))
        for candidate in candidates:
            try:
                return candidate, self._private_copy(candidate)
            except CheckpointError as e:
                if spec != "latest":
                    raise
                print(f"clipkit: skipping checkpoint {candidate}: {e}", flush=True)
        if candidates:
            raise CheckpointError(f"no checkpoint in {self.directory} verifies (see the reasons above)")
        return None, None

    def _private_copy(self, checkpoint: Path) -> Path:
        """A new directory of this run, readable by this user alone, holding the verified files of checkpoint;
        signed: the engine's loader unpickles, so the checkpoint must be one this installation wrote."""
        self.directory.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, suffix=".tmp", dir=self.directory))
        try:
            stage_verified(checkpoint, private, signed=self.engine.unpickles_on_load)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
        return private

    def _check_compatible(self, path: Path, info: dict) -> None:
        if info["engine"] != self.engine.name:
            raise CheckpointError(f"checkpoint {path} was written by the {info['engine']} engine; this run uses "
                                  f"{self.engine.name}: resume it with the same deepspeed.enabled / "
                                  "deepspeed.zero_stage / fsdp.enabled settings (clipkit convert-checkpoint turns "
                                  "torch and fsdp2 checkpoints into each other)")
        if info["model_cfg"] != self.meta["model_cfg"]:
            raise CheckpointError(f"checkpoint {path} holds architecture {info['model_name']}, which differs from "
                                  f"model.name={self.meta['model_name']}")
        if info["world_size"] != self.env.world_size and not self.engine.resumes_on_other_world_sizes:
            raise CheckpointError(f"checkpoint {path} was written by {info['world_size']} ranks; this run has "
                                  f"{self.env.world_size}: the {self.engine.name} engine resumes with the same "
                                  "world size only")
