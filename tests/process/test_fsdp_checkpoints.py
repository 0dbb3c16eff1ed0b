"""FSDP2 checkpoints: torch.distributed.checkpoint (DCP) files inside clipkit's verified, signed checkpoint
directories, on gloo CPU ranks.

One `clipkit train` run on 2 ranks (module fixture) is the source: a non-finite step injected at step 2 (the NaN
guard skips it on both ranks), evaluation during training every 2 steps, the final checkpoint consolidated and
exported. Its weights are checked against DCP's own consolidation of the sharded files (format_utils
.dcp_to_torch_save) and against open_clip loading the export; its mid-run checkpoint is resumed on 1 and on 2
ranks, and a 1-rank checkpoint of the same state on 2.
"""
import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import DIST, process_env

TOL = 2e-4  # as tests/process/test_elastic.py: fp32 on CPU, the reduction order differs between layouts
RESUME = DIST / "fsdp_resume.py"


def _training(run_dir, synth, *extra):
    return [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
            "train.global_batch_size=16", "train.steps=4", "train.lr=2e-3", "train.warmup_steps=1",
            "train.checkpoint_every=2", "run.progress=false", "data.workers=0", "data.shuffle_buffer=40",
            "fsdp.enabled=true", *extra]


def _run(nproc, *args, ok=True, **env):
    cmd = [sys.executable, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=process_env(**env), capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _dcp_consolidated(checkpoint: Path, tmp: Path) -> dict:
    """DCP's own consolidation of the sharded files (test code on a checkpoint this test wrote: it unpickles
    DCP's metadata)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint / "fsdp"), str(tmp / "consolidated.pt"))
    return torch.load(tmp / "consolidated.pt", weights_only=True)


@pytest.fixture(scope="module")
def fsdp_run(synth_small, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp_cli") / "run"
    _run(2, str(DIST / "fault_train.py"), *_training(run_dir, synth_small, f"data.zeroshot={synth_small.eval_root}",
                                                     "eval.every=2", "eval.retrieval_at_end=false"),
         CLIPKIT_TEST_FAULTS="poison:2")
    return run_dir


def test_fsdp2_run_skips_nonfinite_step_evaluates_and_consolidates_the_dcp_shards(fsdp_run, tmp_path):
    """The NaN guard skipped step 2 on both ranks (its checkpoint waited for step 3), evaluation ran during
    training on the gathered weights (at step 4 it scores what the end of the run scores), and model.safetensors
    of the final checkpoint equals DCP's consolidation of the sharded files exactly, as open_clip loads the
    export."""
    import open_clip

    from clipkit.models import create_model  # registers clipkit's architectures with open_clip

    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["nonfinite_steps"] == 1
    records = [json.loads(line) for line in (fsdp_run / "metrics.jsonl").open()]
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    assert sorted(evals) == [2, 4]
    assert evals[4]["zeroshot_acc1"] == summary["zeroshot"]["acc1"]
    assert sorted(p.name for p in (fsdp_run / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]

    final = fsdp_run / "checkpoints" / "step_00000004"
    manifest = json.loads((final / "manifest.json").read_text())
    assert {"fsdp/.metadata", "fsdp/__0_0.distcp", "fsdp/__1_0.distcp", "model.safetensors"} <= set(manifest["files"])
    ours = load_file(str(final / "model.safetensors"))
    reference = _dcp_consolidated(final, tmp_path)
    assert sorted(ours) == sorted(reference["model"])
    for name, value in reference["model"].items():
        assert torch.equal(ours[name], value), name
    assert int(reference["optim"]["state"]["logit_scale"]["step"]) == 3  # the skipped step did not update
    fresh = create_model("clipkit-nano").state_dict()
    assert any(not torch.equal(ours[k].reshape(fresh[k].shape), fresh[k]) for k in fresh)  # trained weights

    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{fsdp_run / 'export'}")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, ours[name].reshape(value.shape)), name


def _resume(synth, nproc, *jobs):
    """Each (run_dir, checkpoint, out, save) of `jobs` resumed in turn in one launch of nproc ranks: their
    (state held right after loading, resumed.json)."""
    args = [str(RESUME)]
    for run_dir, checkpoint, out, save in jobs:
        args += [*(["then"] if len(args) > 1 else []), str(out), "2", "1" if save else "0",
                 *_training(run_dir, synth, f"train.resume={checkpoint}")]
    _run(nproc, *args)
    return [(load_file(str(out / "state.safetensors")), json.loads((out / "resumed.json").read_text()))
            for _, _, out, _ in jobs]


def test_fsdp2_resumes_2_to_1_and_1_to_2_as_on_the_same_size(fsdp_run, synth_small, tmp_path):
    """The mid-run checkpoint (step 3, 2 ranks) resumed on 1 rank and on 2; the 1-rank run's own checkpoint of
    that state resumed on 2: right after loading, every weight and both Adam moments equal DCP's consolidation of
    the original checkpoint exactly in all three, and the next losses on the same global batches equal the
    same-size resume's; the step count and the LR continue."""
    checkpoint = fsdp_run / "checkpoints" / "step_00000003"
    [(one, one_info)] = _resume(synth_small, 1, (tmp_path / "one", checkpoint, tmp_path / "out1", True))
    one_rank_checkpoint = tmp_path / "one" / "checkpoints" / "step_00000003"
    assert json.loads((one_rank_checkpoint / "trainer.json").read_text())["world_size"] == 1
    # the two resumes on 2 ranks, in one launch
    (same, same_info), (back, back_info) = _resume(synth_small, 2,
                                                   (tmp_path / "same", checkpoint, tmp_path / "out2", False),
                                                   (tmp_path / "back", one_rank_checkpoint, tmp_path / "out3", False))

    reference = _dcp_consolidated(checkpoint, tmp_path)
    expected = {f"weight/{k}": v for k, v in reference["model"].items()}
    for name, moments in reference["optim"]["state"].items():
        expected.update({f"exp_avg/{name}": moments["exp_avg"], f"exp_avg_sq/{name}": moments["exp_avg_sq"]})
    assert len(expected) == 62 * 3
    for state in (one, same, back):
        assert sorted(state) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(state[key], value.float()), key
    assert one_info["step"] == same_info["step"] == back_info["step"] == 3
    assert one_info["lr"] == same_info["lr"] == back_info["lr"] > 0
    for info in (one_info, back_info):
        worst = max(abs(a - b) for a, b in zip(info["losses"], same_info["losses"]))
        assert len(info["losses"]) == 2 and worst < TOL, (info, same_info)


class _Marker:
    """A pickle that creates a file when unpickled: the proof that a loader ran it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_fsdp2_checkpoint_not_signed_by_this_installation_is_refused_unread(fsdp_run, synth_small, tmp_path):
    """DCP's metadata is a pickle: a checkpoint whose .metadata was swapped (checksums recomputed, so it verifies
    as a listing but its signature does not) is refused before DCP reads it: nothing in it runs."""
    copy = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(fsdp_run / "checkpoints" / "step_00000003", copy)
    marker = tmp_path / "ran"
    (copy / "fsdp" / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    manifest = json.loads((copy / "manifest.json").read_text())
    path = copy / "fsdp" / ".metadata"
    manifest["files"]["fsdp/.metadata"] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))

    proc = _run(1, "-m", "clipkit", "train", *_training(tmp_path / "run", synth_small, f"train.resume={copy}",
                                                        "eval.zeroshot_at_end=false", "export.at_end=false"), ok=False)
    assert proc.returncode != 0
    assert "was not written by this clipkit installation" in proc.stdout + proc.stderr
    assert not marker.exists()
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # nothing trained


def test_fsdp2_checkpoints_export_to_every_format(fsdp_run, tmp_path):
    """The final FSDP2 checkpoint exports to every format from its consolidated weights, each read back by its
    consumer (open_clip, transformers' CLIPModel, ONNX Runtime) giving the consolidated model's image features; a
    mid-run FSDP2 checkpoint (no full weights) exports once converted to the torch engine, with the weights of
    DCP's consolidation of its shards."""
    import onnxruntime as ort
    import open_clip
    from transformers import CLIPModel

    from clipkit.export import EXPORT_FORMATS, export_checkpoint
    from clipkit.models import load_model
    from clipkit.training.convert import convert_checkpoint

    final = fsdp_run / "checkpoints" / "step_00000004"
    model = load_model(final).model.eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encode_image(pixels)
    assert sorted(EXPORT_FORMATS) == ["hf", "onnx", "open_clip"]
    files = {fmt: export_checkpoint(final, tmp_path / fmt, fmt) for fmt in EXPORT_FORMATS}
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'open_clip'}")
    hf = CLIPModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    session = ort.InferenceSession(str(files["onnx"]["image"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(pixels), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixels).pooler_output, expected,
                                   rtol=0, atol=1e-5)
    onnx_out = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=0, atol=1e-4)

    middle = fsdp_run / "checkpoints" / "step_00000003"
    converted = convert_checkpoint(middle, tmp_path / "torch" / "step_00000003", "torch")
    export_checkpoint(converted, tmp_path / "middle", "open_clip")
    reference = _dcp_consolidated(middle, tmp_path)["model"]
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'middle'}")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, reference[name].reshape(value.shape)), name
