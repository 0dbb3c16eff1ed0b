"""Real multi-process training on CPU/gloo, launched through torchrun, against the single-process run.

The golden curve is computed here, in the test, by the single-process run on the same global batches;
nothing is stored from an earlier distributed run.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DIST, free_port, process_env

SCRIPT = DIST / "train_curve.py"
STEPS = 20
# fp32 on CPU: reduction order differs between one process and gathered/all-reduced ranks, and Adam
# magnifies such differences slowly; over 20 steps they stay far below this.
TOL = 2e-4


def _overrides(run_dir, *extra):
    return [f"run.dir={run_dir}", "model.name=clipkit-nano", "train.global_batch_size=16", f"train.steps={STEPS}",
            "train.lr=2e-3", "train.warmup_steps=3", "train.checkpoint_every=10", "run.progress=false",
            "run.report=false", *extra]


def _curve(tmp_path, name, shards, nproc, *extra, steps=STEPS, nodes=1, then=()):
    """The real training loop (Trainer.fit with the real loader) on nproc x nodes ranks. Each (name2, overrides2)
    of `then` is one more run in the same processes (tests/dist/train_curve.py), with its own run directory;
    their curves follow the first in the list returned when `then` is given."""
    out = tmp_path / f"{name}.json"
    args = ["fit", str(out), str(steps), *_overrides(tmp_path / name, f"data.train={shards}", *extra)]
    for name2, overrides2 in then:
        args += ["then", str(tmp_path / f"{name2}.json"), f"run.dir={tmp_path / name2}", *overrides2]
    if nproc == 1 and nodes == 1:
        _run([sys.executable, str(SCRIPT), *args])
    elif nodes == 1:
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
              str(SCRIPT), *args])
    else:  # several "nodes" on localhost, each its own torchrun agent, meeting at a c10d rendezvous
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                                   f"--node_rank={r}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                                   f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=clipkit-test",
                                   str(SCRIPT), *args], env=process_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(nodes)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    if then:
        return [json.loads(out.read_text())] + [json.loads((tmp_path / f"{n}.json").read_text()) for n, _ in then]
    return json.loads(out.read_text())


def _reference(tmp_path, shards, world, steps=STEPS):
    """One process training on the global batches that `world` ranks' loaders deliver together."""
    out = tmp_path / f"reference{world}.json"
    _run([sys.executable, str(SCRIPT), "reference", str(out), str(steps), str(world),
          *_overrides(tmp_path / f"reference{world}", f"data.train={shards}")])
    return json.loads(out.read_text())["losses"]


def _run(cmd):
    proc = subprocess.run(cmd, env=process_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def golden(synth_small, tmp_path_factory):
    """The single-process curve on the global batches of 16 that two ranks' loaders deliver."""
    return _reference(tmp_path_factory.mktemp("golden"), synth_small.train_spec, 2)


def _assert_matches(curve, golden):
    assert len(curve) == len(golden) == STEPS
    assert golden[-1] < golden[0]  # the run learns, so the comparison is not between flat lines
    worst = max(abs(a - b) for a, b in zip(curve, golden))
    assert worst < TOL, f"max |loss - single-process loss| = {worst:.2e}\n{curve}\n{golden}"


@pytest.fixture(scope="module")
def ddp_curves(synth_small, tmp_path_factory):
    """DDP on 2 ranks with the gathered loss, then with train.local_loss=true, then the gathered run again
    stopped at step 10 (in "parts", for the resume test): one torchrun job, three runs."""
    root = tmp_path_factory.mktemp("ddp")
    ddp, local, parts = _curve(root, "ddp", synth_small.train_spec, 2,
                               then=[("ddp_local", ["train.local_loss=true"]), ("parts", ["until=10"])])
    return {"gathered": ddp, "local": local, "parts": parts, "root": root}


def test_ddp_two_ranks_matches_single_process(ddp_curves, golden):
    _assert_matches(ddp_curves["gathered"]["losses"], golden)


def test_ddp_local_loss_matches_single_process(ddp_curves, golden):
    _assert_matches(ddp_curves["local"]["losses"], golden)


def test_two_nodes_on_localhost_match_single_process(tmp_path, synth_small, golden):
    _assert_matches(_curve(tmp_path, "nodes", synth_small.train_spec, 1, nodes=2)["losses"], golden)


@pytest.fixture(scope="module")
def deepspeed_zero_curves(synth_small, tmp_path_factory):
    """ZeRO-1, then ZeRO-2, then ZeRO-3 on 2 ranks, then ZeRO-2 again stopped at step 10 (in "ds_resume", for the
    resume test): one torchrun job, a DeepSpeed engine of its own per run."""
    root = tmp_path_factory.mktemp("zero")
    curves = _curve(root, "zero1", synth_small.train_spec, 2, "deepspeed.enabled=true", "deepspeed.zero_stage=1",
                    then=[*((f"zero{s}", [f"deepspeed.zero_stage={s}"]) for s in (2, 3)),
                          ("ds_resume", ["deepspeed.zero_stage=2", "until=10"])])
    return {**dict(zip((1, 2, 3), curves)), "first10": curves[3], "root": root}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_matches_single_process(deepspeed_zero_curves, golden, stage):
    _assert_matches(deepspeed_zero_curves[stage]["losses"], golden)


def test_deepspeed_resume_continues_the_identical_curve(deepspeed_zero_curves, synth_small, golden):
    ds = ["deepspeed.enabled=true", "deepspeed.zero_stage=2"]
    root, first = deepspeed_zero_curves["root"], deepspeed_zero_curves["first10"]  # ZeRO-2 up to step 10
    assert (root / "ds_resume" / "checkpoints" / "step_00000010" / "deepspeed").is_dir()
    second = _curve(root, "ds_resume", synth_small.train_spec, 2, *ds, "train.resume=latest")
    assert second["first_step"] == 10
    _assert_matches(first["losses"] + second["losses"], golden)


@pytest.mark.parametrize("nproc", [1, 2])
def test_resumed_run_equals_the_uninterrupted_run_loss_for_loss(tmp_path, synth_small, nproc, request):
    """One process and DDP on 2 ranks, stopped at step 10 and resumed with train.resume=latest (a new launch):
    every loss equals the uninterrupted run's (weights, optimizer, schedule, RNG and data stream restored). The
    uninterrupted run and the first 10 steps share one launch (on 2 ranks, the DDP curves' job above)."""
    if nproc == 2:
        ddp = request.getfixturevalue("ddp_curves")  # only here: the one-process case needs no DDP job
        root, whole, first = ddp["root"], ddp["gathered"]["losses"], ddp["parts"]
    else:
        root = tmp_path
        uninterrupted, first = _curve(root, "whole", synth_small.train_spec, nproc, then=[("parts", ["until=10"])])
        whole = uninterrupted["losses"]
    second = _curve(root, "parts", synth_small.train_spec, nproc, "train.resume=latest")
    assert first["first_step"] == 0 and second["first_step"] == 10
    assert first["losses"] + second["losses"] == whole
    assert whole[-1] < whole[0]


def test_zero3_cli_run_consolidates_weights_that_export_and_open_clip_load(tmp_path, synth_small):
    """`torchrun -m clipkit train` under ZeRO-3 on 2 ranks: the fp32 file written at the end holds the
    full trained weights (checked against DeepSpeed's own zero_to_fp32 reconstruction of the partitioned
    checkpoint), and the run's open_clip export loads in open_clip with those weights."""
    import open_clip
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from clipkit.models import create_model  # registers clipkit's architectures with open_clip

    run_dir = tmp_path / "z3"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clipkit",
          "train", *_overrides(run_dir, "deepspeed.enabled=true", "deepspeed.zero_stage=3", "train.steps=6",
                               f"data.train={synth_small.train_spec}", f"data.zeroshot={synth_small.eval_root}",
                               "data.workers=1", "eval.every=3")])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert 0.0 <= summary["zeroshot"]["acc1"] <= 1.0
    # evaluation during training on the gathered ZeRO-3 weights (both ranks took part, neither hung): at
    # the last step it scores exactly what the end of the run scores from the saved weights
    evals = {r["step"]: r["eval"] for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "eval" in r}
    assert sorted(evals) == [3, 6]
    assert evals[6]["zeroshot_acc1"] == summary["zeroshot"]["acc1"]
    assert evals[6]["zeroshot_mean_per_class_recall"] == summary["zeroshot"]["mean_per_class_recall"]
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint == run_dir / "checkpoints" / "step_00000006"
    ours = load_file(str(checkpoint / "model.safetensors"))

    reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "deepspeed"), tag="state")
    fresh = create_model("clipkit-nano").state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name].reshape(value.shape), value.float(), rtol=0, atol=0, msg=name)
    assert any(not torch.equal(ours[k], fresh[k]) for k in reference)  # trained, not the initial weights

    export_dir = run_dir / "export"
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ours[name].reshape(value.shape), rtol=0, atol=0, msg=name)


def test_run_resumed_mid_epoch_sees_every_sample_once_with_2_ranks_x_2_workers(tmp_path, synth_small):
    """`torchrun -m clipkit train` on 2 ranks x 2 loader workers, stopped at step 13 and resumed, trains on
    exactly the batches of the uninterrupted run: same keys per rank and step, each sample at most once
    in the epoch, all of them samples of the shards (read with plain tarfile)."""
    from collections import Counter

    from data_shards import tar_keys

    from clipkit.data import expand_shards

    common = [f"data.train={synth_small.train_spec}", "data.workers=2", "data.shuffle_buffer=40",
              "run.record_sample_keys=true", "eval.zeroshot_at_end=false", "export.at_end=false"]

    def run(name, steps, *extra):
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
              "clipkit", "train", *_overrides(tmp_path / name, *common, f"train.steps={steps}", *extra)])

    def keys(name):
        return {r: [json.loads(line) for line in (tmp_path / name / "sample_keys" / f"rank{r}.jsonl").open()]
                for r in (0, 1)}

    run("whole", 30)
    run("parts", 13)
    assert [e["step"] for e in keys("parts")[0]] == list(range(1, 14))
    run("parts", 30, "train.resume=latest")
    whole, parts = keys("whole"), keys("parts")
    for r in (0, 1):
        assert [e["step"] for e in parts[r]] == list(range(1, 31))
        assert parts[r] == whole[r]  # the same batches, in the same order, across the interruption
    seen = Counter(k for r in (0, 1) for e in parts[r] for k in e["keys"])
    assert sum(seen.values()) == 30 * 16 and max(seen.values()) == 1  # within one epoch: no repeats
    assert set(seen) <= set(tar_keys(expand_shards(synth_small.train_spec)))


def test_slurm_style_launch_matches_single_process(tmp_path, synth_small, golden):
    """Two processes started the way `srun` starts them: rank, world and local rank only in SLURM_PROCID,
    SLURM_NTASKS and SLURM_LOCALID, the rendezvous in MASTER_ADDR/MASTER_PORT (as launch/slurm.sbatch
    exports them); no torchrun."""
    out = tmp_path / "slurm.json"
    args = ["fit", str(out), str(STEPS), *_overrides(tmp_path / "slurm", f"data.train={synth_small.train_spec}")]
    port = free_port()
    procs = []
    for rank in range(2):
        env = process_env() | {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("LOCAL_RANK", None)
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    _assert_matches(json.loads(out.read_text())["losses"], golden)
