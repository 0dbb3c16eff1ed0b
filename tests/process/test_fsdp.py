"""FSDP2 (fsdp.enabled=true) on gloo CPU ranks through torchrun, against the single-process run.

The single-process curve is computed here, by tests/dist/train_curve.py's reference mode on the same global
batches (the torch engine, no sharding); nothing is stored from an earlier run. Each curve carries a set of the
features FSDP2 must work with, so that one run exercises several of them.
"""
import json
import subprocess
import sys

import pytest
from helpers import DIST, process_env

SCRIPT = DIST / "train_curve.py"
STEPS = 8
TOL = 2e-4  # as tests/process/test_distributed_training.py: fp32 on CPU, reduction order differs between layouts


def _overrides(run_dir, synth, *extra):
    return [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
            "train.global_batch_size=16", f"train.steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=3",
            "train.checkpoint_every=100", "run.progress=false", "data.workers=0", "data.shuffle_buffer=40", *extra]


def _run(cmd):
    proc = subprocess.run(cmd, env=process_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _curves(tmp_path, synth, nproc, *features):
    """(the FSDP2 run's losses on nproc ranks, the single-process losses on the same global batches)."""
    fsdp, ref = tmp_path / "fsdp.json", tmp_path / "reference.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT),
          "fit", str(fsdp), str(STEPS), *_overrides(tmp_path / "fsdp", synth, "fsdp.enabled=true", *features)])
    _run([sys.executable, str(SCRIPT), "reference", str(ref), str(STEPS), str(nproc),
          *_overrides(tmp_path / "reference", synth, *features)])
    return json.loads(fsdp.read_text())["losses"], json.loads(ref.read_text())["losses"]


def _assert_matches(curve, golden):
    assert len(curve) == len(golden) == STEPS
    assert golden[-1] < golden[0]  # the run learns, so the comparison is not between flat lines
    worst = max(abs(a - b) for a, b in zip(curve, golden))
    assert worst < TOL, f"max |loss - single-process loss| = {worst:.2e}\n{curve}\n{golden}"


@pytest.mark.parametrize("nproc,features", [
    # gathered InfoNCE computed in tiles, exact accumulation over 2 micro-batches, gradient checkpointing, the
    # image tower locked but its last group (LiT-style), the root kept gathered from the forward to the backward
    (2, ("train.loss=infonce_tiled", "train.tile_size=5", "train.accum_steps=2", "model.grad_checkpointing=true",
         "model.lock_image=true", "model.lock_image_unlocked_groups=1", "fsdp.reshard_after_forward=false")),
    # SigLIP with each rank's own B_local x B_global logits, length buckets with trimmed text, the text tower
    # locked (LiT), on 4 ranks
    (4, ("train.loss=siglip", "train.local_loss=true", "data.length_buckets=[8,12]", "model.trim_text=true",
         "model.lock_text=true", "model.lock_text_unlocked_layers=1")),
], ids=["2ranks-tiled-accum-ckpt-lockimage", "4ranks-siglip-local-buckets-locktext"])
def test_fsdp2_curve_matches_single_process(tmp_path, synth_small, nproc, features):
    """Trainer.fit with FSDP2 (every transformer block of both towers sharded, then the root; grad clipping at
    the default train.grad_clip=1.0 over the sharded gradients) gives the single-process losses step by step."""
    _assert_matches(*_curves(tmp_path, synth_small, nproc, *features))
