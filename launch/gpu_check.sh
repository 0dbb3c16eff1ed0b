#!/usr/bin/env bash
# GPU check: ViT-B-32 in bf16 on the built-in dataset, once with the plain (DDP) engine and once with
# DeepSpeed ZeRO-2, on every GPU of this node; with COMPILE=1 (the default when torch sees a GPU) also the
# plain engine with train.compile=model (the towers' transformer blocks compiled), and with FSDP=1 (also the
# default on a GPU) FSDP2 (fsdp.enabled=true, bf16 parameters, fp32 reduction); with both, FSDP2 with
# compiled blocks too. Prints samples/s and peak GPU memory of each run (from their summary.json; the first
# logged window, with start-up and warm-up, is left out of samples/s) and, for the compiled runs, their compile
# seconds, graphs and recompiles (metrics.jsonl).
#   bash launch/gpu_check.sh                 # STEPS=60 PER_GPU_BATCH=256 WORKERS=8 by default
#   CLIPKIT_NO_ENV=1 bash launch/gpu_check.sh   # in the Python environment you are in
#   COMPILE=0 bash launch/gpu_check.sh       # without the compiled runs
#   FSDP=0 bash launch/gpu_check.sh          # without the FSDP2 run
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CLIPKIT_NO_ENV:-}" ] || . launch/env.sh
OUT_DIR=${OUT_DIR:-runs/gpu_check}
# torch asked once (an import of torch is seconds): the GPUs of this node, and whether there is one
read -r gpus has_gpu < <(python3 -c 'import torch; print(max(1, torch.cuda.device_count()), int(torch.cuda.is_available()))')
NPROC=${NPROC:-$gpus}
STEPS=${STEPS:-60}
PER_GPU_BATCH=${PER_GPU_BATCH:-256}
WORKERS=${WORKERS:-8}
COMPILE=${COMPILE:-$has_gpu}
FSDP=${FSDP:-$has_gpu}
common=(model.name=ViT-B-32 train.precision=bf16 "train.global_batch_size=$((PER_GPU_BATCH * NPROC))"
        "train.steps=$STEPS" train.warmup_steps=10 train.lr=2e-4 train.checkpoint_every=1000000 "data.workers=$WORKERS"
        data.synth.train_samples=8000 data.synth.samples_per_shard=500 "data.synth.out=$OUT_DIR/synth"
        run.log_every=10 run.progress=false eval.zeroshot_at_end=false export.at_end=false "$@")
run() {
    local name=$1; shift
    rm -rf "${OUT_DIR:?}/$name"
    python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m clipkit train "${common[@]}" "run.dir=$OUT_DIR/$name" "$@"
}
run ddp
run zero2 deepspeed.enabled=true deepspeed.zero_stage=2
runs="ddp zero2"
if [ "$FSDP" = 1 ]; then
    run fsdp2 fsdp.enabled=true
    runs="$runs fsdp2"
fi
if [ "$COMPILE" = 1 ]; then
    run ddp_compile train.compile=model
    runs="$runs ddp_compile"
fi
if [ "$FSDP" = 1 ] && [ "$COMPILE" = 1 ]; then
    run fsdp2_compile fsdp.enabled=true train.compile=model
    runs="$runs fsdp2_compile"
fi
python3 - "$OUT_DIR" $runs <<'EOF'
import json, sys
from pathlib import Path
rows = []
for name in sys.argv[2:]:
    s = json.loads((Path(sys.argv[1]) / name / "summary.json").read_text())
    losses = [json.loads(l)["loss"] for l in (Path(sys.argv[1]) / name / "metrics.jsonl").read_text().splitlines()]
    rows.append({"run": name, "world_size": s["world_size"], "steps": s["steps"],
                 "samples_per_s": s["samples_per_s"], "gpu_mem_peak_gib": s.get("gpu_mem_peak_gib"),
                 "first_loss": losses[0], "last_loss": losses[-1]})
    last = json.loads((Path(sys.argv[1]) / name / "metrics.jsonl").read_text().splitlines()[-1])
    if "compile" in last:  # train.compile: compile time apart from step time
        rows[-1]["compile"] = last["compile"]
print(json.dumps(rows, indent=1))
(Path(sys.argv[1]) / "gpu_check.json").write_text(json.dumps(rows, indent=1))
EOF
