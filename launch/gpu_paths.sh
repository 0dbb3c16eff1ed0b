#!/usr/bin/env bash
# GPU check of the other training paths, one process each (ViT-B-32, bf16, built-in dataset, 30 steps):
#   tiled  - memory-flat InfoNCE (train.loss=infonce_tiled)
#   siglip - SigLIP with exact contrastive accumulation (train.accum_steps=2)
#   zero3  - DeepSpeed ZeRO-3 bf16, then consolidated fp32 weights -> zero-shot -> open_clip export
# Logs and a JSON summary go to OUT_DIR (default runs/gpu_paths).
#   bash launch/gpu_paths.sh [dotted overrides for every run]   (CLIPKIT_NO_ENV=1: the current Python env)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -n "${CLIPKIT_NO_ENV:-}" ] || . launch/env.sh
OUT_DIR=${OUT_DIR:-runs/gpu_paths}
mkdir -p "$OUT_DIR"
common=(model.name=ViT-B-32 train.precision=bf16 train.global_batch_size=256 train.steps=30 train.warmup_steps=5
        train.lr=2e-4 train.checkpoint_every=1000 "data.workers=${WORKERS:-12}" run.log_every=10 run.progress=false
        data.synth.train_samples=8000 data.synth.samples_per_shard=500 data.synth.eval_samples=500
        "data.synth.out=$OUT_DIR/synth" "$@")
run() {
    local name=$1; shift
    rm -rf "${OUT_DIR:?}/$name"
    python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m clipkit train "${common[@]}" \
        "run.dir=$OUT_DIR/$name" "$@" > "$OUT_DIR/$name.log" 2>&1
    echo "$name: exit $?"
}
run tiled train.loss=infonce_tiled train.tile_size=128 eval.zeroshot_at_end=false export.at_end=false
run siglip train.loss=siglip train.accum_steps=2 eval.zeroshot_at_end=false export.at_end=false
run zero3 deepspeed.enabled=true deepspeed.zero_stage=3
python3 - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), []
for name in ("tiled", "siglip", "zero3"):
    summary = out / name / "summary.json"
    if not summary.is_file():
        rows.append({"run": name, "error": f"no summary: see {out / (name + '.log')}"})
        continue
    s = json.loads(summary.read_text())
    losses = [json.loads(line)["loss"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    rows.append({"run": name, "steps": s["steps"], "samples_per_s": s["samples_per_s"],
                 "gpu_mem_peak_gib": s.get("gpu_mem_peak_gib"), "first_loss": losses[0], "last_loss": losses[-1],
                 "zeroshot_acc1": (s.get("zeroshot") or {}).get("acc1"), "exported": "export" in s})
print(json.dumps(rows, indent=1))
(out / "gpu_paths.json").write_text(json.dumps(rows, indent=1))
PY
