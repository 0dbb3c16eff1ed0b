"""Conversion between torch-engine (DDP) and FSDP2 checkpoints, both ways (`clipkit convert-checkpoint`).

The source is the session's clipkit-nano torch checkpoint (nano_checkpoint). Converted to FSDP2 and resumed on 2
ranks, it holds the source's weights and Adam moments exactly and trains on as the source resumed under DDP on 2
ranks does; the 2-rank FSDP2 checkpoint that run writes (really sharded: each rank's half of every tensor),
converted back to the torch engine, gives the source's files back tensor for tensor.
"""
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from clipkit.training.convert import convert_checkpoint
from helpers import DIST, process_env, tiny_run

TOL = 2e-4  # as tests/process/test_elastic.py: fp32 on CPU, the reduction order differs between DDP and FSDP2


def _run(*args):
    proc = subprocess.run([sys.executable, *args], env=process_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _resume(run_dir, synth, checkpoint, out, *extra):
    """tests/dist/fsdp_resume.py on 2 ranks: the state held after loading, 2 steps on fixed batches, and a
    checkpoint of the resumed step written by the 2 ranks."""
    overrides = tiny_run(run_dir, synth, f"data.zeroshot={synth.eval_root}", "train.steps=6",
                         f"train.resume={checkpoint}", *extra)
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DIST / "fsdp_resume.py"), str(out),
         "2", "1", *overrides)
    return load_file(str(out / "state.safetensors")), json.loads((out / "resumed.json").read_text())


def test_torch_checkpoint_converts_to_fsdp2_and_back_exactly(nano_checkpoint, synth_small, tmp_path):
    source = nano_checkpoint
    converted = tmp_path / "fsdp_run" / "checkpoints" / source.name
    printed = _run("-m", "clipkit", "convert-checkpoint", "--checkpoint", str(source), "--to", "fsdp2",
                   "--out", str(converted)).stdout
    assert str(converted) in printed
    info = json.loads((converted / "trainer.json").read_text())
    assert info["engine"] == "fsdp2" and info["config"]["fsdp"]["enabled"] is True

    fsdp, fsdp_info = _resume(tmp_path / "fsdp", synth_small, converted, tmp_path / "out_fsdp", "fsdp.enabled=true")
    ddp, ddp_info = _resume(tmp_path / "ddp", synth_small, source, tmp_path / "out_ddp")
    weights = load_file(str(source / "model.safetensors"))
    optimizer = torch.load(source / "optimizer.pt", weights_only=True)["optimizer"]
    assert sorted(fsdp) == sorted(ddp) and len(fsdp) == 62 * 3
    for key, value in ddp.items():  # the same state as DDP resumed from the source, bit for bit
        assert torch.equal(fsdp[key], value.reshape(fsdp[key].shape)), key
    for name, value in weights.items():  # which is the source's
        assert torch.equal(fsdp[f"weight/{name}"], value.reshape(fsdp[f"weight/{name}"].shape)), name
    assert len(optimizer["state"]) == 62 and fsdp_info["step"] == ddp_info["step"] == 2
    assert fsdp_info["lr"] == ddp_info["lr"]
    worst = max(abs(a - b) for a, b in zip(fsdp_info["losses"], ddp_info["losses"]))
    assert worst < TOL, (fsdp_info, ddp_info)

    sharded = tmp_path / "fsdp" / "checkpoints" / source.name  # written by the 2 FSDP2 ranks after loading
    assert {"fsdp/__0_0.distcp", "fsdp/__1_0.distcp"} <= set(json.loads((sharded / "manifest.json").read_text())["files"])
    back = convert_checkpoint(sharded, tmp_path / "back" / "checkpoints" / source.name, "torch")
    assert json.loads((back / "trainer.json").read_text())["engine"] == "torch"
    returned = load_file(str(back / "model.safetensors"))
    assert sorted(returned) == sorted(weights)
    for name, value in weights.items():
        assert returned[name].shape == value.shape and torch.equal(returned[name], value), name
    original = torch.load(source / "optimizer.pt", weights_only=True)
    again = torch.load(back / "optimizer.pt", weights_only=True)
    assert again["scheduler"] == original["scheduler"]
    assert again["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    for index, state in original["optimizer"]["state"].items():
        for key, value in state.items():
            assert again["optimizer"]["state"][index][key].shape == value.shape, (index, key)
            assert torch.equal(again["optimizer"]["state"][index][key], value), (index, key)
