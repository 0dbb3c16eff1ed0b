"""FSDP2 (fsdp.enabled=true) on gloo CPU ranks through torchrun, against the single-process run.

The single-process curve is computed here, by tests/dist/train_curve.py's reference mode on the same global
batches (the torch engine, no sharding); nothing is stored from an earlier run. Each curve carries a set of the
features FSDP2 must work with, so that one run exercises several of them. The gradient norms the runs log
(global, before clipping) are compared too: clipping acts at every step of these runs, so the curves match only
if the norm completed across the shards is the single process's. The 2-rank job then trains the same run with
bf16 parameters in the same processes (no second start-up), against its fp32 curve.
"""
import json
import math
import subprocess
import sys

import pytest
from helpers import DIST, process_env

from clipkit.config import TrainConfig

SCRIPT = DIST / "train_curve.py"
STEPS = 8
TOL = 2e-4  # as tests/process/test_distributed_training.py: fp32 on CPU, reduction order differs between layouts
# The global gradient norm, relative: the same reduction-order rounding as the losses (2e-4 on losses of about 3
# is 7e-5 relative); measured within 1e-6 of the single process's.
NORM_RTOL = 1e-4
GRAD_CLIP = TrainConfig().grad_clip  # the default, which these runs keep
# fsdp.param_dtype=bf16 against the fp32 run, relative to the fp32 loss of each step: bf16 keeps 8 significant
# bits (a rounding of up to 2^-9 = 2e-3 of each weight and activation the blocks read), so the losses move by a
# few 1e-3 (measured: at most 2.6e-3 over the 8 steps); 2e-2 leaves room for that while a bf16 run that stopped
# learning stays far outside it (the fp32 loss falls by more than 20% over the 8 steps).
BF16_RTOL = 2e-2


def _overrides(run_dir, synth, *extra):
    return [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
            "train.global_batch_size=16", f"train.steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=3",
            "train.checkpoint_every=100", "run.progress=false", "data.workers=0", "data.shuffle_buffer=40", *extra]


def _run(cmd):
    proc = subprocess.run(cmd, env=process_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _curves(tmp_path, synth, nproc, features, then=()):
    """The curves ({"losses", "grad_norms"}) of the FSDP2 run on nproc ranks, of the single process on the same
    global batches, and, with `then`, of a second FSDP2 run with these overrides added, in the same processes."""
    fsdp, ref, second = tmp_path / "fsdp.json", tmp_path / "reference.json", tmp_path / "second.json"
    more = ["then", str(second), f"run.dir={tmp_path / 'second'}", *then] if then else []
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT),
          "fit", str(fsdp), str(STEPS), *_overrides(tmp_path / "fsdp", synth, "fsdp.enabled=true", *features), *more])
    _run([sys.executable, str(SCRIPT), "reference", str(ref), str(STEPS), str(nproc),
          *_overrides(tmp_path / "reference", synth, *features)])
    curves = [json.loads(path.read_text()) for path in (fsdp, ref)]
    return (*curves, json.loads(second.read_text()) if then else None)


def _assert_matches(run, single):
    curve, golden = run["losses"], single["losses"]
    assert len(curve) == len(golden) == STEPS
    assert golden[-1] < golden[0]  # the run learns, so the comparison is not between flat lines
    worst = max(abs(a - b) for a, b in zip(curve, golden))
    assert worst < TOL, f"max |loss - single-process loss| = {worst:.2e}\n{curve}\n{golden}"
    # the clipped steps' norms: completed across the ranks' shards, unscaled, as the single process's
    norms, want = run["grad_norms"], single["grad_norms"]
    assert all(n > GRAD_CLIP for n in want[:2]), want  # clipping acts (the first steps' norms are far above it)
    assert norms == pytest.approx(want, rel=NORM_RTOL), f"{norms}\n{want}"
    assert run["clipped_steps"] == [int(n > GRAD_CLIP) for n in norms]  # one step per record (log_every=1)


def _assert_bf16_trains(bf16, fp32):
    """fsdp.param_dtype=bf16 (fp32 master weights and reduction): finite, learning, near the fp32 curve, and
    not equal to it (the policy gathered the weights in bf16)."""
    curve, want = bf16["losses"], fp32["losses"]
    assert len(curve) == STEPS and all(math.isfinite(x) for x in curve) and curve[-1] < curve[0], curve
    gaps = [abs(a - b) / b for a, b in zip(curve, want)]
    assert max(gaps) < BF16_RTOL, f"bf16 vs fp32 relative gaps {gaps}\n{curve}\n{want}"
    assert max(gaps) > 1e-5, "the bf16 run gave the fp32 losses: its weights were not gathered in bf16"


@pytest.mark.parametrize("nproc,features,bf16", [
    # gathered InfoNCE computed in tiles, exact accumulation over 2 micro-batches, gradient checkpointing, the
    # image tower locked but its last group (LiT-style), the root kept gathered from the forward to the backward;
    # then the same with bf16 parameters
    (2, ("train.loss=infonce_tiled", "train.tile_size=5", "train.accum_steps=2", "model.grad_checkpointing=true",
         "model.lock_image=true", "model.lock_image_unlocked_groups=1", "fsdp.reshard_after_forward=false"),
     True),
    # SigLIP with each rank's own B_local x B_global logits, length buckets with trimmed text, the text tower
    # locked (LiT), on 4 ranks
    (4, ("train.loss=siglip", "train.local_loss=true", "data.length_buckets=[8,12]", "model.trim_text=true",
         "model.lock_text=true", "model.lock_text_unlocked_layers=1"), False),
], ids=["2ranks-tiled-accum-ckpt-lockimage", "4ranks-siglip-local-buckets-locktext"])
def test_fsdp2_curve_matches_single_process(tmp_path, synth_small, nproc, features, bf16):
    """Trainer.fit with FSDP2 (every transformer block of both towers sharded, then the root; grad clipping at
    the default train.grad_clip=1.0 over the sharded gradients) gives the single-process losses and gradient
    norms step by step; with bf16 parameters it trains near the fp32 curve."""
    fsdp, single, second = _curves(tmp_path, synth_small, nproc, features, ("fsdp.param_dtype=bf16",) if bf16 else ())
    _assert_matches(fsdp, single)
    if bf16:
        _assert_bf16_trains(second, fsdp)
