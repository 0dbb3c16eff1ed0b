"""Conversion between torch-engine (DDP) and FSDP2 checkpoints, both ways (`clipkit convert-checkpoint`).

The source is the session's clipkit-nano torch checkpoint (nano_checkpoint). Converted to FSDP2 and resumed on 2
ranks, it holds the source's weights and Adam moments exactly and trains on; the 2-rank FSDP2 checkpoint that run
writes (really sharded: each rank's half of every tensor), converted back to the torch engine, gives the source's
files back tensor for tensor.
"""
import json
import math
import subprocess
import sys

import torch
from safetensors.torch import load_file

from clipkit.training.convert import convert_checkpoint
from helpers import DIST, process_env, tiny_run


def _run(*args):
    proc = subprocess.run([sys.executable, *args], env=process_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _resume(run_dir, synth, checkpoint, out, *extra):
    """tests/dist/fsdp_resume.py on 2 ranks: the state held after loading, 2 steps on fixed batches, and a
    checkpoint of the resumed step written by the 2 ranks (sharded)."""
    overrides = tiny_run(run_dir, synth, f"data.zeroshot={synth.eval_root}", "train.steps=6",
                         f"train.resume={checkpoint}", *extra)
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DIST / "fsdp_resume.py"), str(out),
         "2", "1", *overrides)
    return load_file(str(out / "state.safetensors")), json.loads((out / "resumed.json").read_text())


def _optimizer_order(weights: dict) -> list[str]:
    """The parameter names in the order torch's AdamW state dict numbers them (clipkit's param_groups), found
    on a fresh model of the architecture."""
    from clipkit.models import create_model
    from clipkit.training.optim import param_groups

    model = create_model("clipkit-nano")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in param_groups(model, 0.1) for p in group["params"]]
    assert set(order) <= set(weights)
    return order


def test_torch_checkpoint_converts_to_fsdp2_and_back_exactly(nano_checkpoint, synth_small, tmp_path):
    source = nano_checkpoint
    converted = tmp_path / "fsdp_run" / "checkpoints" / source.name
    printed = _run("-m", "clipkit", "convert-checkpoint", "--checkpoint", str(source), "--to", "fsdp2",
                   "--out", str(converted)).stdout
    assert str(converted) in printed
    info = json.loads((converted / "trainer.json").read_text())
    assert info["engine"] == "fsdp2" and info["config"]["fsdp"]["enabled"] is True

    fsdp, fsdp_info = _resume(tmp_path / "fsdp", synth_small, converted, tmp_path / "out_fsdp", "fsdp.enabled=true")
    weights = load_file(str(source / "model.safetensors"))
    for name, value in weights.items():  # the source's weights, bit for bit, gathered from the 2 ranks' shards
        assert torch.equal(fsdp[f"weight/{name}"], value.reshape(fsdp[f"weight/{name}"].shape)), name
    optimizer = torch.load(source / "optimizer.pt", weights_only=True)["optimizer"]
    names = _optimizer_order(weights)
    assert len(optimizer["state"]) == len(names) == 62 and len(fsdp) == 62 * 3
    for index, name in enumerate(names):  # and its Adam moments
        for key in ("exp_avg", "exp_avg_sq"):
            moment = optimizer["state"][index][key]
            assert torch.equal(fsdp[f"{key}/{name}"], moment.reshape(fsdp[f"{key}/{name}"].shape)), (key, name)
    assert fsdp_info["step"] == 2 and fsdp_info["lr"] == optimizer["param_groups"][0]["lr"]
    assert len(fsdp_info["losses"]) == 2 and all(math.isfinite(x) for x in fsdp_info["losses"])

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
