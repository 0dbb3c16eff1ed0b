"""`clipkit bench memory`: each engine's job on 2 gloo ranks reports its peak memory per rank and the weights and
optimizer state each rank holds, checked against the hand count for the model (fp32 weights plus AdamW's two
moments: 12 bytes per parameter, all of them on every DDP rank, half of them on each FSDP2 rank)."""
import json
import math
import subprocess
import sys

from clipkit.models import create_model
from helpers import process_env


def test_bench_memory_ddp_and_fsdp2_on_two_ranks(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "memory", "--model", "clipkit-nano", "--steps", "1",
                           "--engines", "ddp,fsdp2", "--out", str(out)], env=process_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2 and sorted(report["engines"]) == ["ddp", "fsdp2"]
    model = create_model("clipkit-nano", nonscalar_logit_scale=True)
    parameters = sum(p.numel() for p in model.parameters())
    whole = 12 * parameters  # fp32 weight, exp_avg, exp_avg_sq
    ddp, fsdp2 = report["engines"]["ddp"], report["engines"]["fsdp2"]
    assert ddp["parameters"] == fsdp2["parameters"] == parameters
    assert ddp["engine_name"] == "torch" and fsdp2["engine_name"] == "fsdp2"
    # AdamW's step counters (one 4-byte tensor per parameter tensor) come on top of the hand count
    steps = 4 * len(list(model.parameters()))
    assert all(whole <= held <= whole + steps for held in ddp["held_state_bytes_per_rank"])
    # each FSDP2 rank holds its half of every tensor (dim 0 split in two; a shard padded to the larger half)
    assert whole <= sum(fsdp2["held_state_bytes_per_rank"]) <= 1.01 * whole
    assert all(abs(held - whole / 2) <= 0.01 * whole for held in fsdp2["held_state_bytes_per_rank"])
    for engine in (ddp, fsdp2):
        assert len(engine["peak_bytes_per_rank"]) == 2 and all(b > 0 for b in engine["peak_bytes_per_rank"])
        assert all(math.isfinite(loss) for loss in engine["losses"])
    assert "peak MiB per rank" in proc.stdout
