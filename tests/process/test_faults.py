"""Reliability under faults, each fault for real: a diverging loss, a poisoned batch, non-finite weights,
SIGTERM, kill -9 mid-step and mid-save, a stopped rank under torchrun, a crashed rank under
torchrun --max-restarts, a read-only run directory.

Every run is a real process (`python -m clipkit train`, or tests/dist/fault_train.py, which is that command
with a fault injected from outside the library at a chosen step). Resumed and restarted runs are compared
with the uninterrupted run, loss for loss.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipkit.checkpoint import CheckpointError, verify
from clipkit.models import load_model, save_weights
from helpers import DIST, process_env

FAULT_TRAIN = DIST / "fault_train.py"
TRAIN_CURVE = DIST / "train_curve.py"
STEPS = 12
# As in tests/test_distributed_training.py: fp32 on CPU, reduction order differs between one process and
# all-reduced ranks; a resumed single-process run is in fact bit-identical.
TOL = 2e-4


def _overrides(run_dir, synth, *extra):
    return [f"run.dir={run_dir}", f"data.train={synth.train_spec}", f"data.zeroshot={synth.eval_root}",
            "model.name=clipkit-nano", "train.global_batch_size=16", f"train.steps={STEPS}", "train.warmup_steps=3",
            "train.lr=2e-3", "train.checkpoint_every=2", "train.keep_checkpoints=0", "run.log_every=1",
            "run.progress=false", "data.workers=0", "eval.zeroshot_at_end=false", "export.at_end=false", "run.report=false", *extra]


def _command(args, nproc: int = 1, max_restarts: int = 0, script=FAULT_TRAIN) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", str(script), *map(str, args)]


def _run(args, faults: str = "", nproc: int = 1, max_restarts: int = 0, timeout: float = 600):
    try:
        return subprocess.run(_command(args, nproc, max_restarts), env=process_env(CLIPKIT_TEST_FAULTS=faults), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = "\n".join(x if isinstance(x, str) else (x or b"").decode() for x in (e.stdout, e.stderr))
        raise AssertionError(f"no exit in {timeout} s: {' '.join(e.cmd)}\n{out[-5000:]}") from None


def _start(args, log: Path, faults: str = "", nproc: int = 1) -> subprocess.Popen:
    """Started in the background, stdout and stderr to files (LOG.out, LOG.err): no pipe fills up."""
    return subprocess.Popen(_command(args, nproc), env=process_env(CLIPKIT_TEST_FAULTS=faults), stdout=open(f"{log}.out", "w"),
                            stderr=open(f"{log}.err", "w"), text=True)


def _output(log: Path) -> tuple[str, str]:
    return Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _reject(constant: str):
    raise ValueError(f"metrics.jsonl holds {constant}: not JSON")


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, parsed strictly (a bare NaN or Infinity fails)."""
    return [json.loads(line, parse_constant=_reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list:
    records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "each step logged once, in order"
    return [r["loss"] for r in records]


def _assert_same_curve(curve, reference) -> None:
    assert len(curve) == len(reference) == STEPS
    assert reference[-1] < reference[0]  # the run learns: the comparison is not between flat lines
    worst = max(abs(a - b) for a, b in zip(curve, reference))
    assert worst < TOL, f"max |loss - uninterrupted loss| = {worst:.2e}\n{curve}\n{reference}"


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def _assert_finite_checkpoint(path: Path) -> None:
    verify(path)
    for name, tensor in load_file(str(path / "model.safetensors")).items():
        assert torch.isfinite(tensor).all(), f"{path}: {name} is not finite"


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r.get("step", 0) >= step for r in _records_tolerant(path)):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _records_tolerant(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker process of `rank` (read from /proc: its RANK variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker process of rank {rank}")


@pytest.fixture(scope="module")
def reference(synth_small, tmp_path_factory):
    """The uninterrupted single-process run: its run directory and loss curve."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _ok(_run(_overrides(run_dir, synth_small)))
    return run_dir, _losses(run_dir)


# -- non-finite loss and weights ---------------------------------------------------------------------------


def test_diverging_run_stops_with_one_message_and_saves_nothing_nonfinite(synth_small, tmp_path):
    """train.lr=1e12 without clipping: step 1 is finite, every later loss is NaN. The steps are skipped and
    counted, the run stops at the 5th in a row with a message naming the step and the likely cause, exit 2;
    metrics.jsonl is strict JSON; the checkpoint kept is finite (none written after the loss went NaN)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "clipkit", "train",
                           *_overrides(run_dir, synth_small, "train.lr=1e12", "train.grad_clip=null",
                                       "train.warmup_steps=0", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                                       "train.steps=20")],
                          env=process_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipkit: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "step 6: the loss or the gradients were not finite for 5 steps in a row (steps 2-6" in errors[0]
    assert "train.lr=1e+12" in errors[0] and "train.grad_clip=null" in errors[0]
    assert "update skipped" in proc.stdout  # each skipped step is logged
    records = _records(run_dir)  # strict: null, never NaN
    assert [r["step"] for r in records] == list(range(1, 7))
    assert math.isfinite(records[0]["loss"]) and all(r["loss"] is None for r in records[1:])
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert _checkpoints(run_dir) == ["step_00000001"]
    _assert_finite_checkpoint(run_dir / "checkpoints" / "step_00000001")
    assert not (run_dir / "summary.json").exists()


def test_good_checkpoints_survive_a_divergence(synth_small, reference, tmp_path):
    """Every batch from step 5 on is poisoned: the checkpoints of steps 3 and 4 (train.keep_checkpoints=2)
    are not rotated away by non-finite ones, and step 4's weights are the uninterrupted run's."""
    run_dir = tmp_path / "run"
    proc = _run(_overrides(run_dir, synth_small, "train.checkpoint_every=1", "train.keep_checkpoints=2"),
                faults="poison_from:5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "clipkit: error: step 9: the loss or the gradients were not finite for 5 steps in a row (steps 5-9" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert "latest checkpoint: step_00000004" in proc.stderr
    assert _checkpoints(run_dir) == ["step_00000003", "step_00000004"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    for name in _checkpoints(run_dir):
        _assert_finite_checkpoint(run_dir / "checkpoints" / name)
    ours = load_file(str(run_dir / "checkpoints" / "step_00000004" / "model.safetensors"))
    theirs = load_file(str(reference[0] / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r["loss"] for r in _records(run_dir)][4:] == [None] * 5


def _digests(run_dir: Path, rank: int) -> dict[int, dict]:
    return {d["step"]: d for d in map(json.loads, (run_dir / f"digests_rank{rank}.jsonl").open())}


def test_one_poisoned_step_is_skipped_and_the_run_finishes(synth_small, reference, tmp_path):
    """inf images at step 5: no update at that step (weights and AdamW's step count as after step 4), the
    schedule still follows the step count (every LR equals the uninterrupted run's), the run finishes with
    the skip counted in metrics.jsonl and the summary."""
    run_dir = tmp_path / "run"
    proc = _run(_overrides(run_dir, synth_small), faults="poison:5,digests")
    _ok(proc)
    assert "non-finite    : 1 steps skipped" in proc.stdout
    d = _digests(run_dir, 0)
    assert [s for s in d if not d[s]["applied"]] == [5]
    assert d[5]["weights"] == d[4]["weights"] and d[5]["adam_step"] == d[4]["adam_step"] == 4
    assert d[6]["weights"] != d[5]["weights"] and d[6]["adam_step"] == 5
    records, ref = _records(run_dir), _records(reference[0])
    assert [r["lr"] for r in records] == [r["lr"] for r in ref]
    assert [r["loss"] for r in records][:4] == [r["loss"] for r in ref][:4]
    assert records[4]["loss"] is None and all(math.isfinite(r["loss"]) for r in records[5:])
    assert records[-1]["nonfinite_steps"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == STEPS


def test_a_step_poisoned_on_one_rank_is_skipped_by_every_rank(synth_small, tmp_path):
    """DDP on 2 ranks, inf images on rank 1 only at step 3: both ranks skip that update (decided together),
    and their weights stay identical at every step."""
    run_dir = tmp_path / "run"
    _ok(_run(_overrides(run_dir, synth_small, "train.steps=6"), faults="poison:3:1,digests", nproc=2))
    d0, d1 = _digests(run_dir, 0), _digests(run_dir, 1)
    assert sorted(d0) == sorted(d1) == list(range(1, 7))
    assert [s for s in d0 if not d0[s]["applied"]] == [s for s in d1 if not d1[s]["applied"]] == [3]
    assert all(d0[s]["weights"] == d1[s]["weights"] for s in d0)
    assert d0[3]["weights"] == d0[2]["weights"] and d0[4]["weights"] != d0[3]["weights"]
    assert _records(run_dir)[-1]["nonfinite_steps"] == 1


def test_deepspeed_zero3_skips_a_poisoned_step_like_the_torch_engine(synth_small, tmp_path):
    """DeepSpeed ZeRO-3 (its optimizer skips non-finite gradients itself; clipkit decides on the loss before
    the backward): inf images at step 3 are skipped, and the curve around it is the torch engine's with the
    same poisoned step, loss for loss; the LR schedule follows the step count on both."""
    curves = {}
    for name, extra in (("torch", []), ("zero3", ["deepspeed.enabled=true", "deepspeed.zero_stage=3"])):
        run_dir = tmp_path / name
        _ok(_run(_overrides(run_dir, synth_small, "train.steps=6", *extra), faults="poison:3"))
        curves[name] = _records(run_dir)
        assert [r["nonfinite_steps"] for r in curves[name]] == [0, 0, 1, 1, 1, 1]
        _assert_finite_checkpoint(run_dir / "checkpoints" / "step_00000006")
    torch_curve, zero3 = curves["torch"], curves["zero3"]
    assert torch_curve[2]["loss"] is None and zero3[2]["loss"] is None
    assert [r["lr"] for r in zero3] == pytest.approx([r["lr"] for r in torch_curve], rel=1e-12)
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(torch_curve, zero3) if a["step"] != 3)
    assert worst < TOL, (torch_curve, zero3)


def test_nonfinite_weights_are_refused_by_every_reader(reference, synth_small, tmp_path):
    """A weights file with a NaN: load_model (under zero-shot, retrieval, embed, export) raises
    CheckpointError naming the tensor; `clipkit zeroshot` and `clipkit export` print one line, exit 2."""
    run_dir = reference[0]
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    load_model(final)  # the good one loads
    meta = json.loads((final / "trainer.json").read_text())
    state = load_file(str(final / "model.safetensors"))
    state["text_projection"] = state["text_projection"].clone()
    state["text_projection"][0, 0] = float("nan")
    bad = save_weights(state, tmp_path / "diverged.safetensors", meta["model_name"], meta["model_cfg"])
    with pytest.raises(CheckpointError, match="tensor 'text_projection' holds non-finite values"):
        load_model(bad)
    for args in (["zeroshot", "--checkpoint", bad, "--data", synth_small.eval_root],
                 ["export", "--checkpoint", bad, "--out", tmp_path / "export"]):
        proc = subprocess.run([sys.executable, "-m", "clipkit", *map(str, args)], env=process_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [
            f"clipkit: error: {bad}: tensor 'text_projection' holds non-finite values (NaN or inf): these weights come "
            "from a diverged run and are not usable; use an earlier checkpoint"]
    assert not (tmp_path / "export").exists()


# -- stopping, crashing, resuming --------------------------------------------------------------------------


def test_sigterm_saves_at_the_step_boundary_and_the_resumed_run_equals_the_uninterrupted_one(
        synth_small, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, synth_small)
    proc = _start(args, tmp_path / "log", faults="delay:0.3")
    _wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out, err = _output(tmp_path / "log")
    assert proc.returncode == 75 and "Traceback" not in err, err[-3000:]  # EXIT_PREEMPTED
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["stopped"]["step"]
    assert summary["stopped"]["signal"] == "SIGTERM" and 3 <= stopped < STEPS
    assert f"clipkit: stopped by SIGTERM at step {stopped}" in err
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / f"step_{stopped:08d}")
    verify(summary["checkpoint"])
    assert [r["step"] for r in _records(run_dir)] == list(range(1, stopped + 1))
    _ok(_run([*args, "train.resume=latest"]))
    _assert_same_curve(_losses(run_dir), reference[1])


def test_stop_signal_handlers_are_restored_after_fit(synth_small, tmp_path, one_thread):
    from clipkit.config import load_config
    from clipkit.training import Trainer

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
        trainer = Trainer(load_config(None, _overrides(tmp_path / "run", synth_small)))
        trainer.fit(until=1)
        assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)} == before
        assert trainer.stopped_by is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("fault", ["crash:5", "sigkill_save:6"])
def test_kill9_mid_step_or_mid_save_then_resume_equals_the_uninterrupted_run(fault, synth_small, reference, tmp_path):
    """SIGKILL inside the backward of step 5, or while checkpoint 6 is being written (its files in
    step_00000006.tmp, no manifest): the relaunch with train.resume=latest removes the partial checkpoint,
    continues from step 4 and trains the uninterrupted run's curve."""
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, synth_small)
    killed = _run(args, faults=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _checkpoints(run_dir) == ["step_00000002", "step_00000004"] + \
        (["step_00000006.tmp"] if fault.startswith("sigkill_save") else [])
    resumed = _run([*args, "train.resume=latest"])
    _ok(resumed)
    assert "resumed from" in resumed.stdout and "step_00000004 at step 4" in resumed.stdout
    if fault.startswith("sigkill_save"):
        assert "left by an interrupted save" in resumed.stderr + resumed.stdout
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    _assert_same_curve(_losses(run_dir), reference[1])


def test_crashed_rank_under_max_restarts_resumes_by_itself(synth_small, tmp_path):
    """torchrun --max-restarts=1, rank 1 killed mid-step 5 on the first attempt: torchrun restarts both
    ranks, which continue from the checkpoint of step 4 by themselves (no train.resume given); the job
    completes with the single-process curve of the same global batches."""
    run_dir = tmp_path / "run"
    proc = _run(_overrides(run_dir, synth_small), faults="crash:5:1,first_attempt", nproc=2, max_restarts=1,
                timeout=300)
    _ok(proc)
    assert "restart 1 of this torchrun job" in proc.stdout and "at step 4" in proc.stdout, proc.stdout[-3000:]
    out = tmp_path / "reference.json"
    ref = subprocess.run(_command(["reference", out, STEPS, 2, *_overrides(tmp_path / "ref", synth_small)],
                                  script=TRAIN_CURVE), env=process_env(), capture_output=True, text=True, timeout=180)
    _ok(ref)
    _assert_same_curve(_losses(run_dir), json.loads(out.read_text())["losses"])


# -- hangs ---------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_rank_1_and_wait(run_dir: Path, synth, *extra):
    """2 ranks under torchrun; rank 1 gets SIGSTOP once step 3 is logged. Returns (torchrun's exit status,
    its output, seconds from the stop to the job's end). Once rank 0 has ended, rank 1 is continued, so
    that it can act on the SIGTERM torchrun sends it (a stopped process would wait for SIGKILL)."""
    log = run_dir.parent / "log"
    launcher = _start(_overrides(run_dir, synth, "train.steps=200", *extra), log, faults="delay:0.2", nproc=2)
    pids = []
    try:
        _wait_for_step(launcher, run_dir, 3)
        pids = [_worker_pid(launcher, 0), _worker_pid(launcher, 1)]
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while launcher.poll() is None and time.monotonic() - stopped < 150:
            if not _alive(pids[0]) and _alive(pids[1]):
                try:
                    os.kill(pids[1], signal.SIGCONT)
                except ProcessLookupError:  # torchrun has already killed it
                    pass
            time.sleep(0.2)
        elapsed = time.monotonic() - stopped
        launcher.wait(timeout=60)
        out, err = _output(log)
        return launcher.returncode, out + err, elapsed
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stopped_rank_the_watchdog_dumps_stacks_and_ends_the_job(synth_small, tmp_path):
    """kill -STOP on rank 1: rank 0 waits in a collective; after train.stall_timeout_s=5 its watchdog writes
    every thread's stack to run.dir/stall_rank0.txt and exits with status 3, and the job ends non-zero,
    long before the collective timeout (dist.timeout_s=300) or gloo's default (30 min)."""
    run_dir = tmp_path / "run"
    stall = run_dir / "stall_rank0.txt"
    code, output, elapsed = _stop_rank_1_and_wait(run_dir, synth_small, "train.stall_timeout_s=5",
                                                  "dist.timeout_s=300")
    assert code != 0 and elapsed < 60, (code, elapsed, output[-3000:])
    text = stall.read_text()
    assert "no training step completed in" in text and "train.stall_timeout_s=5" in text
    assert "Thread 0x" in text and "_run_steps" in text  # faulthandler's dump of every thread
    assert "clipkit: rank 0: no training step completed" in output and "exiting with status 3" in output


def test_stopped_rank_the_collective_timeout_ends_the_job(synth_small, tmp_path):
    """The same hang with the watchdog off: dist.timeout_s=8 makes rank 0's collective fail after 8 s."""
    run_dir = tmp_path / "run"
    code, output, elapsed = _stop_rank_1_and_wait(run_dir, synth_small, "train.stall_timeout_s=0",
                                                  "dist.timeout_s=8")
    assert code != 0 and 8 <= elapsed < 60, (code, elapsed, output[-3000:])
    assert "timed out" in output.lower() or "timeout" in output.lower(), output[-3000:]
    assert not (run_dir / "stall_rank0.txt").exists()


WATCHDOG = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("watchdog", sys.argv[1])
watchdog = importlib.util.module_from_spec(spec)
spec.loader.exec_module(watchdog)
dog = watchdog.Watchdog(1.0, sys.argv[2], rank=0).start()
with dog.paused():  # an evaluation or a checkpoint write: 3 s, not a stall
    time.sleep(3)
dog.beat()
time.sleep(0.5)
dog.beat()
print("paused and beating: no stall", flush=True)
time.sleep(30)  # a stall
print("not reached")
"""


def test_watchdog_ignores_paused_time_and_fires_on_a_stall(tmp_path):
    import clipkit.training.watchdog as module

    proc = subprocess.run([sys.executable, "-c", WATCHDOG, module.__file__, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == module.EXIT_STALLED, proc.stderr
    assert proc.stdout.splitlines() == ["paused and beating: no stall"]
    dump = (tmp_path / "stall_rank0.txt").read_text()
    assert "no training step completed in 1 s, after 2 steps in this process" in dump
    assert 'File "<string>", line 13 in <module>' in dump  # the main thread, in its sleep(30)


# -- the run directory ---------------------------------------------------------------------------------------


def test_read_only_run_dir_is_one_line_before_training(synth_small, tmp_path):
    """A run.dir on a read-only file system (a tmpfs mounted read-only in a private user and mount
    namespace, since root writes through chmod): exit 2, one line naming run.dir, nothing trained."""
    mount = tmp_path / "ro"
    mount.mkdir()
    run_dir = mount / "run"
    command = [sys.executable, "-m", "clipkit", "train", *_overrides(run_dir, synth_small)]
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0:
        inner = f"mount -t tmpfs -o ro,size=1m tmpfs {mount} && exec " + " ".join(f"'{c}'" for c in command)
        proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inner], env=process_env(),
                              capture_output=True, text=True, timeout=120)
        reason = "Read-only file system"
    elif os.geteuid() != 0:
        mount.chmod(0o555)
        try:
            proc = subprocess.run(command, env=process_env(), capture_output=True, text=True, timeout=120)
        finally:
            mount.chmod(0o755)
        reason = "Permission denied"
    else:
        pytest.skip("running as root without user namespaces: no unwritable directory can be made")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"clipkit: error: run.dir={run_dir} is not writable ({reason}; on rank 0): the run could save neither "
        "checkpoints nor metrics; make room or fix its permissions, or choose another run.dir"]
    assert not run_dir.exists()
